// The console's API client: each call is built from the operation's entry in the wire model
// (/console/model.json, a slice of botocore's own model), as boto3 builds it, and SigV4-signed in
// the browser when the user gave access keys. Keys live in sessionStorage only: they leave with the
// tab, and no other tab or site can read them.
import { encodePathLabel, encodeQuery, signRequest } from "./lib/sigv4.js";

const CREDENTIALS_KEY = "openmicrovm.console.credentials";
const SIGNING_SERVICE = "lambda";
export const UNAUTHORIZED_EVENT = "openmicrovm:unauthorized";

let model = null;

export class ApiError extends Error {
  constructor(status, code, message, requestId) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code || `HTTP ${status}`;
    this.requestId = requestId;
  }
}

export async function loadModel() {
  const response = await fetch("/console/model.json");
  if (!response.ok) throw new ApiError(response.status, "ConsoleUnavailable", "The console's model did not load.");
  model = await response.json();
}

export function credentials() {
  const stored = sessionStorage.getItem(CREDENTIALS_KEY);
  return stored ? JSON.parse(stored) : null;
}

export function setCredentials(value) {
  if (value) sessionStorage.setItem(CREDENTIALS_KEY, JSON.stringify(value));
  else sessionStorage.removeItem(CREDENTIALS_KEY);
}

function buildRequest(operation, params) {
  const described = model && model.operations[operation];
  if (!described) throw new ApiError(0, "UnknownOperation", `The console does not know the operation ${operation}.`);
  let path = described.uri;
  const query = [];  // [name, value] pairs, encoded as boto3 encodes them
  const headers = {};
  const body = {};
  let hasBodyMembers = false;
  for (const [member, [where, name]] of Object.entries(described.members)) {
    if (where === "body") hasBodyMembers = true;
    const value = params[member];
    if (value === undefined || value === null || value === "") continue;
    if (where === "uri") path = path.replace(`{${name}}`, encodePathLabel(value));
    else if (where === "querystring") query.push([name, value]);
    else if (where === "header") headers[name] = String(value);
    else body[name] = value;
  }
  const url = location.origin + path + (query.length ? "?" + encodeQuery(query) : "");
  const text = hasBodyMembers ? JSON.stringify(body) : undefined;
  return { method: described.method, url, headers, body: text };
}

// Any request of the server's (the API, the logs route, /metrics, uploads), signed when keys are set.
export async function send(method, url, { body, headers = {}, signal, accept = "json" } = {}) {
  const sent = { ...headers };
  if (body !== undefined) sent["Content-Type"] = "application/json";
  const keys = credentials();
  const signed = keys
    ? signRequest({
        method,
        url,
        headers: sent,
        body,
        accessKeyId: keys.accessKeyId,
        secretAccessKey: keys.secretAccessKey,
        sessionToken: keys.sessionToken || undefined,
        region: keys.region,
        service: SIGNING_SERVICE,
      })
    : sent;
  let response;
  try {
    response = await fetch(url, { method, headers: signed, body, signal, credentials: "omit" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "NetworkError", `The server did not answer (${error.message}). Is openmicrovm serve running?`);
  }
  const requestId = response.headers.get("x-amzn-RequestId") || undefined;
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try {
      message = JSON.parse(text).message ?? JSON.parse(text).Message ?? text;
    } catch {
      // not JSON: show the text as the server wrote it
    }
    const code = (response.headers.get("X-Amzn-Errortype") || "").split(":")[0];
    const error = new ApiError(response.status, code, message, requestId);
    // Whatever view made the call, the console as a whole has to ask for (other) keys.
    if (AUTH_ERRORS.has(code)) window.dispatchEvent(new CustomEvent(UNAUTHORIZED_EVENT, { detail: error }));
    throw error;
  }
  if (accept === "text") return text;
  return text ? JSON.parse(text) : {};
}

export async function call(operation, params = {}, { signal } = {}) {
  const request = buildRequest(operation, params);
  return send(request.method, request.url, { body: request.body, headers: request.headers, signal });
}

// Every page of a List operation, up to `limit` items.
export async function listAll(operation, params = {}, { signal, limit = 1000 } = {}) {
  const items = [];
  let nextToken;
  do {
    const page = await call(operation, { ...params, nextToken }, { signal });
    items.push(...(page.items || []));
    nextToken = page.nextToken;
  } while (nextToken && items.length < limit);
  return items;
}

export const AUTH_ERRORS = new Set([
  "MissingAuthenticationTokenException",
  "UnrecognizedClientException",
  "InvalidSignatureException",
  "IncompleteSignatureException",
  "InvalidClientTokenId",
  "SignatureDoesNotMatch",
]);
