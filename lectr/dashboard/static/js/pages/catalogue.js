// The provider catalogue: built-in and custom providers. Global admins add,
// replace and delete custom ones (a vLLM, an Ollama, a private endpoint);
// everyone else reads it. Also the provider choices of the other pages.

import { path } from "../api.js";
import { add, fmtTime, h, replace } from "../dom.js";
import { button, confirm, errorBox, field, form, notice, section, table } from "../ui.js";

export const title = "Providers";

/** [value, text] options for a provider select. */
export function providerOptions(providers) {
  return providers.map((p) => [p.name, p.display_name && p.display_name !== p.name ? `${p.name} (${p.display_name})` : p.name]);
}

const AUTH = [
  ["bearer", "bearer (Authorization)"],
  ["x-api-key", "x-api-key"],
  ["api-key", "api-key"],
];

function baseUrl(p) {
  if (p.base_url) return h("code", {}, p.base_url);
  return p.key_base_url ? h("span", { class: "hint" }, "each key names its own") : "—";
}

function editor(ctx, current, done) {
  const editing = Boolean(current);
  const p = current || { name: "", display_name: "", dialect: "openai", base_url: "", auth: "bearer", models_path: "/v1/models" };
  return form({
    label: editing ? `Replace ${p.name}` : "Add a custom provider",
    submit: editing ? `Save ${p.name}` : "Add provider",
    controls: [
      field({
        label: "Name",
        name: "name",
        value: p.name,
        required: true,
        readonly: editing,
        pattern: "[a-z][a-z0-9\\-]{1,31}",
        maxlength: 32,
        autocomplete: "off",
        spellcheck: "false",
        hint: "2 to 32 lower-case letters, digits and '-': clients call /<name>/v1/…",
      }),
      field({ label: "Display name (optional)", name: "display_name", value: p.display_name === p.name ? "" : p.display_name, maxlength: 200 }),
      field({
        label: "Dialect",
        name: "dialect",
        hint: "openai: OpenAI-compatible servers (vLLM, Ollama…).",
        kind: "select",
        value: p.dialect,
        options: [
          ["openai", "openai"],
          ["anthropic", "anthropic"],
        ],
      }),
      field({
        label: "Base URL",
        name: "base_url",
        kind: "url",
        value: p.base_url || "",
        required: true,
        maxlength: 2048,
        spellcheck: "false",
        placeholder: "http://vllm.internal:8000",
        hint: "What comes before /v1 (not ending in /v1).",
      }),
      field({ label: "Key header", name: "auth", kind: "select", value: p.auth || "bearer", options: AUTH, hint: "How the provider's key is sent." }),
      field({
        label: "Models path",
        name: "models_path",
        value: p.models_path || "/v1/models",
        required: true,
        maxlength: 200,
        spellcheck: "false",
        hint: "Where Lectr checks a new key.",
      }),
    ],
    onSubmit: async (values) => {
      const body = {
        dialect: values.dialect,
        base_url: values.base_url.trim(),
        auth: values.auth,
        models_path: values.models_path.trim(),
      };
      if (values.display_name.trim()) body.display_name = values.display_name.trim();
      const name = values.name.trim();
      const saved = editing
        ? await ctx.api.put(path`/admin/providers/${name}`, body)
        : await ctx.api.post("/admin/providers", { name, ...body });
      done(`${editing ? "Saved" : "Added"} ${saved.name}: served on /${saved.name}/v1/… by every node within a second.`);
    },
  });
}

export async function render(ctx) {
  const admin = Boolean(ctx.me.is_admin);
  const list = h("div");
  const status = h("div", { "aria-live": "polite" });
  const formBox = h("div");

  function showForm(current = null) {
    const heading = current ? `Replace ${current.name}` : "Add a custom provider";
    const cancel = current ? button("Cancel", () => showForm()) : null;
    replace(
      formBox,
      h(
        "section",
        { class: "card", "aria-labelledby": "provider-form" },
        h("h2", { id: "provider-form" }, heading),
        editor(ctx, current, (text) => {
          replace(status, notice(text));
          showForm();
          reload();
          status.scrollIntoView({ block: "nearest" });
          formBox.querySelector("input[name=name]")?.focus({ preventScroll: true });
        }),
        cancel,
      ),
    );
    if (current) formBox.querySelector("input:not([readonly]), select")?.focus();
  }

  async function remove(p) {
    const yes = await confirm({
      title: `Delete ${p.name}?`,
      message: `/${p.name}/v1/… stops being served on every node. Lectr refuses while provider keys or routes still use it.`,
      action: "Delete",
      danger: true,
    });
    if (!yes) return;
    try {
      await ctx.api.del(path`/admin/providers/${p.name}`);
      replace(status, notice(`Deleted ${p.name}.`));
    } catch (e) {
      replace(status, errorBox(e));
    }
    reload();
  }

  const reload = () =>
    section(
      list,
      () => ctx.api.get("/admin/providers"),
      (doc) =>
        table({
          caption: "Providers",
          rows: doc.items,
          rowProps: (p) => ({ "data-catalogue": p.name }),
          columns: [
            { label: "Name", value: (p) => h("code", {}, p.name) },
            { label: "Display name", class: "wide", value: (p) => p.display_name },
            { label: "Kind", value: (p) => h("span", { class: ["badge", p.custom ? "warn" : ""] }, p.custom ? "custom" : "built-in") },
            { label: "Dialect", value: (p) => p.dialect },
            { label: "Base URL", value: baseUrl },
            { label: "Key header", class: "wide", value: (p) => p.auth || "—" },
            { label: "Updated (UTC)", class: "wide", value: (p) => (p.updated_at ? fmtTime(p.updated_at) : "—") },
            admin && {
              label: "Actions",
              value: (p) =>
                p.custom
                  ? h(
                      "span",
                      { class: "row-actions" },
                      button("Edit", () => showForm(p), { kind: "small", "aria-label": `Edit ${p.name}` }),
                      button("Delete", () => remove(p), { kind: "danger small", "aria-label": `Delete ${p.name}` }),
                    )
                  : "",
            },
          ].filter(Boolean),
        }),
    );

  add(
    ctx.main,
    h("h1", {}, "Providers"),
    h(
      "p",
      { class: "hint" },
      "Every provider Lectr can send traffic to, on /<name>/v1/… and as <name>/<model> on /v1. ",
      admin
        ? "Custom providers are yours to add; built-in ones change with LECTR_<NAME>_BASE_URL."
        : "Global admins manage this list.",
    ),
    status,
    list,
    formBox,
  );
  if (admin) showForm();
  await reload();
}
