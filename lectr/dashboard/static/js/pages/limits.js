// Limits and budgets: the org's (shared by its keys) and each Lectr key's
// (on top of the org's), with what the nodes report for the current windows
// next to each cap. Empty means no limit.

import { path } from "../api.js";
import { add, fmtInt, fmtTime, fmtUsd, h, replace, uid } from "../dom.js";
import { errorBox, form, loading, notice, section, table } from "../ui.js";

export const title = "Limits";

const USAGE_REFRESH_MS = 5000;
const KEY_LOADS = 6; // key limits fetched at once

const USD_PATTERN = "[0-9]{1,10}(\\.[0-9]{1,6})?";
export const LIMITS = [
  { name: "rpm", label: "Requests per minute", short: "Requests/min", used: "requests_this_minute", usd: false, max: 1e9, window: "this minute (UTC)" },
  { name: "tpm", label: "Tokens per minute", short: "Tokens/min", used: "tokens_this_minute", usd: false, max: 1e12, window: "this minute (UTC)", wide: true },
  { name: "max_concurrent", label: "Concurrent requests", short: "Concurrent", used: "concurrent", usd: false, max: 1e6, window: "in flight now", wide: true },
  { name: "usd_per_day", label: "USD per day", short: "USD/day", used: "usd_today", usd: true, window: "today (UTC)" },
  { name: "usd_per_month", label: "USD per month", short: "USD/month", used: "usd_this_month", usd: true, window: "this month (UTC)", wide: true },
];

const fmt = (limit, value) => (limit.usd ? fmtUsd(value) : fmtInt(value));

/** "12 this minute (UTC)" and a bar when there is a cap. */
function usage(limit, doc) {
  const used = doc.usage?.[limit.used];
  const cap = doc[limit.name];
  // the nodes count only what a cap needs
  if (cap === null || cap === undefined) return h("span", { class: "used hint" }, "not counted without a cap");
  const text = `${fmt(limit, used ?? 0)} ${limit.window}`;
  const share = Math.min(1, Number(used ?? 0) / Number(cap));
  const fill = h("span", { class: ["bar-fill", share >= 1 ? "full" : share >= 0.8 ? "high" : ""] });
  fill.style.width = `${(share * 100).toFixed(1)}%`;
  return h(
    "span",
    { class: "bar-cell used" },
    h("span", { class: "bar", "aria-hidden": "true" }, fill),
    `${text} (${Math.round(share * 100)} %)`,
  );
}

/** The caps of one org or key: a table with an input per cap (writers) and the usage. */
function limitsCard(ctx, { heading, url, id, onSaved = () => {} }) {
  const card = h("section", { class: "card limits", "aria-labelledby": id, "data-limits": url });
  const body = h("div", {}, loading());
  const stamp = h("p", { class: "hint" });
  add(card, h("h2", { id }, heading), body, stamp);
  const usageCells = new Map();
  let timer = null;

  function showUsage(doc) {
    for (const limit of LIMITS) replace(usageCells.get(limit.name), usage(limit, doc));
    replace(stamp, `Usage as the nodes reported it at ${new Date().toISOString().slice(11, 19)} UTC`, doc.updated_at ? `; limits changed ${fmtTime(doc.updated_at)} UTC.` : "; no limit set yet.");
  }

  function rows(doc) {
    return LIMITS.map((limit) => {
      const cell = h("td", { class: "usage-cell" });
      usageCells.set(limit.name, cell);
      const inputId = uid(limit.name);
      const current = doc[limit.name];
      const cap = ctx.access.write
        ? h("input", {
            id: inputId,
            name: limit.name,
            class: "cap",
            value: current ?? "",
            placeholder: "none",
            autocomplete: "off",
            ...(limit.usd
              ? { type: "text", inputmode: "decimal", pattern: USD_PATTERN, maxlength: 17, title: "dollars, e.g. 50 or 12.50 (at most 6 decimals)" }
              : { type: "number", min: 1, max: limit.max, step: 1 }),
          })
        : current === null
          ? "no limit"
          : fmt(limit, current);
      return h(
        "tr",
        { "data-limit": limit.name },
        h("th", { scope: "row" }, ctx.access.write ? h("label", { for: inputId }, limit.label) : limit.label),
        h("td", { class: "cap-cell" }, cap),
        cell,
      );
    });
  }

  function show(doc) {
    usageCells.clear();
    const grid = h(
      "div",
      { class: "table-wrap", tabindex: "0", role: "region", "aria-label": heading },
      h(
        "table",
        {},
        h("caption", { class: "sr-only" }, heading),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Limit"), h("th", { scope: "col" }, ctx.access.write ? "Cap (empty: none)" : "Cap"), h("th", { scope: "col" }, "Used"))),
        h("tbody", {}, rows(doc)),
      ),
    );
    if (ctx.access.write) {
      replace(
        body,
        form({
          label: heading,
          submit: "Save limits",
          controls: [h("div", { class: "span-all" }, grid)],
          onSubmit: async (values) => {
            const update = {};
            for (const limit of LIMITS) {
              const raw = values[limit.name].trim();
              update[limit.name] = raw === "" ? null : limit.usd ? raw : Number(raw);
            }
            const saved = await ctx.api.put(url, update);
            for (const limit of LIMITS) body.querySelector(`[name=${limit.name}]`).value = saved[limit.name] ?? "";
            showUsage(saved);
            onSaved();
            return notice("Saved: effective on every node within a second.");
          },
        }),
      );
    } else {
      replace(body, grid);
    }
    showUsage(doc);
  }

  async function refresh() {
    timer = null;
    if (ctx.signal.aborted) return;
    if (!document.hidden) {
      try {
        showUsage(await ctx.api.get(url));
      } catch (e) {
        if (e.status === 401 || ctx.signal.aborted) return;
        replace(stamp, notice(`Usage not refreshed: ${e.message}`, "error"));
      }
    }
    timer = setTimeout(refresh, USAGE_REFRESH_MS);
  }
  ctx.onDispose(() => clearTimeout(timer));

  const loaded = (async () => {
    try {
      show(await ctx.api.get(url));
      timer = setTimeout(refresh, USAGE_REFRESH_MS);
    } catch (e) {
      replace(body, errorBox(e));
    }
  })();
  return { card, loaded };
}

/** Run load(item) for every item, at most n at once. */
async function pooled(items, n, load) {
  const out = new Array(items.length);
  let next = 0;
  async function worker() {
    while (next < items.length) {
      const i = next++;
      out[i] = await load(items[i]).catch((e) => ({ failed: e }));
    }
  }
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, worker));
  return out;
}

function keyCap(limit, doc) {
  if (doc.failed) return "?";
  const cap = doc[limit.name];
  if (cap === null) return "—";
  return h("span", {}, fmt(limit, cap), h("span", { class: "hint" }, ` (${fmt(limit, doc.usage?.[limit.used] ?? 0)} used)`));
}

export async function render(ctx) {
  const { org, api } = ctx;
  const keyId = ctx.query.get("key");
  const base = `/orgs/${org.id}/limits`;
  const keysBox = h("div");
  add(
    ctx.main,
    h("h1", {}, "Limits"),
    h(
      "p",
      { class: "hint" },
      "The organization's limits are shared by all of its keys; a key's own limits apply on top (a request must pass both). A refused request gets 429. Usage is what the nodes reported for the current windows (requests and tokens this minute, dollars today and this month).",
    ),
  );
  const orgCard = limitsCard(ctx, { heading: "Organization", url: path`/admin/orgs/${org.id}/limits`, id: "org-limits" });
  add(ctx.main, orgCard.card);
  const waits = [orgCard.loaded];

  const keys = await api.get(path`/admin/orgs/${org.id}/keys`).then((d) => d.items.filter((k) => k.active), (e) => ({ failed: e }));
  if (ctx.signal.aborted) return;
  if (keys.failed) {
    add(ctx.main, errorBox(keys.failed));
    await Promise.all(waits);
    return;
  }
  const chosen = keys.find((k) => k.id === keyId);
  if (keyId && !chosen) add(ctx.main, notice("That key is not an active key of this organization.", "error"));
  const reloadKeys = () =>
    section(
      keysBox,
      async () => {
        const docs = await pooled(keys, KEY_LOADS, (k) => api.get(path`/admin/orgs/${org.id}/keys/${k.id}/limits`));
        return keys.map((k, i) => ({ key: k, doc: docs[i] }));
      },
      (rows) =>
        table({
          caption: "Limits of each Lectr key",
          emptyText: "This organization has no active Lectr key.",
          rows,
          rowProps: ({ key }) => ({ "data-key-limits": key.id, "aria-current": key.id === keyId ? "true" : null }),
          columns: [
            { label: "Key", value: ({ key }) => h("span", {}, key.name, " ", h("code", { class: "hint wide-only" }, `${key.prefix}…`)) },
            ...LIMITS.map((limit) => ({ label: limit.short, class: limit.wide ? "num wide" : "num", value: ({ doc }) => keyCap(limit, doc) })),
            {
              label: "Limits",
              value: ({ key, doc }) =>
                doc.failed
                  ? errorBox(doc.failed)
                  : h(
                      "a",
                      { href: ctx.href(base, { key: key.id }), "aria-label": `${ctx.access.write ? "Edit" : "Show"} the limits of ${key.name}` },
                      ctx.access.write ? "Edit" : "Show",
                    ),
            },
          ],
        }),
    );
  if (chosen) {
    const keyCard = limitsCard(ctx, {
      heading: `Key ${chosen.name} (${chosen.prefix}…)`,
      url: path`/admin/orgs/${org.id}/keys/${chosen.id}/limits`,
      id: "key-limits",
      onSaved: reloadKeys,
    });
    add(keyCard.card, h("p", {}, h("a", { href: ctx.href(base) }, "Close")));
    add(ctx.main, keyCard.card);
    waits.push(keyCard.loaded);
  }
  add(ctx.main, h("section", { class: "card", "aria-labelledby": "key-limits-list" }, h("h2", { id: "key-limits-list" }, "Lectr keys"), keysBox));
  waits.push(reloadKeys());
  await Promise.all(waits);
  if (chosen) document.getElementById("key-limits")?.scrollIntoView({ block: "start" });
}
