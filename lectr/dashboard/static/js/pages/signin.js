// Sign-in: with the OIDC issuer (authorization code + PKCE), and/or the
// admin token pasted into a form (development mode, operators).

import { createApi } from "../api.js";
import { oidcUnavailable, startOidc } from "../auth.js";
import { add, h } from "../dom.js";
import { button, field, form, notice } from "../ui.js";

export const title = "Sign in";

function issuerHost(oidc) {
  try {
    return new URL(oidc.issuer).host;
  } catch {
    return "the identity provider";
  }
}

function oidcPart(oidc) {
  const problem = oidcUnavailable(oidc);
  const go = button(
    `Sign in with ${issuerHost(oidc)}`,
    () => {
      go.disabled = true;
      startOidc(oidc, location.hash).catch((e) => {
        go.disabled = false;
        go.after(notice(e.message, "error"));
      });
    },
    { kind: "primary", disabled: Boolean(problem), id: "signin-oidc-button" },
  );
  return h(
    "section",
    { class: "card", "aria-labelledby": "signin-oidc" },
    h("h2", { id: "signin-oidc" }, "Single sign-on"),
    problem ? notice(problem, "error") : null,
    go,
  );
}

function tokenPart(onSignedIn) {
  return h(
    "section",
    { class: "card", "aria-labelledby": "signin-token" },
    h("h2", { id: "signin-token" }, "Admin token"),
    h(
      "p",
      { class: "hint" },
      "LECTR_ADMIN_TOKEN, or the development token printed at start-up (also in .lectr/admin.token).",
    ),
    form({
      label: "Sign in with the admin token",
      submit: "Sign in",
      busyText: "Checking the token…",
      controls: [
        field({
          label: "Admin token",
          name: "token",
          kind: "password",
          required: true,
          autocomplete: "off",
          spellcheck: "false",
        }),
      ],
      onSubmit: async ({ token }, el) => {
        const value = token.trim();
        el.elements.token.value = "";
        const probe = createApi({ token: () => value });
        try {
          await probe.get("/admin/me");
        } catch (e) {
          throw new Error(`The token was refused: ${e.message}`);
        }
        onSignedIn(value, "token");
      },
    }),
  );
}

export function render({ main, config, message, onSignedIn }) {
  const parts = [];
  if (config?.oidc) parts.push(oidcPart(config.oidc));
  if (config?.admin_token) parts.push(tokenPart(onSignedIn));
  add(main, 
    h("h1", {}, "Sign in to Lectr"),
    message ? notice(message.text, message.kind) : null,
    parts.length
      ? parts
      : notice(
          "No sign-in method is configured: set LECTR_ADMIN_TOKEN, or an OIDC issuer with LECTR_OIDC_CLIENT_ID.",
          "error",
        ),
  );
}
