// Organizations: status, requests and spend this month, the kill switch,
// and creating one (its first Lectr key is shown once).

import { path } from "../api.js";
import { add, fmtInt, fmtUsd, h, replace } from "../dom.js";
import { confirm, errorBox, field, form, notice, section, showOnce, table, toggle } from "../ui.js";

export const title = "Organizations";

function monthStart(now = new Date()) {
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1)).toISOString();
}

export async function setEnabled(ctx, org, enabled, status) {
  const verb = enabled ? "Enable" : "Disable";
  const confirmed = await confirm({
    title: `${verb} ${org.name}?`,
    message: enabled
      ? `Every active Lectr key of ${org.name} works again, on every node within a second.`
      : `Every Lectr key of ${org.name} is refused (403) on every node within a second. Requests in flight finish.`,
    action: verb,
    danger: !enabled,
  });
  if (!confirmed) return null;
  try {
    const updated = await ctx.api.put(path`/admin/orgs/${org.id}/enabled`, { enabled });
    replace(status, notice(`${updated.name} is ${updated.enabled ? "enabled" : "disabled"}.`));
    return updated;
  } catch (e) {
    replace(status, errorBox(e));
    return null;
  }
}

function orgTable(ctx, orgs, usage, status, reload) {
  const byOrg = new Map((usage?.items || []).map((t) => [t.key, t]));
  const monthly = (org, name, format) =>
    usage ? format(byOrg.get(org.id)?.[name] ?? (name === "requests" ? 0 : null)) : "—";
  const writable = (org) => ctx.me.is_admin || org.role === "owner" || org.role === "admin";
  return table({
    caption: "Organizations",
    emptyText: "No organization yet: create one below.",
    rows: orgs,
    rowProps: (org) => ({ "data-org": org.id }),
    columns: [
      { label: "Name", value: (org) => h("a", { href: `#/orgs/${encodeURIComponent(org.id)}` }, org.name) },
      {
        label: "Status",
        class: "wide",
        value: (org) =>
          h("span", { class: ["badge", org.enabled ? "ok" : "off"] }, org.enabled ? "enabled" : "disabled"),
      },
      {
        label: "Kill switch",
        value: (org) =>
          writable(org)
            ? toggle({
                label: `${org.name}: requests allowed`,
                checked: org.enabled,
                class: "switch kill-switch",
                onChange: async (enabled) => {
                  if (await setEnabled(ctx, org, enabled, status)) reload();
                },
              })
            : "—",
      },
      { label: "Requests this month", class: "num", value: (org) => monthly(org, "requests", fmtInt) },
      { label: "Spend this month", class: "num", value: (org) => monthly(org, "cost_usd", fmtUsd) },
      { label: "Your role", class: "wide", value: (org) => org.role || (ctx.me.is_admin ? "global admin" : "—") },
    ],
  });
}

function createForm(ctx, reload) {
  return form({
    label: "Create an organization",
    submit: "Create",
    controls: [field({ label: "Name", name: "name", required: true, maxlength: 200, autocomplete: "off" })],
    onSubmit: async ({ name }, el) => {
      const created = await ctx.api.post("/admin/orgs", { name: name.trim() });
      el.reset();
      reload();
      return h(
        "div",
        {},
        notice(`Created ${created.org.name}.`),
        showOnce(created.key),
        h("p", {}, h("a", { href: `#/orgs/${encodeURIComponent(created.org.id)}` }, `Open ${created.org.name}`)),
      );
    },
  });
}

export async function render(ctx) {
  const list = h("div", { id: "org-list" });
  const status = h("div", { "aria-live": "polite" });
  const reload = () =>
    section(
      list,
      async () => {
        const [orgs, usage] = await Promise.all([
          ctx.api.get("/admin/orgs"),
          ctx.api.get("/admin/usage", { since: monthStart() }).catch((e) => ({ failed: e })),
        ]);
        return { orgs: orgs.items, usage };
      },
      ({ orgs, usage }) => [
        usage.failed ? errorBox(usage.failed, "Usage this month is unavailable: ") : null,
        orgTable(ctx, orgs, usage.failed ? null : usage, status, reload),
      ],
    );
  add(ctx.main, 
    h("h1", {}, "Organizations"),
    status,
    list,
    h("section", { class: "card", "aria-labelledby": "create-org" }, h("h2", { id: "create-org" }, "Create an organization"), createForm(ctx, reload)),
  );
  await reload();
}
