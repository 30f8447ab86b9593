"""The console's own JS libraries (static/lib/), run in the real browser and checked against the
Python implementations the server and boto3 use: hashlib and hmac for SHA-256, botocore's SigV4Auth
for request signing, zipfile (and the builder's rules) for the ZIP writer."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import io
import json
import stat
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.utils import percent_encode, percent_encode_sequence

from openmicrovm.api.auth import AuthError, SignedRequest, identify
from openmicrovm.config import AccessKey, Settings
from tests.console.conftest import BLANK_PAGE, DEFAULT_TIMEOUT_MS

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

# Loads the three libraries into window.lib. crypto.subtle is made to throw first: the console
# must sign on plain-http pages, where browsers do not offer it, so the libraries may not use it
# even though this test page (on 127.0.0.1) would have it.
_NO_SUBTLE = """
Object.defineProperty(Crypto.prototype, "subtle", {
  get() { throw new Error("crypto.subtle is off limits for the console libraries"); },
});
"""
_LOAD = """async () => {
  const [hash, sig, zip] = await Promise.all([
    import("/lib/sha256.js"), import("/lib/sigv4.js"), import("/lib/zip.js"),
  ]);
  window.lib = { ...hash, ...sig, ...zip };
  window.fromB64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
  window.toB64 = (bytes) => {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(s);
  };
}"""


@pytest.fixture(scope="module")
def lib(browser: Browser, static_server: str) -> Iterator[Page]:
    """A blank page with the libraries loaded as window.lib, shared by the module: the libraries
    are pure functions, and a fresh context per test would take most of the run's time."""
    context = browser.new_context()
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    page = context.new_page()
    page.add_init_script(_NO_SUBTLE)
    page.goto(static_server + BLANK_PAGE)
    page.evaluate(_LOAD)
    try:
        yield page
    finally:
        context.close()


def test_static_server_serves_modules_as_javascript(static_server: str) -> None:
    # Browsers refuse to run a module served under any other MIME type.
    with urllib.request.urlopen(static_server + "/lib/sigv4.js") as response:
        assert response.headers["Content-Type"] == "text/javascript"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


# --- SHA-256 and HMAC --------------------------------------------------------------------------


def _pattern(length: int) -> bytes:
    # Every byte value, in an order that is not just counting up.
    return bytes((i * 151 + 7) % 256 for i in range(length))


# Lengths around the padding edges: 55 bytes is the most that pads within one block, 56 needs a
# second; 64 is exactly a block, 119/120 the same edge one block later.
HASH_VECTORS: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("abc", b"abc"),
    ("fips-448-bit", b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
    ("55", b"a" * 55),
    ("56", b"a" * 56),
    ("63", _pattern(63)),
    ("64", b"a" * 64),
    ("65", b"a" * 65),
    ("119", _pattern(119)),
    ("120", _pattern(120)),
    ("1000", _pattern(1000)),
    ("all-bytes", bytes(range(256)) * 3),
    ("300k", _pattern(300_000)),
]

NON_ASCII = ["héllo wörld", "日本語のテキスト", "emoji 🚀✓ and a zero-width\u200bjoiner", "\u0000nul"]


@pytest.mark.parametrize(("name", "data"), HASH_VECTORS, ids=[name for name, _ in HASH_VECTORS])
def test_sha256_matches_hashlib(lib: Page, name: str, data: bytes) -> None:
    digest = lib.evaluate("(s) => lib.hex(lib.sha256(fromB64(s)))", b64(data))
    assert digest == hashlib.sha256(data).hexdigest(), name


@pytest.mark.parametrize("text", NON_ASCII)
def test_utf8_and_sha256_of_non_ascii_text(lib: Page, text: str) -> None:
    encoded, digest = lib.evaluate(
        "(t) => [toB64(lib.utf8(t)), lib.hex(lib.sha256(lib.utf8(t)))]",
        text,
    )
    assert unb64(encoded) == text.encode("utf-8")
    assert digest == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_sha256_of_a_large_upload(lib: Page) -> None:
    # 5 MB made in the page (sending it over would test Playwright, not the hash): the size of a
    # zipped build context, whose hash goes into X-Amz-Content-Sha256.
    size = 5_000_000
    digest = lib.evaluate(
        """(n) => {
          const b = new Uint8Array(n);
          for (let i = 0; i < n; i++) b[i] = (i * 151 + 7) & 255;
          return lib.hex(lib.sha256(b));
        }""",
        size,
    )
    assert digest == hashlib.sha256(_pattern(size)).hexdigest()


HMAC_VECTORS: list[tuple[str, bytes, bytes]] = [
    ("empty-key-empty-message", b"", b""),
    ("short-key", b"key", b"The quick brown fox jumps over the lazy dog"),
    ("block-sized-key", _pattern(64), b"message"),
    ("key-one-over-a-block", _pattern(65), b"message"),  # hashed first, as RFC 2104 says
    ("rfc4231-case-6", b"\xaa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First"),
    ("long-message", b"AWS4secret", _pattern(1000)),
    ("non-ascii", "clé secrète".encode(), "über die Brücke 🚀".encode()),
]


@pytest.mark.parametrize(("name", "key", "message"), HMAC_VECTORS, ids=[name for name, _, _ in HMAC_VECTORS])
def test_hmac_sha256_matches_python_hmac(lib: Page, name: str, key: bytes, message: bytes) -> None:
    digest = lib.evaluate(
        "([k, m]) => lib.hex(lib.hmacSha256(fromB64(k), fromB64(m)))",
        [b64(key), b64(message)],
    )
    assert digest == hmac.new(key, message, hashlib.sha256).hexdigest(), name


def test_hex_is_lowercase_two_digits_a_byte(lib: Page) -> None:
    data = bytes([0, 1, 15, 16, 127, 128, 171, 255])
    assert lib.evaluate("(s) => lib.hex(fromB64(s))", b64(data)) == data.hex()


# --- SigV4 -------------------------------------------------------------------------------------

SIGNED_AT = datetime.datetime(2026, 3, 14, 15, 9, 26, tzinfo=datetime.UTC)
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ+token=="
ARN = "arn:aws:lambda:us-east-1:123456789012:microvm-image/web/app:3"


@dataclass(frozen=True)
class SignCase:
    name: str
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | bytes | None = None
    session_token: str | None = None
    region: str = "us-east-1"

    def body_bytes(self) -> bytes:
        if self.body is None:
            return b""
        return self.body.encode("utf-8") if isinstance(self.body, str) else self.body


BASE = "http://127.0.0.1:8080"
JSON = {"Content-Type": "application/json"}

# URLs are written the way boto3 builds them (its own percent_encode for path labels and query),
# which is also a form the browser sends unchanged; test_case_urls_reach_the_wire_unchanged makes
# sure, so that botocore and the page sign the same bytes.
SIGN_CASES: list[SignCase] = [
    SignCase(
        "get-query-sorted-and-encoded",
        "GET",
        f"{BASE}/2025-09-30/microvm-images?"
        + percent_encode_sequence([("nextToken", "a/b+c="), ("maxResults", 5), ("Marker", "x y~z")]),
    ),
    SignCase("get-repeated-key-sorted-by-value", "GET", f"{BASE}/2025-09-30/tags?k=b&k=a&j=&flag"),
    SignCase(
        "post-json",
        "POST",
        f"{BASE}/2025-09-30/microvms",
        JSON,
        '{"ImageArn": "' + ARN + '", "Name": "caf\u00e9 \U0001f680", "MemoryMiB": 512}',
    ),
    SignCase(
        "post-json-session-token",
        "POST",
        f"{BASE}/2025-09-30/microvms",
        JSON,
        '{"Name": "web"}',
        session_token=SESSION_TOKEN,
    ),
    SignCase("put-binary-body", "PUT", f"{BASE}/2025-09-30/uploads/u-1", {}, _pattern(4097)),
    SignCase("delete-no-body", "DELETE", f"{BASE}/2025-09-30/microvms/mvm-0123456789abcdef"),
    SignCase(
        "arn-in-a-path-label",
        "GET",
        f"{BASE}/2025-09-30/microvm-images/{percent_encode(ARN)}/versions",
        session_token=SESSION_TOKEN,
    ),
    SignCase(
        "arn-label-and-query",
        "DELETE",
        f"{BASE}/2025-09-30/tags/{percent_encode(ARN)}?" + percent_encode_sequence([("tagKeys", "team/a b")]),
    ),
    SignCase("path-reserved-characters", "GET", f"{BASE}/a/b%20c/d~e/f!g/h$i/j'k/(l)/m*n/o,p;q=r@s"),
    SignCase("double-slashes-and-trailing-slash", "GET", f"{BASE}/2025-09-30//microvms///x/"),
    SignCase("root-path", "GET", f"{BASE}/"),
    SignCase("upper-case-host-other-port", "GET", "https://Console.Example.COM:8443/x"),
    SignCase("https-default-port", "GET", "https://lambda.example.com:443/x?a=1"),
    SignCase("http-default-port", "POST", "http://lambda.example.com:80/x", JSON, "{}"),
    SignCase("ipv6-host", "GET", "http://[::1]:9000/x"),
    SignCase(
        "extra-headers-whitespace-and-unsigned",
        "POST",
        f"{BASE}/2025-09-30/microvms",
        {
            "Content-Type": "application/json",
            "X-Custom": "  several   spaces\tand a tab  ",
            "User-Agent": "openmicrovm-console",  # botocore never signs it
            "X-Amzn-Trace-Id": "Root=1-abc",  # nor this
        },
        "{}",
    ),
    SignCase("other-region", "GET", f"{BASE}/2025-09-30/microvms", region="eu-west-2"),
    SignCase(
        "non-ascii-body-put", "PUT", f"{BASE}/x", {"Content-Type": "text/plain; charset=utf-8"}, "ü" * 70
    ),
]


def botocore_headers(case: SignCase, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The headers botocore's SigV4Auth sends for `case` at SIGNED_AT, names lowercased. The
    payload hash goes in as a header, as the console sends it, so botocore signs it too."""
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: SIGNED_AT.replace(tzinfo=None))
    body = case.body_bytes()
    headers = {**case.headers, "X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest()}
    request = AWSRequest(method=case.method, url=case.url, headers=headers, data=body)
    credentials = Credentials(ACCESS_KEY, SECRET_KEY, case.session_token)
    SigV4Auth(credentials, "lambda", case.region).add_auth(request)
    return {name.lower(): value for name, value in request.headers.items()}


def js_sign(page: Page, case: SignCase, now_ms: float) -> dict[str, str]:
    body: dict[str, Any] = (
        {"kind": "none"}
        if case.body is None
        else {"kind": "string", "value": case.body}
        if isinstance(case.body, str)
        else {"kind": "bytes", "value": b64(case.body)}
    )
    return page.evaluate(
        """([c, body, keyId, secret, now]) => lib.signRequest({
          method: c.method,
          url: c.url,
          headers: c.headers,
          body: body.kind === "none" ? undefined : body.kind === "string" ? body.value : fromB64(body.value),
          accessKeyId: keyId,
          secretAccessKey: secret,
          sessionToken: c.session_token ?? undefined,
          region: c.region,
          service: "lambda",
          now: new Date(now),
        })""",
        [
            {
                "method": case.method,
                "url": case.url,
                "headers": case.headers,
                "session_token": case.session_token,
                "region": case.region,
            },
            body,
            ACCESS_KEY,
            SECRET_KEY,
            now_ms,
        ],
    )


@pytest.mark.parametrize("case", SIGN_CASES, ids=[case.name for case in SIGN_CASES])
def test_signature_is_byte_identical_to_botocore(
    lib: Page, case: SignCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = js_sign(lib, case, SIGNED_AT.timestamp() * 1000)
    expected = botocore_headers(case, monkeypatch)
    assert sent["Authorization"] == expected["authorization"]
    # Not just the signature: every header botocore would send, with the same value.
    assert {name.lower(): value for name, value in sent.items()} == expected
    assert "Host" not in sent and "host" not in sent
    assert ("X-Amz-Security-Token" in sent) == (case.session_token is not None)


@pytest.mark.parametrize("case", SIGN_CASES, ids=[case.name for case in SIGN_CASES])
def test_case_urls_reach_the_wire_unchanged(lib: Page, case: SignCase) -> None:
    # The browser's URL parser rewrites some paths and queries (it encodes spaces, resolves dot
    # segments); the page signs what it will send, botocore what it is given. For the comparison
    # above to mean anything, the two must be the same.
    path_and_query = lib.evaluate("(u) => { const p = new URL(u); return p.pathname + p.search; }", case.url)
    assert case.url.endswith(path_and_query)


def test_the_servers_own_check_accepts_the_console_signature(lib: Page) -> None:
    # The server verifies with botocore over the request as received; this is that check, fed the
    # request as the browser sends it (its Host header is the URL's host and port).
    key = AccessKey(ACCESS_KEY, SECRET_KEY, "111122223333")
    settings = Settings(access_keys=(key,))
    case = SIGN_CASES[2]
    now_ms = datetime.datetime.now(datetime.UTC).timestamp() * 1000
    sent = js_sign(lib, case, now_ms)
    received = SignedRequest(case.method, case.url, {**sent, "Host": "127.0.0.1:8080"}, case.body_bytes())
    caller = identify(settings, received)
    assert (caller.account, caller.region, caller.access_key_id) == ("111122223333", "us-east-1", ACCESS_KEY)
    # The payload hash is checked against the body: another body with the same headers is refused.
    tampered = SignedRequest(case.method, case.url, received.headers, case.body_bytes() + b" ")
    with pytest.raises(AuthError, match="X-Amz-Content-SHA256"):
        identify(settings, tampered)


ENCODE_SAMPLES = [ARN, "a/b+c=", "x y~z", "é 🚀", "!*'();:@&=+$,/?#[]", "-_.~", ""]


@pytest.mark.parametrize("value", ENCODE_SAMPLES)
def test_encoding_helpers_match_boto3(lib: Page, value: str) -> None:
    label, query = lib.evaluate(
        "(v) => [lib.encodePathLabel(v), lib.encodeQuery([['k', v], ['n', 1]])]",
        value,
    )
    assert label == percent_encode(value)
    assert query == percent_encode_sequence([("k", value), ("n", 1)])


@pytest.mark.parametrize("header", ["Host", "host", "Date", "Content-Length", "Origin", "Sec-Fetch-Mode"])
def test_headers_the_browser_controls_are_refused(lib: Page, header: str) -> None:
    error = lib.evaluate(
        """(h) => {
          try {
            lib.signRequest({method: "GET", url: "http://127.0.0.1:8080/x", headers: {[h]: "v"},
              accessKeyId: "a", secretAccessKey: "s", region: "us-east-1"});
            return null;
          } catch (e) { return e.message; }
        }""",
        header,
    )
    assert error is not None and header in error


def test_a_header_given_twice_is_refused(lib: Page) -> None:
    error = lib.evaluate(
        """() => {
          try {
            lib.signRequest({method: "GET", url: "http://127.0.0.1:8080/x",
              headers: {"X-Tag": "a", "x-tag": "b"}, accessKeyId: "a", secretAccessKey: "s", region: "us-east-1"});
            return null;
          } catch (e) { return e.message; }
        }"""
    )
    assert error is not None and "twice" in error


# --- ZIP ---------------------------------------------------------------------------------------

ZIP_FILES: list[dict[str, Any]] = [
    {"path": "Dockerfile", "bytes": b"FROM scratch\nCOPY app /app\n"},
    {"path": "bin/", "mode": 0o755},
    {"path": "bin/entrypoint.sh", "bytes": b"#!/bin/sh\nexec /app\n", "mode": 0o755},
    {"path": "bin/setuid-ish", "bytes": b"x", "mode": 0o104750},  # full st_mode kept as given
    {"path": "app/données/é 🚀.txt", "bytes": "contenu: données 🚀".encode()},
    {"path": "app/empty", "bytes": b""},
    {"path": "app/binary.bin", "bytes": _pattern(70_000)},
]


def js_zip(page: Page, files: list[dict[str, Any]]) -> bytes:
    sent = [
        {k: (b64(v) if k == "bytes" else v) for k, v in f.items()}  # bytes travel as base64
        for f in files
    ]
    return unb64(
        page.evaluate(
            """(files) => toB64(lib.zipFiles(files.map((f) => ({
              ...f, bytes: f.bytes === undefined ? undefined : fromB64(f.bytes),
            }))))""",
            sent,
        )
    )


@pytest.fixture
def archive(lib: Page) -> Iterator[zipfile.ZipFile]:
    with zipfile.ZipFile(io.BytesIO(js_zip(lib, ZIP_FILES))) as opened:
        yield opened


def test_zip_names_and_bytes_survive(archive: zipfile.ZipFile) -> None:
    assert archive.testzip() is None  # every CRC-32 checks out
    assert archive.namelist() == [f["path"] for f in ZIP_FILES]
    for f in ZIP_FILES:
        assert archive.read(f["path"]) == f.get("bytes", b""), f["path"]
        info = archive.getinfo(f["path"])
        assert info.compress_type == zipfile.ZIP_STORED
        assert info.flag_bits & 0x800, "names are flagged as UTF-8"


def test_zip_keeps_unix_modes(archive: zipfile.ZipFile) -> None:
    modes = {info.filename: info.external_attr >> 16 for info in archive.infolist()}
    assert all(info.create_system == 3 for info in archive.infolist())  # Unix: modes are read
    assert modes["bin/entrypoint.sh"] == stat.S_IFREG | 0o755
    assert modes["Dockerfile"] == stat.S_IFREG | 0o644
    assert modes["bin/"] == stat.S_IFDIR | 0o755
    assert modes["bin/setuid-ish"] == 0o104750
    assert archive.getinfo("bin/").is_dir()


def test_zip_extracts_with_the_execute_bit(archive: zipfile.ZipFile, tmp_path: Path) -> None:
    # zipfile.extract drops modes, so apply them as the builder does, from external_attr.
    for info in archive.infolist():
        archive.extract(info, tmp_path)
        if not info.is_dir():
            (tmp_path / info.filename).chmod(stat.S_IMODE(info.external_attr >> 16))
    script = tmp_path / "bin" / "entrypoint.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    assert not (tmp_path / "Dockerfile").stat().st_mode & stat.S_IXUSR


def test_zip_of_nothing_is_a_valid_empty_archive(lib: Page) -> None:
    with zipfile.ZipFile(io.BytesIO(js_zip(lib, []))) as empty:
        assert empty.namelist() == []


def test_zip_is_reproducible(lib: Page) -> None:
    # Same folder, same bytes: fixed timestamps, no randomness.
    assert js_zip(lib, ZIP_FILES) == js_zip(lib, ZIP_FILES)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/etc/passwd", "absolute"),
        ("C:/Windows/x", "absolute"),
        ("../outside", '".."'),
        ("app/../../outside", '".."'),
        ("app/..", '".."'),
        ("app\\..\\x", "backslash"),
        ("app//x", "empty"),
        ("./Dockerfile", "empty"),
        ("", "no path"),
    ],
)
def test_zip_refuses_paths_that_leave_the_folder(lib: Page, path: str, why: str) -> None:
    message = lib.evaluate(
        """(p) => {
          try { lib.zipFiles([{path: "ok", bytes: new Uint8Array(1)}, {path: p, bytes: new Uint8Array(1)}]); }
          catch (e) { return e.message; }
          return null;
        }""",
        path,
    )
    assert message is not None, f"{path!r} was accepted"
    assert why in message
    if path:
        assert json.dumps(path) in message  # the message names the path


def test_zip_refuses_a_path_given_twice(lib: Page) -> None:
    message = lib.evaluate(
        """() => { try { lib.zipFiles([{path: "a", bytes: new Uint8Array()}, {path: "a", bytes: new Uint8Array()}]); }
                   catch (e) { return e.message; } return null; }"""
    )
    assert message is not None and '"a"' in message
