// Routes: an org's virtual models. List, create or replace (targets,
// strategy, what to retry on, attempts, per-attempt timeout), delete, and
// explain: the plan Lectr would follow now for a model (the attempts in
// order, the keys and their cool-downs), or the answer it would refuse with.

import { path } from "../api.js";
import { add, h, replace, uid } from "../dom.js";
import { button, confirm, errorBox, field, fields, form, loading, notice, section, table } from "../ui.js";
import { providerOptions } from "./catalogue.js";

export const title = "Routes";

const RETRY_ON = [
  ["429", "429 (rate limited)"],
  ["5xx", "5xx (and a connection closed before any answer)"],
  ["timeout", "timeout (no response headers in time)"],
  ["connect", "connect (no connection)"],
];
const MAX_TARGETS = 10;

const seconds = (v) => (v === null || v === undefined ? "default" : `${v} s`);

function targetList(route) {
  const weighted = route.strategy === "weighted";
  return h(
    "ol",
    { class: "targets" },
    route.targets.map((t) =>
      h("li", {}, h("code", {}, `${t.provider}/${t.model}`), weighted ? h("span", { class: "hint" }, ` ×${t.weight}`) : null),
    ),
  );
}

// --- the route form ---------------------------------------------------------------

function targetRow(providers, target, onRemove) {
  const box = h("fieldset", { class: "target" }, h("legend", {}, "Target"));
  add(
    box,
    h(
      "div",
      { class: "target-fields" },
      field({ label: "Provider", name: "t-provider", kind: "select", value: target.provider, options: providerOptions(providers) }),
      field({
        label: "Model",
        name: "t-model",
        value: target.model,
        required: true,
        maxlength: 256,
        autocomplete: "off",
        spellcheck: "false",
      }),
      field({ label: "Weight", name: "t-weight", kind: "number", value: target.weight ?? 1, min: 1, max: 1000, step: 1, required: true }),
      button("Remove", () => onRemove(box), { kind: "small danger remove-target" }),
    ),
  );
  return box;
}

function routeForm(ctx, providers, route, done) {
  const editing = Boolean(route);
  const r = route || { name: "", targets: [{ provider: providers[0]?.name, model: "", weight: 1 }], strategy: "fallback", retry_on: RETRY_ON.map(([v]) => v) };
  const targets = h("div", { class: "target-list" });
  const addTarget = button("Add a target", () => {
    targets.append(targetRow(providers, { provider: providers[0]?.name, model: "", weight: 1 }, removeTarget));
    renumber();
    targets.lastChild.querySelector("select").focus();
  });

  function removeTarget(box) {
    const next = box.nextElementSibling || box.previousElementSibling;
    box.remove();
    renumber();
    next?.querySelector("select")?.focus();
  }

  function renumber() {
    const boxes = [...targets.children];
    boxes.forEach((box, i) => {
      box.dataset.target = String(i + 1);
      box.querySelector("legend").textContent = `Target ${i + 1}`;
      box.querySelector(".remove-target").hidden = boxes.length === 1;
      box.querySelector(".remove-target").setAttribute("aria-label", `Remove target ${i + 1}`);
    });
    addTarget.hidden = boxes.length >= MAX_TARGETS;
  }

  for (const t of r.targets) targets.append(targetRow(providers, t, removeTarget));
  renumber();

  const retryId = uid("retry");
  return form({
    label: editing ? `Replace the route ${r.name}` : "Create a route",
    submit: editing ? `Save ${r.name}` : "Create route",
    controls: [
      field({
        label: "Route name",
        name: "name",
        value: r.name,
        required: true,
        readonly: editing,
        maxlength: 256,
        pattern: "[^\\/]+",
        autocomplete: "off",
        spellcheck: "false",
        hint: "What clients send as model (no '/'). It may be the name of a real model.",
      }),
      field({
        label: "Strategy",
        hint: "Weighted: the first target is chosen by weight (the same one for a conversation), the others are fallbacks.",
        name: "strategy",
        kind: "select",
        value: r.strategy,
        options: [
          ["fallback", "fallback (in order)"],
          ["weighted", "weighted (first by weight)"],
        ],
      }),
      field({
        label: "Max attempts (optional)",
        name: "max_attempts",
        kind: "number",
        min: 1,
        max: 10,
        step: 1,
        value: route ? r.max_attempts : "",
        placeholder: "default",
        hint: "Upstream calls at most, keys and targets included (1 to 10).",
      }),
      field({
        label: "Attempt timeout, seconds (optional)",
        name: "attempt_timeout",
        kind: "number",
        min: 0.1,
        max: 3600,
        step: 0.1,
        value: route && r.attempt_timeout !== null ? r.attempt_timeout : "",
        placeholder: "default",
        hint: "How long each attempt may wait for response headers.",
      }),
      h("div", { class: "span-all" }, targets, addTarget),
      h(
        "fieldset",
        { class: "span-all retry-on", "aria-describedby": `${retryId}-hint` },
        h("legend", {}, "Try the next target on"),
        RETRY_ON.map(([value, text]) =>
          field({ label: text, name: `retry-${value}`, kind: "checkbox", value: r.retry_on.includes(value) }),
        ),
        h("small", { class: "hint", id: `${retryId}-hint` }, "A refused key always moves on; a 4xx other than 401, 403 and 429 never does. Nothing is retried once the answer has started."),
      ),
    ],
    onSubmit: async (values, el) => {
      const body = {
        targets: [...targets.children].map((box) => ({
          provider: box.querySelector("[name=t-provider]").value,
          model: box.querySelector("[name=t-model]").value.trim(),
          weight: Number(box.querySelector("[name=t-weight]").value),
        })),
        strategy: values.strategy,
        retry_on: RETRY_ON.map(([v]) => v).filter((v) => values[`retry-${v}`]),
      };
      if (values.max_attempts !== "") body.max_attempts = Number(values.max_attempts);
      if (values.attempt_timeout !== "") body.attempt_timeout = Number(values.attempt_timeout);
      const name = values.name.trim();
      const saved = await ctx.api.put(path`/admin/orgs/${ctx.org.id}/routes/${name}`, body);
      if (!editing) el.elements.name.value = "";
      done(saved);
    },
  });
}

// --- explain --------------------------------------------------------------------------

function explanation(doc) {
  const entry = `${doc.entry.provider} ${doc.entry.api_path}`;
  if (doc.refusal) {
    return h(
      "div",
      { class: "explain-result", "data-explain": "refused" },
      h("p", { class: "notice error" }, h("strong", {}, `Refused: ${doc.refusal.status} ${doc.refusal.kind}`), ` — ${doc.refusal.message}`),
      fields([
        ["Entry", h("code", {}, entry)],
        ["Model", doc.model ?? "—"],
      ]),
      h("p", { class: "hint" }, "This request would get that answer from Lectr; no provider would be called."),
    );
  }
  const route = doc.route;
  const keys = [];
  const seen = new Set();
  for (const k of doc.keys) {
    if (!seen.has(k.id)) {
      seen.add(k.id);
      keys.push(k);
    }
  }
  return h(
    "div",
    { class: "explain-result", "data-explain": "plan" },
    fields([
      ["Entry", h("code", {}, entry)],
      ["Model", doc.model ?? "—"],
      [
        "Route",
        route
          ? `${route.name} (${route.strategy}; retry on ${route.retry_on.join(", ") || "nothing"}; at most ${route.max_attempts} attempts; attempt timeout ${seconds(route.attempt_timeout)})`
          : "none: a plain request (a refused or rate-limited key moves to the next key of its pool, at most 3 attempts)",
      ],
    ]),
    h("h3", {}, "Attempts, in order, if each one failed"),
    table({
      caption: "Attempts, in order",
      emptyText: "No attempt would be made.",
      rows: doc.attempts,
      rowProps: (a) => ({ "data-attempt": a.attempt }),
      columns: [
        { label: "#", class: "num", value: (a) => String(a.attempt) },
        { label: "Provider", value: (a) => a.provider },
        { label: "Model", value: (a) => h("code", {}, a.model ?? "—") },
        { label: "Key", value: (a) => a.key.name },
      ],
    }),
    h("h3", {}, "Keys"),
    table({
      caption: "Keys of the targets' pools",
      emptyText: "No key.",
      rows: keys,
      rowProps: (k) => ({ "data-explain-key": k.id }),
      columns: [
        { label: "Provider", value: (k) => k.provider },
        { label: "Key", value: (k) => k.name },
        { label: "Weight", class: "num", value: (k) => String(k.weight) },
        {
          label: "Cool-down",
          value: (k) =>
            k.cooldown
              ? h("span", {}, h("span", { class: "badge warn" }, k.cooldown.reason.replaceAll("_", " ")), ` set aside for ${Math.ceil(k.cooldown.remaining_seconds)} s more (until ${k.cooldown.until.slice(11, 19)} UTC)`)
              : h("span", { class: "badge ok" }, "ready"),
        },
      ],
    }),
    h("p", { class: "hint" }, "Limits are not evaluated here, and nothing is called or reserved."),
  );
}

function explainForm(ctx, routeNames, result) {
  const listId = uid("route-names");
  const el = form({
    label: "Explain a request",
    submit: "Explain",
    kind: "",
    controls: [
      field({
        label: "Model",
        name: "model",
        required: true,
        maxlength: 256,
        autocomplete: "off",
        spellcheck: "false",
        list: listId,
        hint: "A route's name, a model, or provider/model.",
      }),
      field({
        label: "Session (x-lectr-session, optional)",
        name: "session",
        maxlength: 256,
        autocomplete: "off",
        spellcheck: "false",
        hint: "Keeps a conversation on one key or target.",
      }),
      field({
        label: "Proxy path",
        name: "path",
        value: "/v1/chat/completions",
        required: true,
        maxlength: 2048,
        spellcheck: "false",
        hint: "/v1/messages for Anthropic; /<provider>/v1/… for one provider.",
      }),
    ],
    onSubmit: async ({ model, session, path: proxyPath }) => {
      const body = { path: proxyPath.trim(), body: { model: model.trim() } };
      if (session.trim()) body.headers = { "x-lectr-session": session.trim() };
      replace(result, loading("Explaining…"));
      let doc;
      try {
        doc = await ctx.api.post(path`/admin/orgs/${ctx.org.id}/routes/explain`, body);
      } catch (e) {
        replace(result);
        throw e;
      }
      replace(result, explanation(doc));
      // announced (the form's result is a live region); the plan itself is below
      const n = doc.attempts.length;
      return h("span", { class: "sr-only" }, doc.refusal ? `Refused: ${doc.refusal.message}` : `${n} attempt${n === 1 ? "" : "s"} planned.`);
    },
  });
  el.append(h("datalist", { id: listId }, routeNames.map((n) => h("option", { value: n }))));
  return el;
}

// --- the page ---------------------------------------------------------------------------

export async function render(ctx) {
  const { org, access, api } = ctx;
  const list = h("div");
  const status = h("div", { "aria-live": "polite" });
  const formBox = h("div");
  const explainBox = h("section", { class: "card", "aria-labelledby": "explain", id: "explain-card" });
  const explainResult = h("div", { id: "explain-result" });
  let providers = [];
  let routes = [];

  function showForm(route = null) {
    if (!access.write) return;
    const heading = route ? `Replace the route ${route.name}` : "New route";
    replace(
      formBox,
      h(
        "section",
        { class: "card", "aria-labelledby": "route-form", id: "route-form-card" },
        h("h2", { id: "route-form" }, heading),
        routeForm(ctx, providers, route, (saved) => {
          replace(status, notice(`Saved the route ${saved.name}: effective on every node within a second.`));
          showForm();
          reload();
          // the form was redrawn: the keyboard starts again at its first field
          formBox.querySelector("input[name=name]")?.focus({ preventScroll: true });
        }),
        route ? button("Cancel", () => showForm()) : null,
      ),
    );
    if (route) {
      formBox.scrollIntoView({ block: "start" });
      formBox.querySelector("select")?.focus();
    }
  }

  function showExplain() {
    replace(
      explainBox,
      h("h2", { id: "explain" }, "Explain"),
      h("p", { class: "hint" }, "The plan Lectr would follow now for a request with this model: the attempts in order if each one failed, the keys and their cool-downs, or the answer it would refuse with."),
      explainForm(ctx, routes.map((r) => r.name), explainResult),
      explainResult,
    );
  }

  function explain(route) {
    const el = explainBox.querySelector("form");
    el.elements.model.value = route.name;
    el.requestSubmit();
    explainBox.scrollIntoView({ block: "start" });
    el.elements.model.focus({ preventScroll: true });
  }

  async function remove(route) {
    const yes = await confirm({
      title: `Delete the route ${route.name}?`,
      message: `Requests with model “${route.name}” are no longer routed: they go to the path's provider as a plain model name, on every node within a second.`,
      action: "Delete",
      danger: true,
    });
    if (!yes) return;
    try {
      await api.del(path`/admin/orgs/${org.id}/routes/${route.name}`);
      replace(status, notice(`Deleted the route ${route.name}.`));
    } catch (e) {
      replace(status, errorBox(e));
    }
    reload();
  }

  const reload = () =>
    section(
      list,
      () => api.get(path`/admin/orgs/${org.id}/routes`),
      (doc) => {
        routes = doc.items;
        const names = explainBox.querySelector("datalist");
        if (names) replace(names, routes.map((r) => h("option", { value: r.name })));
        return table({
          caption: "Routes",
          emptyText: "No route yet. A route is a model name of your own that Lectr sends to one or more targets, falling back to the next one when an attempt fails.",
          rows: routes,
          rowProps: (r) => ({ "data-route": r.name }),
          columns: [
            { label: "Name", value: (r) => h("code", {}, r.name) },
            { label: "Targets", value: targetList },
            { label: "Strategy", class: "wide", value: (r) => r.strategy },
            { label: "Retry on", class: "wide", value: (r) => r.retry_on.join(", ") || "nothing" },
            { label: "Attempts", class: "num wide", value: (r) => String(r.max_attempts) },
            { label: "Timeout", class: "num wide", value: (r) => seconds(r.attempt_timeout) },
            {
              label: "Actions",
              value: (r) =>
                h(
                  "span",
                  { class: "row-actions" },
                  button("Explain", () => explain(r), { kind: "small", "aria-label": `Explain ${r.name}` }),
                  access.write ? button("Edit", () => showForm(r), { kind: "small", "aria-label": `Edit ${r.name}` }) : null,
                  access.write ? button("Delete", () => remove(r), { kind: "danger small", "aria-label": `Delete ${r.name}` }) : null,
                ),
            },
          ],
        });
      },
    );

  add(
    ctx.main,
    h("h1", {}, "Routes"),
    h(
      "p",
      { class: "hint" },
      "A request whose model is a route's name goes to the route's targets (the model rewritten for each), trying the next one on the failures you choose, before any byte of the answer reached the client.",
    ),
    status,
    list,
    formBox,
    explainBox,
  );
  const [catalogue] = await Promise.all([
    access.write ? api.get("/admin/providers").catch((e) => ({ failed: e })) : null,
    reload(),
  ]);
  if (ctx.signal.aborted) return;
  showExplain();
  if (catalogue?.failed) replace(formBox, errorBox(catalogue.failed, "Routes cannot be edited now: "));
  else if (catalogue) {
    providers = catalogue.items;
    showForm();
  }
}
