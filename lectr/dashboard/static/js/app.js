// The dashboard's shell: sign-in state, the header, the org header and
// tabs, and running one page at a time (pages/index.js lists them).

import { ApiError, createApi, path } from "./api.js";
import { finishOidc, session } from "./auth.js";
import { h, replace } from "./dom.js";
import { PAGES } from "./pages/index.js";
import * as signin from "./pages/signin.js";
import { compile, current, href, match, navigate } from "./router.js";
import { errorBox, loading } from "./ui.js";

const root = document.getElementById("app");
const routes = PAGES.map((entry) => ({ ...entry, compiled: compile(entry.path) }));

let config = null; // GET /admin/ui-config
let me = null; // GET /admin/me
let running = null; // the page on screen: {controller, cleanups}
let signInMessage = null;

const api = createApi({
  token: () => session.token(),
  onUnauthorized: (error) =>
    signOut({ text: `Your session has ended (${error.message}). Sign in again.`, kind: "error" }),
});

function signOut(message) {
  const wasSignedIn = session.token() !== null;
  session.clear();
  me = null;
  signInMessage = message;
  if (wasSignedIn) queueMicrotask(show);
}

function stopRunning() {
  if (!running) return;
  running.controller.abort();
  for (const fn of running.cleanups) {
    try {
      fn();
    } catch (e) {
      console.warn("page cleanup failed", e);
    }
  }
  running = null;
}

/** What the caller may do in an org: read, write (owner/admin), owner. */
function accessTo(org) {
  const admin = Boolean(me && me.is_admin);
  return {
    write: admin || org.role === "owner" || org.role === "admin",
    owner: admin || org.role === "owner",
  };
}

function who() {
  if (!me) return "";
  if (me.kind === "token") return "admin token";
  return me.user?.email || me.user?.subject || "signed in";
}

function header(where = "") {
  const current = (prefix) => (where === prefix ? "page" : where.startsWith(`${prefix}/`) ? "true" : null);
  const signOutButton = h(
    "button",
    { type: "button", class: "btn subtle", on: { click: () => signOut({ text: "You are signed out.", kind: "info" }) } },
    "Sign out",
  );
  return h(
    "header",
    { class: "topbar" },
    h("a", { class: "brand", href: "#/orgs" }, "Lectr"),
    h(
      "nav",
      { "aria-label": "Main" },
      h("a", { href: "#/orgs", "aria-current": current("/orgs") }, "Organizations"),
      me?.is_admin ? h("a", { href: "#/providers", "aria-current": current("/providers") }, "Providers") : null,
    ),
    h(
      "div",
      { class: "who" },
      h("span", { class: "who-name" }, who(), me?.is_admin ? " (global admin)" : ""),
      signOutButton,
    ),
  );
}

function orgHeader(org, access, activePath) {
  const tabs = routes.filter(
    (r) => r.tab && r.path.startsWith("/orgs/:org") && (!r.needs || access[r.needs]),
  );
  return h(
    "div",
    { class: "org-header" },
    h(
      "p",
      { class: "crumbs" },
      h("a", { href: "#/orgs" }, "Organizations"),
      " / ",
      h("span", {}, org.name),
      " ",
      h("span", { class: ["badge", org.enabled ? "ok" : "off"] }, org.enabled ? "enabled" : "disabled"),
      org.role ? h("span", { class: "badge" }, org.role) : null,
    ),
    h(
      "nav",
      { class: "tabs", "aria-label": `${org.name} sections` },
      tabs.map((r) => {
        const target = r.path.replace(":org", encodeURIComponent(org.id));
        const active = activePath === r.path;
        return h("a", { href: `#${target}`, "aria-current": active ? "page" : null }, r.tab);
      }),
    ),
  );
}

async function show() {
  stopRunning();
  if (!session.token()) {
    renderSignIn();
    return;
  }
  const { path: where, query } = current();
  const found = match(routes, where);
  if (!found) {
    navigate("/orgs", null, { replace: true });
    return;
  }
  const controller = new AbortController();
  running = { controller, cleanups: [] };
  const mine = running;
  try {
    if (!me) {
      replace(root, loading());
      me = await api.get("/admin/me");
    }
    let org = null;
    let access = null;
    if (found.params.org) {
      org = await api.get(path`/admin/orgs/${found.params.org}`);
      access = accessTo(org);
    }
    if (controller.signal.aborted) return;
    const main = h("main", { id: "main", tabindex: "-1" });
    replace(root, header(where), org ? orgHeader(org, access, found.route.path) : null, main);
    // on a narrow screen the tabs scroll: show the current one
    root.querySelector(".tabs a[aria-current=page]")?.scrollIntoView({ block: "nearest", inline: "nearest" });
    const { page } = found.route;
    document.title = [page.title, org?.name, "Lectr"].filter(Boolean).join(" · ");
    await page.render({
      api,
      me,
      org,
      access,
      params: found.params,
      query,
      main,
      signal: controller.signal,
      onDispose: (fn) => mine.cleanups.push(fn),
      navigate,
      href,
      refresh: show,
    });
    if (!controller.signal.aborted && document.activeElement === document.body) {
      main.querySelector("h1")?.setAttribute("tabindex", "-1");
      main.querySelector("h1")?.focus({ preventScroll: true });
    }
  } catch (e) {
    if (controller.signal.aborted || (e instanceof ApiError && e.status === 401)) return;
    replace(root, header(), h("main", { id: "main" }, errorBox(e)));
  }
}

function renderSignIn() {
  document.title = "Sign in · Lectr";
  const main = h("main", { id: "main", class: "signin" });
  replace(root, main);
  signin.render({
    main,
    config,
    message: signInMessage,
    api: createApi({ token: () => null }),
    onSignedIn: (token, kind) => {
      session.save(token, kind);
      signInMessage = null;
      me = null;
      show();
    },
  });
}

async function start() {
  try {
    config = await createApi({ token: () => null }).get("/admin/ui-config");
  } catch (e) {
    replace(root, h("main", { id: "main" }, errorBox(e, "The dashboard cannot start: ")));
    return;
  }
  try {
    const done = await finishOidc(config.oidc);
    if (done) signInMessage = null;
  } catch (e) {
    session.clear();
    signInMessage = { text: e.message, kind: "error" };
  }
  window.addEventListener("hashchange", show);
  show();
}

start();
