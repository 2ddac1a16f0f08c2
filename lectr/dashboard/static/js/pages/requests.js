// The org's request log: newest first, live (new rows appear without a
// reload), filters kept in the address (#/orgs/<id>/requests?model=…),
// keyset pagination ("Load older"), a link to each request's detail.

import { path } from "../api.js";
import { add, fmtInt, fmtMs, fmtTime, fmtUsd, h, orDash, replace } from "../dom.js";
import { appendRows, button, errorBox, field, form, loading, notice, tableRow } from "../ui.js";

export const title = "Requests";

const FIRST_PAGE = 100;
const OLDER_PAGE = 200;
const LIVE_PAGE = 200;
const POLL_MS = 1500;
const LIVE_MAX = 1000; // rows added live before the page starts again from the newest
const FILTERS = ["provider", "model", "status", "key_id", "since", "until"];

let listHref = null; // the list with its filters, for the detail page's "back"
export const lastListHref = () => listHref;

const STATUSES = [
  ["", "any"],
  ["error", "errors (400 and above)"],
  ["2xx", "2xx"],
  ["4xx", "4xx"],
  ["5xx", "5xx"],
  ["429", "429 (rate limited)"],
  ["499", "499 (client went away)"],
];

function statusBadge(status) {
  const kind = status >= 500 ? "bad" : status >= 400 ? "warn" : "ok";
  return h("span", { class: ["badge", kind] }, String(status));
}

function columns(ctx, keyNames) {
  const detail = (r) => `#/orgs/${encodeURIComponent(ctx.org.id)}/requests/${encodeURIComponent(r.request_id)}`;
  return [
    {
      label: "Time (UTC)",
      value: (r) => {
        const time = fmtTime(r.created_at);
        // the year is hidden on narrow screens
        return h("a", { href: detail(r), "aria-label": `Request at ${time} (details)` }, h("span", { class: "year" }, time.slice(0, 5)), time.slice(5));
      },
    },
    { label: "Status", value: (r) => statusBadge(r.status) },
    { label: "Provider", class: "wide", value: (r) => r.provider },
    { label: "Model", value: (r) => orDash(r.model) },
    // hidden (table.no-routes) until a row has a route
    { label: "Route", class: "route-col", value: (r) => orDash(r.route, (v) => h("code", {}, v)) },
    { label: "Key", class: "wide", value: (r) => (r.key_id ? keyNames.get(r.key_id) || r.key_id.slice(0, 8) : "—") },
    { label: "Latency", class: "num", value: (r) => fmtMs(r.latency_ms) },
    { label: "Input tokens", class: "num wide", value: (r) => fmtInt(r.prompt_tokens) },
    { label: "Output tokens", class: "num wide", value: (r) => fmtInt(r.completion_tokens) },
    { label: "Cost", class: "num wide", value: (r) => fmtUsd(r.cost_usd) },
  ];
}

function filterForm(ctx, providers, keys) {
  const q = ctx.query;
  return form({
    label: "Filter requests",
    submit: "Apply filters",
    kind: "",
    controls: [
      field({
        label: "Provider",
        name: "provider",
        kind: "select",
        value: q.get("provider") || "",
        options: [["", "any"], ...providers.map((p) => [p, p])],
      }),
      field({ label: "Model", name: "model", value: q.get("model") || "", maxlength: 256, autocomplete: "off" }),
      field({ label: "Status", name: "status", kind: "select", value: q.get("status") || "", options: STATUSES }),
      field({
        label: "Lectr key",
        name: "key_id",
        kind: "select",
        value: q.get("key_id") || "",
        options: [["", "any"], ...keys.map((k) => [k.id, `${k.name} (${k.prefix}…)${k.active ? "" : " revoked"}`])],
      }),
      field({ label: "Since (UTC)", name: "since", kind: "datetime-local", value: q.get("since") || "" }),
      field({ label: "Until (UTC)", name: "until", kind: "datetime-local", value: q.get("until") || "" }),
    ],
    onSubmit: (values) => {
      const chosen = Object.fromEntries(FILTERS.filter((f) => values[f]).map((f) => [f, values[f]]));
      ctx.navigate(`/orgs/${ctx.org.id}/requests`, chosen);
    },
  });
}

export async function render(ctx) {
  const { api, org } = ctx;
  const filters = Object.fromEntries(FILTERS.filter((f) => ctx.query.get(f)).map((f) => [f, ctx.query.get(f)]));
  listHref = ctx.href(`/orgs/${org.id}/requests`, filters);
  const url = path`/admin/orgs/${org.id}/requests`;

  const body = h("div", { class: "requests-body" }, loading("Loading requests…"));
  const filterBox = h("details", { class: "card filters", open: Object.keys(filters).length > 0 }, h("summary", {}, "Filters"));
  const liveBox = h("input", { type: "checkbox", id: "live", checked: !filters.until });
  const liveState = h("span", { class: "live-state" });
  const announce = h("span", { class: "sr-only", role: "status" });
  add(ctx.main, 
    h("h1", {}, "Requests"),
    filterBox,
    h("div", { class: "toolbar" }, h("label", { for: "live", class: "check" }, liveBox, " Live"), liveState, announce),
    body,
  );

  const [first, keys, providers] = await Promise.all([
    api.get(url, { ...filters, limit: FIRST_PAGE }).catch((e) => ({ failed: e })),
    api.get(path`/admin/orgs/${org.id}/keys`).then((d) => d.items, () => []),
    api.get(path`/admin/orgs/${org.id}/providers`).then((d) => d.items.map((p) => p.provider), () => []),
  ]);
  if (ctx.signal.aborted) return;
  filterBox.append(filterForm(ctx, providers, keys));
  if (first.failed) {
    replace(body, errorBox(first.failed));
    return;
  }

  const cols = columns(ctx, new Map(keys.map((k) => [k.id, k.name])));
  const tbody = h("tbody");
  const seen = new Set();
  let nextCursor = first.next_cursor;
  let liveCursors = [first.live_cursor];
  const emptyText = h(
    "p",
    { class: "state empty" },
    Object.keys(filters).length
      ? "No request matches these filters."
      : "No requests yet. Requests made with a Lectr key of this organization appear here within a couple of seconds.",
  );
  const more = button("Load older", loadOlder, { id: "load-older" });
  const moreStatus = h("span", { role: "status" });
  const count = h("p", { class: "hint", id: "row-count" });
  const rowProps = (r) => ({ "data-request": r.request_id, "data-created": r.created_at });

  function refreshChrome() {
    emptyText.hidden = seen.size > 0;
    more.hidden = !nextCursor;
    count.textContent = `${fmtInt(seen.size)} request${seen.size === 1 ? "" : "s"} shown${nextCursor ? "; older ones below" : ""}.`;
  }

  const grid = h("table", { id: "requests", class: "no-routes" });
  function showRoutes(rows) {
    if (rows.some((r) => r.route)) grid.classList.remove("no-routes");
  }

  function addRows(rows) {
    const fresh = rows.filter((r) => !seen.has(r.request_id));
    fresh.forEach((r) => seen.add(r.request_id));
    appendRows(tbody, cols, fresh, rowProps);
    showRoutes(fresh);
  }

  async function loadOlder() {
    more.disabled = true;
    replace(moreStatus, "Loading…");
    try {
      const page = await api.get(url, { ...filters, limit: OLDER_PAGE, cursor: nextCursor });
      addRows(page.items);
      nextCursor = page.next_cursor;
      replace(moreStatus);
      performance.mark("lectr:requests:older-rendered");
    } catch (e) {
      replace(moreStatus, errorBox(e));
    } finally {
      more.disabled = false;
      refreshChrome();
    }
  }

  /** A row from the live poll, placed by time among those shown. */
  function place(row) {
    const el = tableRow(cols, row, rowProps);
    el.classList.add("fresh");
    for (const existing of tbody.rows) {
      if (existing.dataset.created < row.created_at) {
        existing.before(el);
        return true;
      }
    }
    if (nextCursor) return false; // older than what is loaded: it comes with "Load older"
    tbody.append(el);
    return true;
  }

  addRows(first.items);
  replace(
    body,
    emptyText,
    h(
      "div",
      { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Requests, newest first" },
      add(
        grid,
        h("caption", { class: "sr-only" }, "Requests, newest first"),
        h("thead", {}, h("tr", {}, cols.map((c) => h("th", { scope: "col", class: c.class }, c.label)))),
        tbody,
      ),
    ),
    h("div", { class: "pager" }, more, moreStatus),
    count,
  );
  refreshChrome();
  performance.mark("lectr:requests:first-render");

  // --- live updates: poll with the cursor of the poll before the last one,
  // so a row committed late by another node is still picked up once
  let timer = null;
  let failures = 0;
  let addedLive = 0;
  async function poll() {
    timer = null;
    if (ctx.signal.aborted || !liveBox.checked) return;
    if (!document.hidden) {
      try {
        const page = await api.get(url, { ...filters, limit: LIVE_PAGE, after: liveCursors[0] });
        if (ctx.signal.aborted) return;
        if (page.items.length === LIVE_PAGE || addedLive > LIVE_MAX) {
          ctx.refresh(); // a burst, or a page grown long: start again from the newest rows
          return;
        }
        liveCursors = [...liveCursors, page.live_cursor].slice(-2);
        const fresh = page.items.filter((r) => !seen.has(r.request_id)).reverse();
        let shown = 0;
        for (const row of fresh) {
          if (place(row)) {
            showRoutes([row]);
            seen.add(row.request_id);
            shown += 1;
            addedLive += 1;
          }
        }
        if (shown) announce.textContent = `${shown} new request${shown === 1 ? "" : "s"}`;
        failures = 0;
        replace(liveState, `checked ${new Date().toISOString().slice(11, 19)} UTC`);
        refreshChrome();
      } catch (e) {
        if (e.status === 401 || ctx.signal.aborted) return;
        failures += 1;
        replace(liveState, notice(`Live updates paused: ${e.message} Retrying…`, "error"));
      }
    }
    schedule();
  }
  function schedule() {
    if (timer === null && liveBox.checked && !ctx.signal.aborted) {
      timer = setTimeout(poll, Math.min(POLL_MS * 2 ** failures, 15000));
    }
  }
  liveBox.addEventListener("change", () => {
    if (liveBox.checked) schedule();
    else replace(liveState, "paused");
  });
  ctx.onDispose(() => clearTimeout(timer));
  if (liveBox.checked) schedule();
  else replace(liveState, "paused");
}
