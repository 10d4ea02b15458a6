// The operator API, called with the key the operator signed in with. The key lives in
// sessionStorage only (this browser tab's session), and goes out in the Authorization
// header, never in a URL.

const KEY = 'iot-gateway.api-key';

export const session = {
  key() { return sessionStorage.getItem(KEY); },
  signIn(key) { sessionStorage.setItem(KEY, key); },
  signOut() { sessionStorage.removeItem(KEY); },
};

/** An API error: the HTTP status and the contract's `error` code and `message`. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Headers for an API call with the key. */
export function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${session.key() ?? ''}`, ...extra };
}

/** Calls `METHOD /v1{path}`; resolves to `{status, data}`, rejects with `ApiError`. */
export async function call(method, path, body, { signal } = {}) {
  const headers = authHeaders({ Accept: 'application/json' });
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(`/v1${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: 'no-store',
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'the gateway cannot be reached');
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (resp.status === 401) window.dispatchEvent(new CustomEvent('console:unauthorized'));
  if (!resp.ok) {
    throw new ApiError(resp.status, data?.error ?? `http_${resp.status}`,
      data?.message ?? `HTTP ${resp.status}`);
  }
  return { status: resp.status, data };
}

/** `GET /v1{path}`: the JSON body. */
export async function get(path, opts) {
  return (await call('GET', path, undefined, opts)).data;
}

/** A path segment. */
export const seg = encodeURIComponent;

/** A query string from an object, leaving out null and undefined values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

/** What the gateway serves the console: where its device listener is. */
export async function consoleConfig() {
  const resp = await fetch('/console/config.json', { cache: 'no-store' });
  if (!resp.ok) throw new ApiError(resp.status, 'config', 'no console configuration');
  return resp.json();
}
