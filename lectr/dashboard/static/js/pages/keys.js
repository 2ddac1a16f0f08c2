// Lectr keys: create (shown once, with a copy button), revoke, rotate all.

import { path } from "../api.js";
import { add, fmtTime, h, replace } from "../dom.js";
import { button, confirm, errorBox, field, form, section, showOnce, table } from "../ui.js";

export const title = "Lectr keys";

export async function render(ctx) {
  const { org, access, api } = ctx;
  const list = h("div");
  const shown = h("div", { "aria-live": "polite" });
  const reload = () =>
    section(
      list,
      () => api.get(path`/admin/orgs/${org.id}/keys`),
      (doc) =>
        table({
          caption: "Lectr keys",
          emptyText: "This organization has no Lectr key.",
          rows: doc.items,
          rowProps: (key) => ({ "data-key": key.id }),
          columns: [
            { label: "Name", value: (k) => k.name },
            { label: "Prefix", value: (k) => h("code", {}, `${k.prefix}…`) },
            {
              label: "Status",
              value: (k) =>
                k.active
                  ? h("span", { class: "badge ok" }, "active")
                  : h("span", { class: "badge off" }, `revoked ${fmtTime(k.revoked_at)}`),
            },
            { label: "Created (UTC)", value: (k) => fmtTime(k.created_at) },
            access.write && {
              label: "Actions",
              value: (k) => (k.active ? button("Revoke", () => revoke(k), { kind: "danger small" }) : ""),
            },
          ].filter(Boolean),
        }),
    );

  async function revoke(key) {
    const yes = await confirm({
      title: `Revoke “${key.name}”?`,
      message: `Requests with ${key.prefix}… are refused (401) at once, on every node.`,
      action: "Revoke",
      danger: true,
    });
    if (!yes) return;
    try {
      await api.del(path`/admin/orgs/${org.id}/keys/${key.id}`);
      replace(shown);
    } catch (e) {
      replace(shown, errorBox(e));
    }
    reload();
  }

  async function rotate() {
    const yes = await confirm({
      title: "Rotate every key?",
      message: `Every Lectr key of ${org.name} is revoked at once and one new key is issued.`,
      action: "Rotate",
      danger: true,
    });
    if (!yes) return;
    try {
      replace(shown, showOnce(await api.post(path`/admin/orgs/${org.id}/rotate-key`, { name: "default" })));
    } catch (e) {
      replace(shown, errorBox(e));
    }
    reload();
  }

  add(ctx.main, h("h1", {}, "Lectr keys"), shown, list);
  if (access.write) {
    add(ctx.main, 
      h(
        "section",
        { class: "card", "aria-labelledby": "new-key" },
        h("h2", { id: "new-key" }, "New key"),
        form({
          label: "Create a Lectr key",
          submit: "Create key",
          controls: [field({ label: "Key name", name: "name", required: true, maxlength: 200, value: "default" })],
          onSubmit: async ({ name }) => {
            const issued = await api.post(path`/admin/orgs/${org.id}/keys`, { name: name.trim() });
            replace(shown, showOnce(issued));
            reload();
            shown.querySelector("button")?.focus();
          },
        }),
      ),
      h(
        "section",
        { class: "card", "aria-labelledby": "rotate-keys" },
        h("h2", { id: "rotate-keys" }, "Rotate"),
        h("p", {}, "Revoke every key of the organization and issue a new one (after a leak)."),
        button("Rotate all keys", rotate, { kind: "danger" }),
      ),
    );
  }
  await reload();
}
