// Provider keys (BYOK) and their pools: add (checked with the provider
// first; its refusal is shown), weight, enable or disable, delete, and the
// cool-down this node has set a key aside for. Only the last four
// characters of a key are ever shown.

import { path } from "../api.js";
import { add, fmtTime, h, replace } from "../dom.js";
import { button, confirm, errorBox, field, form, notice, section, table, toggle } from "../ui.js";
import { providerOptions } from "./catalogue.js";

export const title = "Provider keys";

const label = (k) => `${k.provider} key …${k.last4}`;

function cooldown(k) {
  if (!k.cooldown) return h("span", { class: "badge ok" }, "ready");
  return h(
    "span",
    { class: "cooldown" },
    h("span", { class: "badge warn" }, k.cooldown.reason.replaceAll("_", " ")),
    " until ",
    h("time", { datetime: k.cooldown.until }, `${fmtTime(k.cooldown.until).slice(11)} UTC`),
  );
}

function endpoint(k) {
  if (!k.base_url) return "—";
  return h("span", {}, h("code", {}, k.base_url), k.api_version ? [" ", h("span", { class: "badge" }, k.api_version)] : null);
}

export async function render(ctx) {
  const { org, access, api } = ctx;
  const list = h("div");
  const status = h("div", { "aria-live": "polite" });

  function weightControl(k) {
    if (!access.write) return String(k.weight);
    const input = h("input", {
      type: "number",
      name: "weight",
      min: 1,
      max: 1000,
      step: 1,
      required: true,
      value: k.weight,
      class: "weight",
      "aria-label": `Weight of the ${label(k)}`,
    });
    const el = h(
      "form",
      { class: "inline-form" },
      input,
      h("button", { type: "submit", class: "btn small", "aria-label": `Save the weight of the ${label(k)}` }, "Save"),
    );
    el.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!el.reportValidity()) return;
      await change(k, { weight: Number(input.value) }, `The ${label(k)} has weight ${input.value}.`);
    });
    return el;
  }

  function enabledControl(k) {
    if (!access.write) {
      return h("span", { class: ["badge", k.enabled ? "ok" : "off"] }, k.enabled ? "enabled" : "disabled");
    }
    return toggle({
      label: `${label(k)} enabled`,
      checked: k.enabled,
      class: "switch key-switch",
      onChange: async (enabled) => {
        if (!enabled) {
          const yes = await confirm({
            title: `Disable the ${label(k)}?`,
            message: `Requests use the organization's other ${k.provider} keys; with none left, they are refused (403).`,
            action: "Disable",
            danger: true,
          });
          if (!yes) return;
        }
        await change(k, { enabled }, `The ${label(k)} is ${enabled ? "enabled" : "disabled"}.`);
      },
    });
  }

  async function change(k, body, done) {
    const focused = document.activeElement?.getAttribute("aria-label");
    try {
      await api.patch(path`/admin/orgs/${org.id}/provider-keys/${k.id}`, body);
      replace(status, notice(`${done} Effective within a second.`));
    } catch (e) {
      replace(status, errorBox(e));
    }
    await reload();
    // the table was redrawn: keep the keyboard where it was
    if (focused) [...list.querySelectorAll("[aria-label]")].find((el) => el.getAttribute("aria-label") === focused)?.focus();
  }

  const reload = () =>
    section(
      list,
      () => api.get(path`/admin/orgs/${org.id}/provider-keys`),
      (doc) =>
        table({
          caption: "Provider keys",
          emptyText: "No provider key yet: requests to a provider are refused (403) until one is added.",
          rows: doc.items,
          rowProps: (k) => ({ "data-provider-key": k.id, class: k.enabled ? null : "muted" }),
          columns: [
            { label: "Provider", value: (k) => k.provider },
            { label: "Name", value: (k) => k.name },
            { label: "Key", value: (k) => h("code", {}, `…${k.last4}`) },
            { label: "Weight", class: "num", value: weightControl },
            { label: "Enabled", value: enabledControl },
            { label: "Cool-down", value: cooldown },
            doc.items.some((k) => k.base_url) && { label: "Endpoint", class: "wide", value: endpoint },
            { label: "Created (UTC)", class: "wide", value: (k) => fmtTime(k.created_at) },
            access.write && {
              label: "Actions",
              value: (k) => button("Delete", () => remove(k), { kind: "danger small", "aria-label": `Delete the ${label(k)}` }),
            },
          ].filter(Boolean),
        }),
    );

  async function remove(key) {
    const yes = await confirm({
      title: `Delete the ${label(key)}?`,
      message: "Requests to this provider fail (403) unless the organization has another key for it.",
      action: "Delete",
      danger: true,
    });
    if (!yes) return;
    try {
      await api.del(path`/admin/orgs/${org.id}/provider-keys/${key.id}`);
      replace(status, notice(`Deleted the ${label(key)}.`));
    } catch (e) {
      replace(status, errorBox(e));
    }
    reload();
  }

  add(
    ctx.main,
    h("h1", {}, "Provider keys"),
    h(
      "p",
      { class: "hint" },
      "Requests go to the enabled keys of a provider in proportion to their weights. A key the provider refuses or rate-limits cools down for a while on the node that saw it (shown here for this node), and the next key is tried.",
    ),
    status,
    list,
  );
  if (access.write) {
    const addBody = h("div");
    add(
      ctx.main,
      h(
        "section",
        { class: "card", "aria-labelledby": "add-provider-key" },
        h("h2", { id: "add-provider-key" }, "Add a provider key"),
        addBody,
      ),
    );
    await Promise.all([
      reload(),
      section(addBody, () => api.get("/admin/providers"), (catalogue) => addForm(catalogue.items)),
    ]);
  } else {
    await reload();
  }

  function addForm(providers) {
    const byName = new Map(providers.map((p) => [p.name, p]));
    const baseUrl = field({
      label: "Base URL",
      name: "base_url",
      kind: "url",
      maxlength: 2048,
      autocomplete: "off",
      spellcheck: "false",
      placeholder: "https://<resource>.openai.azure.com",
      hint: "The key's own endpoint (an Azure OpenAI resource).",
    });
    const apiVersion = field({
      label: "API version (optional)",
      name: "api_version",
      maxlength: 40,
      autocomplete: "off",
      placeholder: "2024-10-21",
    });
    const providerField = field({
      label: "Provider",
      name: "provider",
      kind: "select",
      options: providerOptions(providers),
    });
    const select = providerField.querySelector("select");
    function showEndpoint() {
      const p = byName.get(select.value);
      baseUrl.hidden = !p?.key_base_url;
      baseUrl.querySelector("input").required = Boolean(p?.key_base_url);
      apiVersion.hidden = !p?.key_api_version;
    }
    select.addEventListener("change", showEndpoint);
    showEndpoint();
    return [
      h("p", { class: "hint" }, "Lectr checks the key with the provider before storing it, encrypted."),
      form({
        label: "Add a provider key",
        submit: "Check and add",
        busyText: "Checking the key with the provider…",
        controls: [
          providerField,
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
          field({ label: "Weight", name: "weight", kind: "number", min: 1, max: 1000, step: 1, value: 1, required: true }),
          baseUrl,
          apiVersion,
        ],
        onSubmit: async ({ provider, key, name, weight, base_url: url, api_version: version }, el) => {
          el.elements.key.value = ""; // never kept in the page
          const body = { provider, key: key.trim(), weight: Number(weight) };
          if (name.trim()) body.name = name.trim();
          const p = byName.get(provider);
          if (p?.key_base_url && url.trim()) body.base_url = url.trim();
          if (p?.key_api_version && version.trim()) body.api_version = version.trim();
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
    ];
  }
}
