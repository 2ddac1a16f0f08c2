// Providers and models: enable or disable a provider, allow or block
// models (exact names or "prefix*" patterns).

import { path } from "../api.js";
import { add, fmtTime, h } from "../dom.js";
import { field, fields, form, notice, section } from "../ui.js";

export const title = "Providers & models";

const lines = (text) =>
  text
    .split(/[\n,]/)
    .map((s) => s.trim())
    .filter(Boolean);

const list = (models, none) => (models.length ? models.join(", ") : none);

function readOnly(p) {
  return fields([
    ["Enabled", p.enabled ? "yes" : "no"],
    ["Allowed models", list(p.allowed_models, "every model")],
    ["Blocked models", list(p.blocked_models, "none")],
  ]);
}

function editor(ctx, p) {
  return form({
    label: `${p.provider} settings`,
    submit: `Save ${p.provider}`,
    controls: [
      field({ label: "Enabled", name: "enabled", kind: "checkbox", value: p.enabled }),
      field({
        label: "Allowed models",
        name: "allowed",
        kind: "textarea",
        value: p.allowed_models.join("\n"),
        hint: "One per line; 'prefix*' patterns work. Empty: every model is allowed.",
      }),
      field({
        label: "Blocked models",
        name: "blocked",
        kind: "textarea",
        value: p.blocked_models.join("\n"),
        hint: "One per line; checked after the allowed list.",
      }),
    ],
    onSubmit: async ({ enabled, allowed, blocked }) => {
      await ctx.api.put(path`/admin/orgs/${ctx.org.id}/providers/${p.provider}`, {
        enabled,
        allowed_models: lines(allowed),
        blocked_models: lines(blocked),
      });
      return notice(`Saved ${p.provider}: effective within a second.`);
    },
  });
}

export async function render(ctx) {
  const body = h("div");
  add(ctx.main, h("h1", {}, "Providers & models"), body);
  await section(
    body,
    () => ctx.api.get(path`/admin/orgs/${ctx.org.id}/providers`),
    (doc) =>
      doc.items.map((p) =>
        h(
          "section",
          { class: "card", "aria-labelledby": `provider-${p.provider}`, "data-provider": p.provider },
          h("h2", { id: `provider-${p.provider}` }, p.provider),
          h("p", { class: "hint" }, p.updated_at ? `Changed ${fmtTime(p.updated_at)} UTC` : "Defaults (never changed)"),
          ctx.access.write ? editor(ctx, p) : readOnly(p),
        ),
      ),
  );
}
