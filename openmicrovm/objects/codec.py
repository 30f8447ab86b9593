"""How a blob's bytes are stored: zlib-compressed when that pays, as they are otherwise.

Why zlib, level 6, per blob: the bulk of a version is a Debian tree (binaries, Python, shared
libraries) and a gVisor memory image (mostly zero and repetitive pages). On the 218 MB base tree
zlib level 1 stores 90 MB in 2.4 s of one core here, level 6 82 MB in 6.6 s, level 9 82 MB in 21 s;
a blob is compressed once for the life of the store but stored forever and downloaded by every
host, so level 6 is worth its time, 9 is not. zlib is in the standard library (zstd would be a new
dependency on every host). Already-compressed files (.gz, .zip, .png) do not shrink, so a blob
stays raw unless compression saves at least 1/16 of it: inflating costs every fetch CPU time.

The choice travels with the object (its `encoding` metadata), not in the manifest: a blob is
shared by every manifest that names it, and was encoded by whichever host uploaded it first.
Decoding is bounded by the size the manifest gives and checked against the sha256 that names the
blob, so a damaged or hostile object can neither fill the disk nor pass for the right file.
"""

from __future__ import annotations

import hashlib
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .client import READ_CHUNK, SINGLE_PUT_LIMIT, StoredObject
from .errors import ObjectStoreError

ENCODING = "encoding"  # the object metadata key (x-amz-meta-encoding)
RAW = "identity"
ZLIB = "zlib"
COMPRESS_LEVEL = 6


class ChangedWhilePublishing(ObjectStoreError):
    pass


def pays(raw_size: int, compressed_size: int) -> bool:
    return compressed_size <= raw_size - raw_size // 16 and compressed_size < raw_size


@dataclass
class EncodedBlob:
    encoding: str
    body: bytes | IO[bytes]  # bytes up to SINGLE_PUT_LIMIT, else an open file at offset 0
    stored_size: int

    def close(self) -> None:
        if not isinstance(self.body, bytes):
            self.body.close()


def encode_file(path: Path, sha256: str, size: int) -> EncodedBlob:
    """Read `path` once more, check it still is the file scanned (size and sha256), and encode it."""
    if size <= SINGLE_PUT_LIMIT:
        data = path.read_bytes()
        _check_unchanged(path, sha256, size, hashlib.sha256(data).hexdigest(), len(data))
        compressed = zlib.compress(data, COMPRESS_LEVEL)
        if pays(len(data), len(compressed)):
            return EncodedBlob(ZLIB, compressed, len(compressed))
        return EncodedBlob(RAW, data, len(data))
    # Large (memory images): compress to a temporary file rather than into memory.
    digest = hashlib.sha256()
    compressor = zlib.compressobj(COMPRESS_LEVEL)
    spool = tempfile.TemporaryFile(prefix="openmicrovm-blob-")
    read = 0
    try:
        with open(path, "rb") as source:
            while chunk := source.read(READ_CHUNK):
                read += len(chunk)
                digest.update(chunk)
                spool.write(compressor.compress(chunk))
        spool.write(compressor.flush())
        _check_unchanged(path, sha256, size, digest.hexdigest(), read)
        stored = spool.tell()
        if pays(size, stored):
            spool.seek(0)
            return EncodedBlob(ZLIB, spool, stored)
        spool.close()
        return EncodedBlob(RAW, open(path, "rb"), size)  # closed by EncodedBlob.close()
    except BaseException:
        spool.close()
        raise


def _check_unchanged(path: Path, sha256: str, size: int, actual_sha: str, actual_size: int) -> None:
    if actual_sha != sha256 or actual_size != size:
        raise ChangedWhilePublishing(
            f"{path} changed while it was being published; a version's outputs must not change "
            "after its build: publish them again once nothing writes to them"
        )


class BlobCorrupt(ObjectStoreError):
    pass


def _inflate(stored: StoredObject) -> Iterator[bytes]:
    """The object's original bytes, in pieces of at most READ_CHUNK: a small hostile object cannot
    inflate to gigabytes in memory."""
    encoding = stored.metadata.get(ENCODING, RAW)
    if encoding == RAW:
        yield from stored.chunks
        return
    if encoding != ZLIB:
        raise BlobCorrupt(f"{stored.key} has an unknown encoding {encoding!r}")
    inflater = zlib.decompressobj()
    try:
        for chunk in stored.chunks:
            pending = chunk
            while pending:
                yield inflater.decompress(pending, READ_CHUNK)
                pending = inflater.unconsumed_tail
        yield inflater.flush()
    except zlib.error as error:
        raise BlobCorrupt(f"{stored.key} is not a valid zlib stream ({error})") from None
    if not inflater.eof:
        raise BlobCorrupt(f"{stored.key} is truncated (its zlib stream does not end)")


def decode_into(stored: StoredObject, sha256: str, size: int, out: IO[bytes]) -> None:
    """Write the object's original bytes to `out`; BlobCorrupt unless they are exactly `size`
    bytes hashing to `sha256` (what is written before that is found out is the caller's to drop)."""
    digest = hashlib.sha256()
    written = 0
    for data in _inflate(stored):
        written += len(data)
        if written > size:
            raise BlobCorrupt(f"{stored.key} holds more than the {size} bytes its manifest gives")
        digest.update(data)
        out.write(data)
    if written != size:
        raise BlobCorrupt(f"{stored.key} holds {written} bytes where its manifest gives {size}")
    if digest.hexdigest() != sha256:
        raise BlobCorrupt(f"{stored.key} does not hash to {sha256} (got {digest.hexdigest()})")


def decode_bytes(stored: StoredObject, sha256: str, limit: int) -> bytes:
    """The whole object (a manifest), at most `limit` bytes, checked against `sha256`."""
    pieces = []
    total = 0
    for data in _inflate(stored):
        total += len(data)
        if total > limit:
            raise BlobCorrupt(f"{stored.key} is larger than {limit} bytes")
        pieces.append(data)
    document = b"".join(pieces)
    if hashlib.sha256(document).hexdigest() != sha256:
        raise BlobCorrupt(f"{stored.key} does not hash to {sha256}")
    return document
