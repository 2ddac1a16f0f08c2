// The admin API, with the bearer token of the session. Errors carry the
// API's own message; a 401 ends the session (see app.js).

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params || {})) {
    if (value !== null && value !== undefined && value !== "") search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

async function failure(response) {
  let code = "http_error";
  let message = `The admin API answered ${response.status} ${response.statusText}`.trim();
  try {
    const doc = await response.json();
    if (doc && doc.error && doc.error.message) {
      code = doc.error.code || code;
      message = doc.error.message;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message);
}

/**
 * token(): the bearer token; onUnauthorized(error): called on a 401 before
 * the error is thrown.
 */
export function createApi({ token, onUnauthorized = () => {} }) {
  async function call(method, path, { params, body } = {}) {
    const headers = { Accept: "application/json" };
    const bearer = token();
    if (bearer) headers.Authorization = `Bearer ${bearer}`;
    const init = { method, headers, credentials: "omit", cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path + query(params), init);
    } catch (e) {
      throw new ApiError(0, "unreachable", `The admin API cannot be reached (${e.message}).`);
    }
    if (!response.ok) {
      const error = await failure(response);
      if (response.status === 401) onUnauthorized(error);
      throw error;
    }
    return response.status === 204 ? null : response.json();
  }

  return {
    get: (path, params) => call("GET", path, { params }),
    post: (path, body) => call("POST", path, { body }),
    put: (path, body) => call("PUT", path, { body }),
    patch: (path, body) => call("PATCH", path, { body }),
    del: (path) => call("DELETE", path),
  };
}

/** Path segments are ids from the API; encode them anyway. */
export function path(strings, ...values) {
  return strings.reduce(
    (out, s, i) => out + s + (i < values.length ? encodeURIComponent(values[i]) : ""),
    "",
  );
}
