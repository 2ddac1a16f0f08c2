// Usage: requests, tokens (input/output) and, when the API reports it,
// cost over time (by hour or day, UTC), the breakdown by model, provider or
// Lectr key, and the totals — the same as `lectr usage` over the range.

import { path } from "../api.js";
import { add, fmtInt, fmtTime, fmtUsd, h, present, replace, sumOf } from "../dom.js";
import { barChart } from "../chart.js";
import { errorBox, field, form, loading, notice, table } from "../ui.js";

export const title = "Usage";

const HOUR = 3600e3;
const DAY = 24 * HOUR;
const RANGES = [
  ["24h", "last 24 hours", DAY],
  ["7d", "last 7 days", 7 * DAY],
  ["30d", "last 30 days", 30 * DAY],
  ["month", "this month (UTC)", null],
  ["custom", "custom", null],
];
const MAX_HOURLY = 31 * DAY;
const MAX_RANGE = 366 * DAY;

const iso = (d) => d.toISOString().replace(".000Z", "Z");

/** The range the API's totals cover: whole hours, since rounded down and until up. */
function wholeHours({ since, until }) {
  return {
    since: new Date(Math.floor(since.getTime() / HOUR) * HOUR),
    until: new Date(Math.ceil(until.getTime() / HOUR) * HOUR),
  };
}

/** since/until (Dates) from the form's choices; throws Error when invalid. */
function chosenRange(q, now = new Date()) {
  const range = q.get("range") || "7d";
  if (range === "custom") {
    const since = new Date(`${q.get("since")}Z`);
    const until = new Date(`${q.get("until")}Z`);
    if (Number.isNaN(since.getTime()) || Number.isNaN(until.getTime())) {
      throw new Error("Give both ends of the custom range.");
    }
    if (since >= until) throw new Error("The range must start before it ends.");
    if (until - since > MAX_RANGE) throw new Error("The range may span at most 366 days.");
    return { since, until };
  }
  // the end of the current second: a range always reaches now, and "this
  // month" is not empty (since = until, refused) in a month's first second
  const until = new Date(Math.floor(now.getTime() / 1000) * 1000 + 1000);
  if (range === "month") {
    return { since: new Date(Date.UTC(until.getUTCFullYear(), until.getUTCMonth(), 1)), until };
  }
  const span = (RANGES.find(([v]) => v === range) || RANGES[1])[2];
  return { since: new Date(until.getTime() - span), until };
}

/** Every bucket of the range, so quiet periods show as gaps. */
function bucketsOf(since, until, bucket) {
  const step = bucket === "hour" ? HOUR : DAY;
  const start = Math.floor(since.getTime() / step) * step;
  const out = [];
  for (let t = start; t < until.getTime(); t += step) {
    const d = new Date(t);
    const key = bucket === "hour" ? iso(d) : d.toISOString().slice(0, 10);
    const label = bucket === "hour" ? `${key.slice(0, 10)} ${key.slice(11, 16)} UTC` : key;
    const short = bucket === "hour" ? `${key.slice(5, 10)} ${key.slice(11, 13)}h` : key.slice(5);
    out.push({ key, label, short });
  }
  return out;
}

function controls(ctx, q) {
  const custom = (q.get("range") || "7d") === "custom";
  const el = form({
    label: "Usage range",
    submit: "Show",
    kind: "",
    controls: [
      field({ label: "Range", name: "range", kind: "select", value: q.get("range") || "7d", options: RANGES.map(([v, t]) => [v, t]) }),
      field({ label: "Since (UTC, custom)", name: "since", kind: "datetime-local", value: q.get("since") || "", disabled: !custom }),
      field({ label: "Until (UTC, custom)", name: "until", kind: "datetime-local", value: q.get("until") || "", disabled: !custom }),
      field({ label: "Over time by", name: "bucket", kind: "select", value: q.get("bucket") || "hour", options: [["hour", "hour"], ["day", "day"]] }),
      field({
        label: "Breakdown by",
        name: "by",
        kind: "select",
        value: q.get("by") || "model",
        options: [["model", "model"], ["provider", "provider"], ["key", "Lectr key"]],
      }),
    ],
    onSubmit: (values) => {
      const next = { range: values.range, bucket: values.bucket, by: values.by };
      if (values.range === "custom") Object.assign(next, { since: values.since, until: values.until });
      ctx.navigate(`/orgs/${ctx.org.id}/usage`, next);
    },
  });
  el.elements.range.addEventListener("change", () => {
    const isCustom = el.elements.range.value === "custom";
    el.elements.since.disabled = !isCustom;
    el.elements.until.disabled = !isCustom;
  });
  return el;
}

function totalsView(items) {
  const t = (name) => sumOf(items, name) ?? (name === "cost_usd" ? null : 0);
  const stat = (label, name, format, note) =>
    h(
      "div",
      { class: "stat" },
      h("span", { class: "stat-label" }, label),
      h("span", { class: "stat-value", "data-total": name }, format(t(name))),
      note ? h("span", { class: "stat-note", "data-note": name }, note) : null,
    );
  const unpriced = t("unpriced");
  return h(
    "div",
    { class: "stats", id: "usage-totals", role: "group", "aria-label": "Totals over the range" },
    stat("Requests", "requests", fmtInt),
    stat("Errors", "errors", fmtInt),
    stat("Input tokens", "prompt_tokens", fmtInt),
    stat("Output tokens", "completion_tokens", fmtInt),
    stat("Total tokens", "total_tokens", fmtInt),
    stat("Cost", "cost_usd", fmtUsd, unpriced ? `${fmtInt(unpriced)} ${unpriced === 1 ? "request" : "requests"} without a price` : null),
  );
}

function charts(buckets, items) {
  const byKey = new Map(items.map((t) => [t.key, t]));
  const values = (fn) => buckets.map((b) => (byKey.has(b.key) ? fn(byKey.get(b.key)) : 0));
  const out = [
    barChart({
      label: "Requests",
      buckets,
      format: fmtInt,
      series: [
        { name: "succeeded", values: values((t) => t.requests - t.errors) },
        { name: "errors", values: values((t) => t.errors) },
      ],
    }),
    barChart({
      label: "Tokens",
      buckets,
      format: fmtInt,
      series: [
        { name: "input", values: values((t) => t.prompt_tokens) },
        { name: "output", values: values((t) => t.completion_tokens) },
      ],
    }),
  ];
  if (items.some((t) => Number(t.cost_usd) > 0)) {
    out.push(barChart({ label: "Cost", buckets, format: fmtUsd, series: [{ name: "cost", values: values((t) => Number(t.cost_usd) || 0) }] }));
  } else {
    out.push(h("p", { class: "hint" }, "No cost in this range (unpriced models count no cost: see the price catalogue)."));
  }
  return h("div", { class: "charts" }, out);
}

function breakdown(items, by, keyNames) {
  const top = Math.max(...items.map((t) => t.requests), 1);
  const name = (t) => {
    if (by === "key") return t.key ? keyNames.get(t.key) || t.key : "(no key recorded)";
    return present(t.key) ? t.key : "(no model)";
  };
  const bar = (t) => {
    const fill = h("span", { class: "bar-fill" });
    fill.style.width = `${((t.requests / top) * 100).toFixed(1)}%`;
    return h("span", { class: "bar-cell" }, h("span", { class: "bar", "aria-hidden": "true" }, fill), fmtInt(t.requests));
  };
  const label = { model: "Model", provider: "Provider", key: "Lectr key" }[by];
  return table({
    caption: `Usage by ${label.toLowerCase()}`,
    emptyText: "No requests in this range.",
    rows: items,
    columns: [
      { label, value: name },
      { label: "Requests", value: bar },
      { label: "Errors", class: "num", value: (t) => fmtInt(t.errors) },
      { label: "Input tokens", class: "num", value: (t) => fmtInt(t.prompt_tokens) },
      { label: "Output tokens", class: "num", value: (t) => fmtInt(t.completion_tokens) },
      { label: "Total tokens", class: "num wide", value: (t) => fmtInt(t.total_tokens) },
      { label: "Cost", class: "num", value: (t) => fmtUsd(t.cost_usd) },
    ],
  });
}

export async function render(ctx) {
  const { api, org, query: q } = ctx;
  const body = h("div", {}, loading("Loading usage…"));
  add(ctx.main, h("h1", {}, "Usage"), h("section", { class: "card filters" }, controls(ctx, q)), body);

  let range;
  try {
    range = chosenRange(q);
  } catch (e) {
    replace(body, errorBox(e));
    return;
  }
  let bucket = q.get("bucket") === "day" ? "day" : "hour";
  const covered = wholeHours(range);
  const adjusted = bucket === "hour" && covered.until - covered.since > MAX_HOURLY;
  if (adjusted) bucket = "day";
  const by = ["model", "provider", "key"].includes(q.get("by")) ? q.get("by") : "model";
  const params = { since: iso(range.since), until: iso(range.until) };
  const url = path`/admin/orgs/${org.id}/usage`;
  let series;
  let split;
  let keys = [];
  try {
    [series, split, keys] = await Promise.all([
      api.get(url, { ...params, group_by: bucket }),
      api.get(url, { ...params, group_by: by }),
      by === "key" ? api.get(path`/admin/orgs/${org.id}/keys`).then((d) => d.items, () => []) : [],
    ]);
  } catch (e) {
    replace(body, errorBox(e));
    return;
  }
  if (ctx.signal.aborted) return;
  // the range the totals are for, as the API reports it
  const since = iso(new Date(series.since || covered.since));
  const until = iso(new Date(series.until || covered.until));
  const buckets = bucketsOf(new Date(since), new Date(until), bucket);
  replace(
    body,
    adjusted ? notice("Hourly totals cover at most 31 days: shown by day.", "info") : null,
    h(
      "p",
      { class: "range", id: "usage-range", "data-since": since, "data-until": until },
      `${fmtTime(since)} → ${fmtTime(until)} UTC`,
    ),
    totalsView(series.items),
    h(
      "p",
      { class: "hint" },
      "The same totals from the command line: ",
      h("code", {}, `lectr usage ${org.id} --since ${since} --until ${until} --by ${bucket}`),
    ),
    charts(buckets, series.items),
    h("h2", {}, `By ${by === "key" ? "Lectr key" : by}`),
    breakdown(split.items, by, new Map(keys.map((k) => [k.id, k.name]))),
  );
}
