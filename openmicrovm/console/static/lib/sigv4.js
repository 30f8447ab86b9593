// AWS Signature Version 4 for the console's API calls, made to agree byte for byte with botocore's
// SigV4Auth (botocore/auth.py), because the server checks signatures by running that very signer
// over the request it received (openmicrovm/api/auth.py). Wherever botocore departs from the
// letter of the AWS documentation, this follows botocore.

import { hex, hmacSha256, sha256, utf8 } from "./sha256.js";

// Headers botocore leaves out of the signature (SIGNED_HEADERS_BLACKLIST): proxies and tracing
// add or rewrite them on the way, so signing them would break the signature in transit.
const UNSIGNED = new Set([
  "baggage",
  "connection",
  "expect",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "te",
  "traceparent",
  "tracestate",
  "trailer",
  "transfer-encoding",
  "upgrade",
  "user-agent",
  "x-amzn-trace-id",
]);

// Headers fetch() will not let a page set (the Fetch standard's forbidden request headers): the
// browser drops them or writes its own value, so a signature over ours could never verify.
const FORBIDDEN = new Set([
  "accept-charset",
  "accept-encoding",
  "access-control-request-headers",
  "access-control-request-method",
  "connection",
  "content-length",
  "cookie",
  "cookie2",
  "date",
  "dnt",
  "expect",
  "host",
  "keep-alive",
  "origin",
  "referer",
  "set-cookie",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
  "via",
]);

// What the signer writes itself; stale copies (say, from a retried request) are replaced.
const OWN = new Set(["authorization", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token"]);

// Python's str.split() whitespace, which botocore uses to collapse runs inside header values; JS's
// \s differs from it (it has U+FEFF, lacks U+001C..U+001F and U+0085).
const PY_WHITESPACE = /[\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+/;

// Python's urllib.parse.quote(s, safe="/~"): unreserved characters and "/" stay, every other
// UTF-8 byte becomes %XX with uppercase hex.
function quotePath(s) {
  const bytes = utf8(s);
  let out = "";
  for (const byte of bytes) {
    const c = String.fromCharCode(byte);
    if (/[A-Za-z0-9_.~\/-]/.test(c)) out += c;
    else out += "%" + byte.toString(16).toUpperCase().padStart(2, "0");
  }
  return out;
}

// botocore's remove_dot_segments: RFC 3986 dot removal, and empty segments (from "//") dropped,
// since AWS services treat consecutive slashes as one.
function removeDotSegments(path) {
  if (!path) return "/";
  const kept = [];
  for (const segment of path.split("/")) {
    if (!segment || segment === ".") continue;
    if (segment === "..") kept.pop();
    else kept.push(segment);
  }
  const first = path.startsWith("/") ? "/" : "";
  const last = path.endsWith("/") && kept.length ? "/" : "";
  return first + kept.join("/") + last;
}

// The path exactly as the browser will send it (its URL parser has already percent-encoded what it
// encodes), then encoded once more: botocore quotes the already-encoded path for every service
// but S3, so "%3A" in the URL is signed as "%253A".
function canonicalUri(url) {
  return quotePath(removeDotSegments(url.pathname));
}

// botocore signs the raw query from the URL: pairs split on "&" and the first "=", sorted by key
// then value, with no re-encoding. The caller's URL must therefore already be encoded the way
// boto3 encodes it; encodeQuery() below does that.
function canonicalQuery(url) {
  const query = url.search.startsWith("?") ? url.search.slice(1) : url.search;
  if (!query) return "";
  const pairs = query.split("&").map((pair) => {
    const at = pair.indexOf("=");
    return at < 0 ? [pair, ""] : [pair.slice(0, at), pair.slice(at + 1)];
  });
  // Python compares strings by code point; after percent-encoding everything is ASCII, where
  // JS's UTF-16 comparison agrees, but compare code points anyway for a URL that was not encoded.
  const byCodePoint = (a, b) => {
    const x = Array.from(a, (ch) => ch.codePointAt(0));
    const y = Array.from(b, (ch) => ch.codePointAt(0));
    for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return x[i] - y[i];
    return x.length - y.length;
  };
  pairs.sort((p, q) => byCodePoint(p[0], q[0]) || byCodePoint(p[1], q[1]));
  return pairs.map(([key, value]) => `${key}=${value}`).join("&");
}

// botocore's _host_from_url: lowercase host name, with the port only when it is not the scheme's
// default (the URL parser already leaves url.port empty then). The browser sends the same Host.
function hostOf(url) {
  return url.hostname.toLowerCase() + (url.port ? `:${url.port}` : "");
}

function bodyBytes(body) {
  if (body === undefined || body === null) return new Uint8Array(0);
  if (typeof body === "string") return utf8(body);
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  throw new TypeError("signRequest: body must be a string, a Uint8Array, an ArrayBuffer or undefined");
}

// 20240102T030405Z, the SigV4 timestamp; its first eight characters are the scope's date.
function amzDate(now) {
  const date = now === undefined ? new Date() : now instanceof Date ? now : new Date(now);
  if (Number.isNaN(date.getTime())) throw new TypeError(`signRequest: now is not a valid time: ${now}`);
  return date.toISOString().replace(/[-:]/g, "").replace(/\.\d{3}/, "");
}

/**
 * The query string for `params` (an object or [key, value] pairs) encoded the way boto3 encodes
 * it (every byte but A-Z a-z 0-9 - _ . ~ as %XX), so that the URL the browser sends and the one
 * the server signs agree. Arrays as values repeat the key, as boto3 does for list parameters.
 */
export function encodeQuery(params) {
  const entries = Array.isArray(params) ? params : Object.entries(params);
  const parts = [];
  for (const [key, value] of entries) {
    if (value === undefined || value === null) continue;
    for (const one of Array.isArray(value) ? value : [value]) {
      parts.push(`${encodeComponent(String(key))}=${encodeComponent(String(one))}`);
    }
  }
  return parts.join("&");
}

function encodeComponent(s) {
  return quotePath(s).replace(/\//g, "%2F");
}

/**
 * A value for a {label} in a URI path, encoded as boto3 encodes it: an ARN's ":" and "/" become
 * %3A and %2F, so the label stays one path segment.
 */
export function encodePathLabel(value) {
  return encodeComponent(String(value));
}

/**
 * Signs a request with SigV4 as botocore does and returns the headers to send: `headers` plus
 * X-Amz-Date, X-Amz-Content-Sha256, Authorization and, given a session token,
 * X-Amz-Security-Token. Every header passed in is signed (but those botocore never signs), so pass
 * exactly what fetch() will send. No Host header: the browser writes it from the URL, and the
 * signature covers that value.
 *
 * body: a string (sent as UTF-8), a Uint8Array, an ArrayBuffer or undefined.
 * now: a Date or milliseconds since the epoch; the current time by default.
 */
export function signRequest({
  method,
  url,
  headers = {},
  body,
  accessKeyId,
  secretAccessKey,
  sessionToken,
  region,
  service = "lambda",
  now,
}) {
  if (!method) throw new TypeError("signRequest: method is required");
  if (!accessKeyId || !secretAccessKey) throw new TypeError("signRequest: credentials are required");
  if (!region) throw new TypeError("signRequest: region is required");
  const parsed = new URL(url, globalThis.location?.href);

  const out = {};
  const given = new Set();
  for (const [name, value] of Object.entries(headers)) {
    if (value === undefined || value === null) continue;
    const lower = name.toLowerCase();
    // fetch() would merge the two into one "a, b" header, which no signature over both matches.
    if (given.has(lower)) throw new Error(`signRequest: the ${name} header is given twice, in different cases`);
    given.add(lower);
    if (FORBIDDEN.has(lower) || lower.startsWith("proxy-") || lower.startsWith("sec-")) {
      throw new Error(
        `signRequest: the browser will not send a ${name} header as given, so it cannot be signed; leave it out`,
      );
    }
    if (!OWN.has(lower)) out[name] = String(value);
  }
  const timestamp = amzDate(now);
  const payloadHash = hex(sha256(bodyBytes(body)));
  out["X-Amz-Date"] = timestamp;
  out["X-Amz-Content-Sha256"] = payloadHash;
  if (sessionToken) out["X-Amz-Security-Token"] = sessionToken;

  // botocore trims each value and collapses its inner runs of whitespace to one space.
  const signed = new Map([["host", hostOf(parsed)]]);
  for (const [name, value] of Object.entries(out)) {
    const lower = name.toLowerCase();
    if (!UNSIGNED.has(lower)) signed.set(lower, value.split(PY_WHITESPACE).filter(Boolean).join(" "));
  }
  const names = [...signed.keys()].sort();
  const canonicalHeaders = names.map((name) => `${name}:${signed.get(name)}\n`).join("");
  const signedHeaders = names.join(";");

  const canonicalRequest = [
    method.toUpperCase(),
    canonicalUri(parsed),
    canonicalQuery(parsed),
    canonicalHeaders,
    signedHeaders,
    payloadHash,
  ].join("\n");

  const date = timestamp.slice(0, 8);
  const scope = `${date}/${region}/${service}/aws4_request`;
  const stringToSign = ["AWS4-HMAC-SHA256", timestamp, scope, hex(sha256(utf8(canonicalRequest)))].join("\n");

  let key = hmacSha256(utf8(`AWS4${secretAccessKey}`), utf8(date));
  for (const part of [region, service, "aws4_request"]) key = hmacSha256(key, utf8(part));
  const signature = hex(hmacSha256(key, utf8(stringToSign)));

  out.Authorization =
    `AWS4-HMAC-SHA256 Credential=${accessKeyId}/${scope}, ` +
    `SignedHeaders=${signedHeaders}, Signature=${signature}`;
  return out;
}
