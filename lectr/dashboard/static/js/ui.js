// Small components every page uses: states, tables, form fields, forms that
// show the API's errors, a confirmation dialog, a show-once secret.

import { h, replace, uid } from "./dom.js";

// --- states -------------------------------------------------------------------

export function loading(text = "Loading…") {
  return h("p", { class: "state loading", role: "status" }, text);
}

export function empty(text) {
  return h("p", { class: "state empty" }, text);
}

export function errorBox(error, prefix = "") {
  const message = error && error.message ? error.message : String(error);
  return h("div", { class: "state error", role: "alert" }, prefix, message);
}

export function notice(text, kind = "ok") {
  return h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

/** Show loading, then what render(data) returns, or the error. */
export async function section(container, load, render) {
  replace(container, loading());
  try {
    const data = await load();
    replace(container, render(data));
  } catch (e) {
    replace(container, errorBox(e));
  }
}

// --- buttons ------------------------------------------------------------------

export function button(label, onClick, { kind = "", type = "button", ...props } = {}) {
  return h("button", { type, class: ["btn", kind], on: { click: onClick }, ...props }, label);
}

/** A switch (kill switch): aria-checked carries the state. */
export function toggle({ label, checked, onChange, ...props }) {
  const el = h(
    "button",
    {
      type: "button",
      role: "switch",
      class: "switch",
      "aria-checked": checked ? "true" : "false",
      "aria-label": label,
      ...props,
    },
    h("span", { class: "knob", "aria-hidden": "true" }),
    h("span", { class: "switch-text" }, checked ? "On" : "Off"),
  );
  el.addEventListener("click", () => onChange(el.getAttribute("aria-checked") !== "true"));
  return el;
}

// --- tables -------------------------------------------------------------------

/**
 * columns: [{label, value: row => text|Node, class?}]; rows: objects.
 * The wrapper scrolls sideways on narrow screens (and by keyboard).
 */
export function table({ caption, columns, rows, emptyText = "Nothing here yet.", rowProps }) {
  if (!rows.length) return empty(emptyText);
  const body = h("tbody");
  appendRows(body, columns, rows, rowProps);
  return h(
    "div",
    { class: "table-wrap", tabindex: "0", role: "region", "aria-label": caption },
    h(
      "table",
      {},
      h("caption", { class: "sr-only" }, caption),
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.class }, c.label)))),
      body,
    ),
  );
}

export function tableRow(columns, row, props) {
  return h("tr", props ? props(row) : {}, columns.map((c) => h("td", { class: c.class }, c.value(row))));
}

export function appendRows(body, columns, rows, rowProps) {
  const fragment = document.createDocumentFragment();
  for (const row of rows) fragment.append(tableRow(columns, row, rowProps));
  body.append(fragment);
}

/** A definition list: [[label, value], …] */
export function fields(pairs) {
  return h(
    "dl",
    { class: "fields" },
    pairs.map(([label, value]) => [h("dt", {}, label), h("dd", {}, value)]),
  );
}

// --- forms --------------------------------------------------------------------

/**
 * A labelled control. kind: input type, "select" (options: [[value, label]])
 * or "textarea".
 */
export function field({ label, name, kind = "text", value = "", options = [], hint, ...props }) {
  const id = uid(name);
  let control;
  if (kind === "select") {
    control = h(
      "select",
      { id, name, ...props },
      options.map(([v, text]) => h("option", { value: v, selected: String(v) === String(value) }, text)),
    );
  } else if (kind === "textarea") {
    control = h("textarea", { id, name, rows: 4, ...props }, value);
  } else if (kind === "checkbox") {
    control = h("input", { id, name, type: "checkbox", checked: Boolean(value), ...props });
  } else {
    control = h("input", { id, name, type: kind, value, ...props });
  }
  const hintEl = hint ? h("small", { id: `${id}-hint`, class: "hint" }, hint) : null;
  if (hintEl) control.setAttribute("aria-describedby", hintEl.id);
  const wrap = kind === "checkbox" ? "field check" : "field";
  return h("div", { class: wrap }, h("label", { for: id }, label), control, hintEl);
}

/**
 * A form whose submit runs onSubmit(values, form); while it runs the
 * button is disabled; an error shows the API's message in the form.
 * onSubmit may return a Node (shown as the result) or nothing.
 */
export function form({ label, controls, submit, onSubmit, kind = "primary", busyText }) {
  const result = h("div", { class: "form-result", "aria-live": "polite" });
  const submitButton = h("button", { type: "submit", class: ["btn", kind] }, submit);
  const el = h(
    "form",
    { class: "form", "aria-label": label },
    h("div", { class: "controls" }, controls),
    h("div", { class: "actions" }, submitButton),
    result,
  );
  el.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!el.reportValidity()) return;
    const values = Object.fromEntries(
      [...el.elements]
        .filter((c) => c.name)
        .map((c) => [c.name, c.type === "checkbox" ? c.checked : c.value]),
    );
    submitButton.disabled = true;
    el.setAttribute("aria-busy", "true");
    replace(result, busyText ? loading(busyText) : null);
    try {
      const shown = await onSubmit(values, el);
      replace(result, shown || null);
    } catch (e) {
      replace(result, errorBox(e));
    } finally {
      submitButton.disabled = false;
      el.removeAttribute("aria-busy");
    }
  });
  return el;
}

// --- dialogs ------------------------------------------------------------------

/** A modal confirmation; resolves true when confirmed. Escape cancels. */
export function confirm({ title, message, action, danger = false }) {
  return new Promise((resolve) => {
    const opener = document.activeElement;
    const titleId = uid("dialog-title");
    const cancel = button("Cancel", () => dialog.close("cancel"));
    const ok = button(action, () => dialog.close("ok"), { kind: danger ? "danger" : "primary" });
    const dialog = h(
      "dialog",
      { class: "dialog", "aria-labelledby": titleId },
      h("h2", { id: titleId }, title),
      h("p", {}, message),
      h("div", { class: "actions" }, cancel, ok),
    );
    dialog.addEventListener("close", () => {
      dialog.remove();
      if (opener && opener.isConnected) opener.focus();
      resolve(dialog.returnValue === "ok");
    });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

// --- secrets shown once ---------------------------------------------------------

async function copyText(text, input) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    input.select(); // the clipboard API is refused: let the user copy it
    return false;
  }
}

/** A Lectr key shown this once, with a copy button. */
export function showOnce(issued, what = "key") {
  const id = uid("secret");
  const input = h("input", {
    id,
    class: "secret",
    type: "text",
    readonly: true,
    value: issued.key,
    spellcheck: "false",
    autocomplete: "off",
    "data-secret": "",
  });
  const status = h("span", { class: "copy-status", role: "status" });
  const copy = button("Copy", async () => {
    const copied = await copyText(issued.key, input);
    replace(status, copied ? "Copied." : "Select the text and copy it.");
  });
  return h(
    "div",
    { class: "show-once", role: "group", "aria-labelledby": `${id}-label` },
    h("p", { id: `${id}-label` }, h("strong", {}, `New ${what} “${issued.name}”`), ": shown this once. Copy it now; Lectr keeps only its hash."),
    h("div", { class: "secret-row" }, h("label", { for: id, class: "sr-only" }, "The new key"), input, copy, status),
  );
}
