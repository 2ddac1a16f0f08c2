// One request: ids, timings, tokens, cost, and the route and attempts when
// the API reports them. Fields this page does not know are shown as they
// come, so new ones appear without a change here.

import { path } from "../api.js";
import { add, DASH, fmtInt, fmtMs, fmtTime, fmtUsd, h, orDash, present } from "../dom.js";
import { errorBox, fields, loading, table } from "../ui.js";
import { lastListHref } from "./requests.js";

export const title = "Request";

const yesNo = (v) => orDash(v, (x) => (x ? "yes" : "no"));

function value(v) {
  if (!present(v)) return DASH;
  if (Array.isArray(v) && v.length && v.every((x) => x && typeof x === "object")) {
    const names = [...new Set(v.flatMap((x) => Object.keys(x)))];
    return h(
      "div",
      { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Details" },
      h(
        "table",
        {},
        h("thead", {}, h("tr", {}, names.map((n) => h("th", { scope: "col" }, n)))),
        h("tbody", {}, v.map((x) => h("tr", {}, names.map((n) => h("td", {}, value(x[n])))))),
      ),
    );
  }
  if (typeof v === "object") return h("code", {}, JSON.stringify(v));
  return String(v);
}

function providerKeyText(id, key) {
  return key ? `${key.name} (${key.provider} …${key.last4})` : id;
}

function attemptsText(n, fallbacks) {
  if (n === 0) return "0 (refused before any upstream call)";
  const abandoned = fallbacks?.length || 0;
  return abandoned ? `${n} (${abandoned} abandoned)` : String(n);
}

/** Every upstream call of the request: the abandoned ones, then the one that answered. */
function attemptTable(r, providerKey) {
  const rows = (r.fallbacks || []).map((f, i) => ({ ...f, attempt: f.attempt ?? i + 1, outcome: "abandoned" }));
  if (r.attempts > 0) {
    const key = providerKey(r.provider_key_id);
    rows.push({
      attempt: r.attempts,
      provider: r.provider,
      model: r.model,
      key: key ? key.name : r.provider_key_id,
      reason: null,
      status: r.status,
      outcome: r.status < 400 ? "answered" : "last attempt",
    });
  }
  return table({
    caption: "Attempts",
    emptyText: "No upstream call was made.",
    rows,
    rowProps: (a) => ({ "data-attempt": a.attempt, "data-outcome": a.outcome }),
    columns: [
      { label: "#", class: "num", value: (a) => String(a.attempt) },
      { label: "Provider", value: (a) => a.provider },
      { label: "Model", value: (a) => orDash(a.model, (m) => h("code", {}, m)) },
      { label: "Key", value: (a) => orDash(a.key) },
      { label: "Outcome", value: (a) => h("span", { class: ["badge", a.outcome === "answered" ? "ok" : "warn"] }, a.outcome) },
      { label: "Reason", value: (a) => orDash(a.reason) },
      { label: "Status", class: "num", value: (a) => orDash(a.status) },
    ],
  });
}

function groups(r, keyName, providerKey) {
  return [
    [
      "Call",
      [
        ["request_id", "Request id", (v) => h("code", {}, v)],
        ["created_at", "Time (UTC)", fmtTime],
        ["status", "Status", String],
        ["error_type", "Error", orDash],
        ["method", "Method", String],
        ["path", "Provider path", (v) => h("code", {}, v)],
        ["streamed", "Streamed", yesNo],
      ],
    ],
    [
      "Routing",
      [
        ["provider", "Provider", String],
        ["model", "Model", orDash],
        ["key_id", "Lectr key", (v) => (v ? `${keyName(v) || "?"} (${v})` : DASH)],
        ["route", "Route", (v) => h("code", {}, v)],
        ["provider_key_id", "Provider key", (v) => providerKeyText(v, providerKey(v))],
        ["attempts", "Attempts", (v) => attemptsText(v, r.fallbacks)],
      ],
    ],
    [
      "Timing",
      [
        ["latency_ms", "Latency", fmtMs],
        ["ttfb_ms", "Time to first byte", fmtMs],
      ],
    ],
    [
      "Usage",
      [
        ["prompt_tokens", "Input tokens", fmtInt],
        ["completion_tokens", "Output tokens", fmtInt],
        ["total_tokens", "Total tokens", fmtInt],
        ["cached_tokens", "Cached input tokens", fmtInt],
        ["cache_creation_tokens", "Cache-write tokens", fmtInt],
        ["web_search_requests", "Web searches", fmtInt],
        ["service_tier", "Service tier", orDash],
        ["usage_source", "Usage source", orDash],
        ["cost_usd", "Cost", fmtUsd],
      ],
    ],
  ];
}

export async function render(ctx) {
  const { api, org, params } = ctx;
  const back = h("a", { href: lastListHref() || `#/orgs/${encodeURIComponent(org.id)}/requests` }, "← All requests");
  const body = h("div", {}, loading());
  add(ctx.main, h("p", {}, back), h("h1", {}, "Request"), body);
  let r;
  let keys = [];
  let providerKeys = [];
  try {
    [r, keys, providerKeys] = await Promise.all([
      api.get(path`/admin/orgs/${org.id}/requests/${params.request}`),
      api.get(path`/admin/orgs/${org.id}/keys`).then((d) => d.items, () => []),
      api.get(path`/admin/orgs/${org.id}/provider-keys`).then((d) => d.items, () => []),
    ]);
  } catch (e) {
    body.replaceChildren(errorBox(e));
    return;
  }
  const keyName = (id) => keys.find((k) => k.id === id)?.name;
  const providerKey = (id) => providerKeys.find((k) => k.id === id);
  const known = new Set(["fallbacks"]);
  const sections = groups(r, keyName, providerKey).map(([heading, rows]) => {
    rows.forEach(([name]) => known.add(name));
    return h(
      "section",
      { class: "card" },
      h("h2", {}, heading),
      fields(rows.map(([name, label, format]) => [label, present(r[name]) ? format(r[name]) : DASH])),
    );
  });
  const extra = Object.keys(r).filter((name) => !known.has(name));
  if (extra.length) {
    sections.push(
      h("section", { class: "card" }, h("h2", {}, "More"), fields(extra.map((name) => [name, value(r[name])]))),
    );
  }
  const attempts =
    r.route || r.fallbacks?.length || r.attempts > 1
      ? h("section", { class: "card", id: "attempts" }, h("h2", {}, "Attempts"), attemptTable(r, providerKey))
      : null;
  body.replaceChildren(h("div", { class: "detail-grid" }, sections), attempts);
}
