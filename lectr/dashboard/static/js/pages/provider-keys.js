// Provider keys (BYOK): add (checked with the provider first; its refusal
// is shown), delete. Only the last four characters are ever shown.

import { path } from "../api.js";
import { add, fmtTime, h, replace } from "../dom.js";
import { button, confirm, errorBox, field, form, notice, section, table } from "../ui.js";

export const title = "Provider keys";

export async function render(ctx) {
  const { org, access, api } = ctx;
  const list = h("div");
  const status = h("div", { "aria-live": "polite" });
  const reload = () =>
    section(
      list,
      () => api.get(path`/admin/orgs/${org.id}/provider-keys`),
      (doc) =>
        table({
          caption: "Provider keys",
          emptyText: "No provider key yet: requests to a provider are refused (403) until one is added.",
          rows: doc.items,
          rowProps: (k) => ({ "data-provider-key": k.id }),
          columns: [
            { label: "Provider", value: (k) => k.provider },
            { label: "Name", value: (k) => k.name },
            { label: "Key", value: (k) => h("code", {}, `…${k.last4}`) },
            { label: "Created (UTC)", value: (k) => fmtTime(k.created_at) },
            access.write && {
              label: "Actions",
              value: (k) => button("Delete", () => remove(k), { kind: "danger small" }),
            },
          ].filter(Boolean),
        }),
    );

  async function remove(key) {
    const yes = await confirm({
      title: `Delete the ${key.provider} key …${key.last4}?`,
      message: "Requests to this provider fail (403) unless the organization has another key for it.",
      action: "Delete",
      danger: true,
    });
    if (!yes) return;
    try {
      await api.del(path`/admin/orgs/${org.id}/provider-keys/${key.id}`);
      replace(status, notice(`Deleted the ${key.provider} key …${key.last4}.`));
    } catch (e) {
      replace(status, errorBox(e));
    }
    reload();
  }

  add(ctx.main, h("h1", {}, "Provider keys"), status, list);
  if (access.write) {
    const providers = await api.get(path`/admin/orgs/${org.id}/providers`);
    add(ctx.main, 
      h(
        "section",
        { class: "card", "aria-labelledby": "add-provider-key" },
        h("h2", { id: "add-provider-key" }, "Add a provider key"),
        h("p", { class: "hint" }, "Lectr checks the key with the provider before storing it, encrypted."),
        form({
          label: "Add a provider key",
          submit: "Check and add",
          busyText: "Checking the key with the provider…",
          controls: [
            field({
              label: "Provider",
              name: "provider",
              kind: "select",
              options: providers.items.map((p) => [p.provider, p.provider]),
            }),
            field({
              label: "API key",
              name: "key",
              kind: "password",
              required: true,
              minlength: 8,
              maxlength: 1024,
              autocomplete: "off",
              spellcheck: "false",
            }),
            field({ label: "Name (optional)", name: "name", maxlength: 200, autocomplete: "off" }),
          ],
          onSubmit: async ({ provider, key, name }, el) => {
            el.elements.key.value = ""; // never kept in the page
            const body = { provider, key: key.trim() };
            if (name.trim()) body.name = name.trim();
            let added;
            try {
              added = await api.post(path`/admin/orgs/${org.id}/provider-keys`, body);
            } catch (e) {
              throw new Error(`The key was not added: ${e.message}`);
            }
            el.elements.name.value = "";
            reload();
            return notice(`Added the ${added.provider} key …${added.last4}.`);
          },
        }),
      ),
    );
  }
  await reload();
}
