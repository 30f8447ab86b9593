// SHA-256 (FIPS 180-4, section 6.2) and HMAC-SHA-256 (RFC 2104), synchronous and in plain JS.
//
// The console signs every API call with SigV4, which needs both. crypto.subtle would do it, but
// browsers only expose it in secure contexts: a console opened over plain http on anything other
// than localhost would have no way to sign. This module has no such dependency.

// The first 32 bits of the fractional parts of the cube roots of the first 64 primes.
const K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

// The first 32 bits of the fractional parts of the square roots of the first 8 primes.
const H0 = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

const BLOCK = 64;

// One message schedule, reused across blocks and calls: allocating it per block would dominate
// the cost of hashing a large upload.
const W = new Uint32Array(64);

// Folds the 64-byte block at `offset` of `bytes` into the state `h` (eight 32-bit words).
function compress(h, bytes, offset) {
  for (let t = 0; t < 16; t++) {
    const i = offset + t * 4;
    W[t] = (bytes[i] << 24) | (bytes[i + 1] << 16) | (bytes[i + 2] << 8) | bytes[i + 3];
  }
  for (let t = 16; t < 64; t++) {
    const w15 = W[t - 15];
    const w2 = W[t - 2];
    const s0 = ((w15 >>> 7) | (w15 << 25)) ^ ((w15 >>> 18) | (w15 << 14)) ^ (w15 >>> 3);
    const s1 = ((w2 >>> 17) | (w2 << 15)) ^ ((w2 >>> 19) | (w2 << 13)) ^ (w2 >>> 10);
    W[t] = (W[t - 16] + s0 + W[t - 7] + s1) | 0;
  }
  let a = h[0];
  let b = h[1];
  let c = h[2];
  let d = h[3];
  let e = h[4];
  let f = h[5];
  let g = h[6];
  let hh = h[7];
  for (let t = 0; t < 64; t++) {
    const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
    const ch = (e & f) ^ (~e & g);
    const T1 = (hh + S1 + ch + K[t] + W[t]) | 0;
    const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
    const maj = (a & b) ^ (a & c) ^ (b & c);
    const T2 = (S0 + maj) | 0;
    hh = g;
    g = f;
    f = e;
    e = (d + T1) | 0;
    d = c;
    c = b;
    b = a;
    a = (T1 + T2) | 0;
  }
  h[0] = (h[0] + a) | 0;
  h[1] = (h[1] + b) | 0;
  h[2] = (h[2] + c) | 0;
  h[3] = (h[3] + d) | 0;
  h[4] = (h[4] + e) | 0;
  h[5] = (h[5] + f) | 0;
  h[6] = (h[6] + g) | 0;
  h[7] = (h[7] + hh) | 0;
}

function asBytes(value, what) {
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  throw new TypeError(`${what} must be a Uint8Array (use utf8() for a string), not ${typeof value}`);
}

/** The SHA-256 digest (32 bytes) of `bytes`. */
export function sha256(bytes) {
  const message = asBytes(bytes, "sha256: the message");
  const h = new Int32Array(H0);
  const length = message.length;
  // Whole blocks straight from the input, so a large body is never copied.
  const whole = length - (length % BLOCK);
  for (let offset = 0; offset < whole; offset += BLOCK) compress(h, message, offset);

  // The tail: the remaining bytes, a 1 bit, zeros, and the message length in bits as a 64-bit
  // big-endian number, in one block or two depending on whether the length still fits.
  const rest = length - whole;
  const tail = new Uint8Array(rest < 56 ? BLOCK : 2 * BLOCK);
  tail.set(message.subarray(whole));
  tail[rest] = 0x80;
  // Bit length = length * 8, split so it stays exact beyond 2^32 bits.
  const high = Math.floor(length / 0x20000000);
  const low = (length * 8) >>> 0;
  const end = tail.length;
  tail[end - 8] = high >>> 24;
  tail[end - 7] = high >>> 16;
  tail[end - 6] = high >>> 8;
  tail[end - 5] = high;
  tail[end - 4] = low >>> 24;
  tail[end - 3] = low >>> 16;
  tail[end - 2] = low >>> 8;
  tail[end - 1] = low;
  for (let offset = 0; offset < end; offset += BLOCK) compress(h, tail, offset);

  const digest = new Uint8Array(32);
  for (let i = 0; i < 8; i++) {
    digest[i * 4] = h[i] >>> 24;
    digest[i * 4 + 1] = h[i] >>> 16;
    digest[i * 4 + 2] = h[i] >>> 8;
    digest[i * 4 + 3] = h[i];
  }
  return digest;
}

/** HMAC-SHA-256 of `message` under `key` (RFC 2104): 32 bytes. */
export function hmacSha256(key, message) {
  let k = asBytes(key, "hmacSha256: the key");
  const m = asBytes(message, "hmacSha256: the message");
  if (k.length > BLOCK) k = sha256(k);
  const inner = new Uint8Array(BLOCK + m.length);
  const outer = new Uint8Array(BLOCK + 32);
  for (let i = 0; i < BLOCK; i++) {
    const byte = i < k.length ? k[i] : 0;
    inner[i] = byte ^ 0x36;
    outer[i] = byte ^ 0x5c;
  }
  inner.set(m, BLOCK);
  outer.set(sha256(inner), BLOCK);
  return sha256(outer);
}

const HEX_DIGITS = "0123456789abcdef";

/** Lowercase hexadecimal, two digits a byte, as SigV4 wants its hashes and signatures. */
export function hex(bytes) {
  const b = asBytes(bytes, "hex: the input");
  let out = "";
  for (let i = 0; i < b.length; i++) out += HEX_DIGITS[b[i] >> 4] + HEX_DIGITS[b[i] & 15];
  return out;
}

const encoder = new TextEncoder();

/** The UTF-8 bytes of a string (a lone surrogate becomes U+FFFD, as TextEncoder does). */
export function utf8(string) {
  if (typeof string !== "string") throw new TypeError(`utf8: expected a string, not ${typeof string}`);
  return encoder.encode(string);
}
