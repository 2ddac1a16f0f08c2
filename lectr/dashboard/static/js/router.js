// Hash routes ("#/orgs/<id>/keys?model=x"): the server only ever serves "/",
// and nothing of the route reaches it.

/** "/orgs/:org/keys" → {regex, names} */
export function compile(pattern) {
  const names = [];
  const source = pattern.replace(/:(\w+)/g, (_, name) => {
    names.push(name);
    return "([^/]+)";
  });
  return { regex: new RegExp(`^${source}$`), names };
}

/** The current location: {path, query (URLSearchParams)}. */
export function current() {
  const hash = location.hash.startsWith("#/") ? location.hash.slice(1) : "/orgs";
  const [path, search = ""] = hash.split("?", 2);
  return { path, query: new URLSearchParams(search) };
}

/** A path segment decoded, or null when it does not decode (a stray "%"). */
function decoded(segment) {
  try {
    return decodeURIComponent(segment);
  } catch {
    return null;
  }
}

/**
 * The first route whose pattern matches path: {route, params} or null
 * (also when a segment does not decode: such an address names nothing).
 */
export function match(routes, path) {
  for (const route of routes) {
    const m = route.compiled.regex.exec(path);
    if (m) {
      const values = m.slice(1).map(decoded);
      if (values.includes(null)) return null;
      const params = {};
      route.compiled.names.forEach((name, i) => {
        params[name] = values[i];
      });
      return { route, params };
    }
  }
  return null;
}

export function href(path, query) {
  const search = query ? new URLSearchParams(query).toString() : "";
  return `#${path}${search ? `?${search}` : ""}`;
}

export function navigate(path, query, { replace = false } = {}) {
  const target = href(path, query);
  if (replace) {
    history.replaceState(null, "", target);
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  } else {
    location.hash = target;
  }
}
