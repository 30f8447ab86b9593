// A ZIP writer for uploading a dropped folder (a Docker build context) from the console.
//
// Entries are stored, not compressed: the archive only crosses the network once to our own
// server, and storing keeps this small and fast. Layout per PKWARE's APPNOTE.TXT: for each file
// a local header and its bytes, then the central directory, then its end record. No ZIP64, so
// the archive is limited to 65535 entries and 4 GiB, far beyond what a browser upload holds.

const LOCAL_HEADER = 0x04034b50;
const CENTRAL_HEADER = 0x02014b50;
const END_OF_CENTRAL = 0x06054b50;

// 2.0: the first version that knows directories; stored entries need nothing newer.
const VERSION_NEEDED = 20;
// High byte 3 says "Unix": readers (Python's zipfile, unzip, our builder) then take the high 16
// bits of the external attributes as st_mode, which is how the execute bit survives.
const VERSION_MADE_BY = (3 << 8) | VERSION_NEEDED;
// General purpose bit 11: names are UTF-8, not CP437.
const FLAG_UTF8 = 0x0800;
const METHOD_STORED = 0;
// Every entry gets 1980-01-01 00:00, the DOS epoch, as `openmicrovm deploy` does: the same folder
// then zips to the same bytes whenever and wherever it is dropped.
const DOS_TIME = 0;
const DOS_DATE = (0 << 9) | (1 << 5) | 1;

const S_IFMT = 0o170000;
const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const MSDOS_DIRECTORY = 0x10;

const MAX_ENTRIES = 0xffff;
const MAX_OFFSET = 0xffffffff;

let crcTable = null;

// CRC-32 as ZIP uses it (reflected, polynomial 0xEDB88320, initial and final XOR 0xFFFFFFFF),
// a byte at a time through a 256-entry table built on first use.
function crc32(bytes) {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let crc = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) crc = crcTable[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

// Throws unless `path` is a relative path that stays inside the archive's root. A path ending in
// "/" is a directory entry.
function checkPath(path) {
  if (typeof path !== "string" || path === "") throw new Error(`zipFiles: an entry has no path (${path})`);
  const shown = JSON.stringify(path);
  if (path.includes("\0")) throw new Error(`zipFiles: path ${shown} contains a NUL character`);
  // Windows tools treat a backslash as a separator, so "a\..\b" would climb out there.
  if (path.includes("\\")) throw new Error(`zipFiles: path ${shown} contains a backslash; use "/"`);
  if (path.startsWith("/") || /^[A-Za-z]:/.test(path)) {
    throw new Error(`zipFiles: path ${shown} is absolute; entries must be relative to the folder`);
  }
  const segments = path.endsWith("/") ? path.slice(0, -1).split("/") : path.split("/");
  for (const segment of segments) {
    if (segment === "..") throw new Error(`zipFiles: path ${shown} has a ".." segment, which leaves the folder`);
    if (segment === "" || segment === ".") {
      throw new Error(`zipFiles: path ${shown} has an empty or "." segment; give the plain relative path`);
    }
  }
}

// st_mode for an entry: permission bits alone (0o755) get the file type added.
function unixMode(mode, isDirectory) {
  const fallback = isDirectory ? 0o755 : 0o644;
  const m = mode === undefined || mode === null ? fallback : mode;
  if (!Number.isInteger(m) || m < 0 || m > 0xffff) throw new Error(`zipFiles: mode ${mode} is not a Unix mode`);
  if (m & S_IFMT) return m;
  return m | (isDirectory ? S_IFDIR : S_IFREG);
}

/**
 * A ZIP archive (as bytes) holding `files`, in the order given. Each file is
 * {path: "dir/name", bytes: Uint8Array, mode?: 0o755 or 0o100755}; a path ending in "/" makes a
 * directory entry (with empty bytes). Throws an Error naming the path for an absolute path, a ".."
 * segment or a path given twice.
 */
export function zipFiles(files) {
  if (!Array.isArray(files)) throw new TypeError("zipFiles: expected an array of {path, bytes, mode}");
  if (files.length > MAX_ENTRIES) throw new Error(`zipFiles: ${files.length} files; a ZIP holds at most ${MAX_ENTRIES}`);
  const encoder = new TextEncoder();
  const seen = new Set();
  const entries = [];
  let offset = 0;
  for (const file of files) {
    const path = file?.path;
    checkPath(path);
    if (seen.has(path)) throw new Error(`zipFiles: path ${JSON.stringify(path)} is given twice`);
    seen.add(path);
    const isDirectory = path.endsWith("/");
    const bytes = file.bytes ?? new Uint8Array(0);
    if (!(bytes instanceof Uint8Array)) {
      throw new TypeError(`zipFiles: the bytes of ${JSON.stringify(path)} must be a Uint8Array`);
    }
    if (isDirectory && bytes.length) {
      throw new Error(`zipFiles: ${JSON.stringify(path)} ends in "/" (a directory) but has bytes`);
    }
    const name = encoder.encode(path);
    if (name.length > 0xffff) throw new Error(`zipFiles: path ${JSON.stringify(path)} is too long`);
    const entry = {
      name,
      bytes,
      crc: crc32(bytes),
      mode: unixMode(file.mode, isDirectory),
      isDirectory,
      offset,
    };
    entries.push(entry);
    offset += 30 + name.length + bytes.length;
    if (offset > MAX_OFFSET) throw new Error("zipFiles: the files come to more than 4 GiB, too much for a ZIP without ZIP64");
  }

  const centralSize = entries.reduce((sum, e) => sum + 46 + e.name.length, 0);
  const total = offset + centralSize + 22;
  if (offset + centralSize > MAX_OFFSET) throw new Error("zipFiles: the archive would pass 4 GiB");
  const out = new Uint8Array(total);
  const view = new DataView(out.buffer);
  let at = 0;
  const u16 = (v) => {
    view.setUint16(at, v, true);
    at += 2;
  };
  const u32 = (v) => {
    view.setUint32(at, v, true);
    at += 4;
  };
  const raw = (b) => {
    out.set(b, at);
    at += b.length;
  };

  for (const e of entries) {
    u32(LOCAL_HEADER);
    u16(VERSION_NEEDED);
    u16(FLAG_UTF8);
    u16(METHOD_STORED);
    u16(DOS_TIME);
    u16(DOS_DATE);
    u32(e.crc);
    u32(e.bytes.length); // compressed size: stored, so the same
    u32(e.bytes.length);
    u16(e.name.length);
    u16(0); // no extra field
    raw(e.name);
    raw(e.bytes);
  }

  const centralStart = at;
  for (const e of entries) {
    u32(CENTRAL_HEADER);
    u16(VERSION_MADE_BY);
    u16(VERSION_NEEDED);
    u16(FLAG_UTF8);
    u16(METHOD_STORED);
    u16(DOS_TIME);
    u16(DOS_DATE);
    u32(e.crc);
    u32(e.bytes.length);
    u32(e.bytes.length);
    u16(e.name.length);
    u16(0); // extra field
    u16(0); // comment
    u16(0); // disk number
    u16(0); // internal attributes
    // Low byte: the MS-DOS attributes, which tools that ignore Unix modes still read.
    u32(((e.mode << 16) | (e.isDirectory ? MSDOS_DIRECTORY : 0)) >>> 0);
    u32(e.offset);
    raw(e.name);
  }

  u32(END_OF_CENTRAL);
  u16(0); // this disk
  u16(0); // disk with the central directory
  u16(entries.length);
  u16(entries.length);
  u32(centralSize);
  u32(centralStart);
  u16(0); // comment length
  return out;
}
