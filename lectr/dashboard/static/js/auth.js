// The session: a bearer token kept in this tab's sessionStorage (never
// localStorage, never a URL, never a cookie), and the OIDC sign-in:
// authorization code + PKCE (S256) against the issuer, the code exchanged
// for an access token straight from the browser.

const TOKEN = "lectr.session";
const PENDING = "lectr.oidc";

export const session = {
  get() {
    try {
      return JSON.parse(sessionStorage.getItem(TOKEN) || "null");
    } catch {
      return null;
    }
  },
  token() {
    return this.get()?.token || null;
  },
  save(token, kind) {
    sessionStorage.setItem(TOKEN, JSON.stringify({ token, kind }));
  },
  clear() {
    sessionStorage.removeItem(TOKEN);
    sessionStorage.removeItem(PENDING);
  },
};

function base64url(bytes) {
  let text = "";
  for (const b of new Uint8Array(bytes)) text += String.fromCharCode(b);
  return btoa(text).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

function randomText(size = 32) {
  return base64url(crypto.getRandomValues(new Uint8Array(size)));
}

export function redirectUri() {
  return `${location.origin}/`;
}

/** Why an OIDC sign-in cannot start in this browser, or null. */
export function oidcUnavailable(oidc) {
  if (!oidc) return "OIDC sign-in is not configured.";
  if (oidc.problem) return oidc.problem;
  if (!window.isSecureContext || !crypto.subtle) {
    return "Sign-in with the identity provider needs HTTPS (or localhost).";
  }
  return null;
}

/** Leave for the issuer's sign-in page. */
export async function startOidc(oidc, returnTo) {
  const verifier = randomText(48);
  const state = randomText(16);
  const challenge = base64url(
    await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)),
  );
  sessionStorage.setItem(PENDING, JSON.stringify({ verifier, state, returnTo }));
  const params = new URLSearchParams({
    response_type: "code",
    client_id: oidc.client_id,
    redirect_uri: redirectUri(),
    scope: oidc.scope,
    state,
    code_challenge: challenge,
    code_challenge_method: "S256",
  });
  if (oidc.audience) params.set("audience", oidc.audience);
  location.assign(`${oidc.authorization_endpoint}?${params}`);
}

/**
 * Back from the issuer (?code=…&state=… or ?error=…): exchange the code,
 * drop it from the address bar. Resolves to {returnTo} when a sign-in
 * finished, null when this page load is not a callback; throws Error with
 * a message for the sign-in page otherwise.
 */
export async function finishOidc(oidc) {
  const search = new URLSearchParams(location.search);
  if (!search.has("code") && !search.has("error")) return null;
  const pending = JSON.parse(sessionStorage.getItem(PENDING) || "null");
  sessionStorage.removeItem(PENDING);
  history.replaceState(null, "", `/${pending?.returnTo || ""}`);
  if (search.has("error")) {
    const detail = search.get("error_description") || search.get("error");
    throw new Error(`The identity provider refused the sign-in: ${detail}`);
  }
  if (!pending || pending.state !== search.get("state")) {
    throw new Error("This sign-in was not started here (state mismatch). Try again.");
  }
  if (!oidc || !oidc.token_endpoint) {
    throw new Error("Sign-in with the identity provider is not available now.");
  }
  let response;
  try {
    response = await fetch(oidc.token_endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({
        grant_type: "authorization_code",
        code: search.get("code"),
        redirect_uri: redirectUri(),
        client_id: oidc.client_id,
        code_verifier: pending.verifier,
      }),
      credentials: "omit",
      cache: "no-store",
    });
  } catch (e) {
    throw new Error(`The identity provider cannot be reached (${e.message}).`);
  }
  const doc = await response.json().catch(() => ({}));
  if (!response.ok || !doc.access_token) {
    const detail = doc.error_description || doc.error || `HTTP ${response.status}`;
    throw new Error(`The identity provider did not issue a token: ${detail}`);
  }
  session.save(doc.access_token, "oidc");
  return { returnTo: pending.returnTo };
}
