// Building the DOM without HTML strings: the page's Trusted Types policy
// forbids turning text into markup, so user data can only ever be text.

const SVG_NS = "http://www.w3.org/2000/svg";

function append(parent, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else if (child instanceof Node) parent.append(child);
    else parent.append(document.createTextNode(String(child)));
  }
}

function apply(el, props) {
  for (const [name, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "on") {
      for (const [event, handler] of Object.entries(value)) el.addEventListener(event, handler);
    } else if (name === "class") {
      el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (value === true) {
      el.setAttribute(name, "");
    } else {
      el.setAttribute(name, String(value));
    }
  }
  return el;
}

/** h("button", {class: "primary", on: {click}}, "Save") */
export function h(tag, props, ...children) {
  const el = apply(document.createElement(tag), props);
  append(el, children);
  return el;
}

/** The same for SVG elements. */
export function svg(tag, props, ...children) {
  const el = apply(document.createElementNS(SVG_NS, tag), props);
  append(el, children);
  return el;
}

/** el.append that skips null/false and flattens arrays. */
export function add(el, ...children) {
  append(el, children);
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let counter = 0;
export function uid(prefix = "id") {
  counter += 1;
  return `${prefix}-${counter}`;
}

// --- formatting ---------------------------------------------------------------

export const DASH = "—";

export function present(value) {
  return value !== null && value !== undefined && value !== "";
}

export function orDash(value, format = String) {
  return present(value) ? format(value) : DASH;
}

const integer = new Intl.NumberFormat("en-US");
export function fmtInt(value) {
  return orDash(value, (v) => integer.format(v));
}

export function fmtMs(value) {
  return orDash(value, (v) => (v >= 100 ? `${Math.round(v)} ms` : `${Number(v).toFixed(1)} ms`));
}

/** USD amounts arrive as exact decimal strings (or numbers). */
export function fmtUsd(value) {
  return orDash(value, (v) => {
    const n = Number(v);
    if (!Number.isFinite(n)) return String(v);
    const digits = n !== 0 && Math.abs(n) < 0.01 ? 6 : 2;
    return `$${n.toFixed(digits)}`;
  });
}

/** "2025-03-01 12:00:05" (UTC) from an ISO 8601 time. */
export function fmtTime(iso) {
  return orDash(iso, (v) => {
    const d = new Date(v);
    if (Number.isNaN(d.getTime())) return String(v);
    return d.toISOString().slice(0, 19).replace("T", " ");
  });
}

/** Sum a field over items; null when no item has it (the API does not report it). */
export function sumOf(items, field) {
  let total = null;
  for (const item of items) {
    if (present(item[field])) total = (total ?? 0) + Number(item[field]);
  }
  return total;
}
