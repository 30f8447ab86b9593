"""Request generators for fuzzing the real server.

Model-driven: for every operation of botocore's `lambda-microvms` model, hypothesis strategies
walk the input shape (structures, unions, lists, maps, enums, patterns, lengths, ranges) and build
the HTTP request the rest-json protocol implies: URI labels (percent-encoded, raw, or odd), query
members, the JSON body. Each value is valid most of the time and otherwise something else (wrong
type, out of range, too long, odd characters, nulls, junk), so requests get past the outer checks
and into the service. Requests are SigV4-signed, with the server's own algorithm (botocore's).

Raw: a corpus of malformed HTTP (bad request lines, huge or folded headers, smuggling framings,
bad chunked bodies, bad JSON, wrong methods, odd paths) plus generated variations, sent as bytes.

`Verdict` is what every answer is judged by: never a 5xx, never silence past the deadline, an
AWS-shaped error or a model-shaped success, and never a signature refusal of a correctly signed
request.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import string
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import botocore.session
from botocore.model import ListShape, MapShape, OperationModel, Shape, StructureShape
from hypothesis import strategies as st

from tests.reliability.sigv4 import signed_headers
from tests.support.model_check import ModelMismatch, check_error, check_output

MODEL = botocore.session.get_session().get_service_model("lambda-microvms")
OPERATIONS = sorted(MODEL.operation_names)
# Characters a URI may carry unencoded (RFC 3986): requests built of these must never fail their
# signature check; anything else is a client's own business.
_DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")
# aiohttp refuses longer request lines with its own plain-text 400, before routing.
MAX_REQUEST_LINE = 8190 - 20
URI_SAFE = set(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%?")


@dataclass(frozen=True)
class Identifiers:
    """Real identifiers on the fuzzed server, so that some requests reach real records."""

    own_images: tuple[str, ...]
    foreign_images: tuple[str, ...]
    microvms: tuple[str, ...]
    build_ids: tuple[str, ...]


ODD_LABELS = [
    "",
    ".",
    "..",
    "../..",
    "%2e%2e",
    "%2E%2E%2F%2E%2E",
    "a/b",
    "a%2Fb",
    "%00",
    "%ff%fe",
    "%",
    "%zz",
    "\u00e9",
    "\u202e",
    " ",
    "x" * 300,
    "x" * 5000,
    "microvm-00000000-0000-0000-0000-000000000000",
    "arn:aws:lambda:us-east-1:aws:microvm-image:al2023-1",
    "arn:aws:lambda:us-east-1:000000000000:microvm-image:",
    "arn:aws:lambda:us-east-1:000000000000:microvm-image:x:y",
    "ARN:AWS:LAMBDA:US-EAST-1:000000000000:MICROVM-IMAGE:X",
    "arn:aws:lambda:us-east-1:000000000000:function:f",
    "1.0",
    "0.0",
    "-1.0",
    "99999999999999999999.0",
    "1.0.0",
]

JUNK_SCALARS: list[Any] = [
    None,
    True,
    0,
    -1,
    2**31,
    2**63,
    -(2**63) - 1,
    10**30,
    1.5,
    1e308,
    "",
    " ",
    "\x00",
    "\ud800",
    "\u0000\u0001\u001f",
    "x" * 70000,
    "null",
    "[]",
    "{}",
]


def _json_junk() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.sampled_from(JUNK_SCALARS),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=8,
    )


JUNK = _json_junk()


def _pattern_strategy(pattern: str) -> st.SearchStrategy[str] | None:
    try:
        re.compile(pattern)
    except re.error:
        return None
    return st.from_regex(pattern, fullmatch=True)


_TAG_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "_.:/=+-@ \u00e9\u4e2d", max_size=40)


def _string(shape: Shape) -> st.SearchStrategy[str]:
    if shape.enum:
        return st.sampled_from(list(shape.enum))
    low, high = shape.metadata.get("min", 0), shape.metadata.get("max", 64)
    pattern = shape.metadata.get("pattern")
    base = _pattern_strategy(pattern) if pattern else None
    if base is None:
        base = _TAG_TEXT if pattern else st.text(max_size=min(high, 80))
    return base.map(lambda value: value[: max(high, 1)]).map(
        lambda value: value if len(value) >= low else value.ljust(low, "a")
    )


def _integer(shape: Shape) -> st.SearchStrategy[int]:
    low, high = shape.metadata.get("min"), shape.metadata.get("max")
    return st.integers(min_value=low, max_value=high)


def valid_value(shape: Shape, depth: int = 0) -> st.SearchStrategy[Any]:
    """A value that satisfies the shape's type and bounds (and its pattern where hypothesis can)."""
    if isinstance(shape, StructureShape):
        if shape.metadata.get("union"):
            return st.one_of(
                *(
                    st.builds(lambda v, n=name: {n: v}, member_value(m, depth + 1))
                    for name, m in shape.members.items()
                )
            )
        required = {name: member_value(shape.members[name], depth + 1) for name in shape.required_members}
        optional = {
            name: member_value(m, depth + 1)
            for name, m in shape.members.items()
            if name not in shape.required_members and m.serialization.get("location") is None
        }
        return st.fixed_dictionaries(required, optional=optional)
    if isinstance(shape, ListShape):
        low, high = shape.metadata.get("min", 0), min(shape.metadata.get("max", 4), 4)
        return st.lists(member_value(shape.member, depth + 1), min_size=low, max_size=max(low, high))
    if isinstance(shape, MapShape):
        return st.dictionaries(_string(shape.key), member_value(shape.value, depth + 1), max_size=4)
    if shape.type_name == "string":
        return _string(shape)
    if shape.type_name in ("integer", "long"):
        return _integer(shape)
    if shape.type_name == "boolean":
        return st.booleans()
    if shape.type_name == "timestamp":
        return st.integers(min_value=0, max_value=2**32)
    return JUNK


def member_value(shape: Shape, depth: int = 0) -> st.SearchStrategy[Any]:
    """Valid four times out of five; otherwise junk of any JSON type."""
    if depth > 6:
        return JUNK
    valid = valid_value(shape, depth)
    return st.one_of(valid, valid, valid, valid, JUNK)


@dataclass
class WireRequest:
    operation: str
    method: str
    path: str  # as sent, query included
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    signed: bool = True

    @property
    def uri_safe(self) -> bool:
        """Plain RFC 3986 characters, and no dot segments (which SigV4 signers normalise away and
        HTTP stacks resolve, each in their own way): what every signer and server agree on."""
        path = self.path.partition("?")[0]
        return all(char in URI_SAFE for char in self.path) and _DOT_SEGMENT.search(path) is None


def _label_strategy(name: str, ids: Identifiers) -> st.SearchStrategy[str]:
    known: list[str] = []
    if name in ("imageIdentifier", "Resource"):
        known = [*ids.own_images, *ids.foreign_images]
    elif name == "microvmIdentifier":
        known = list(ids.microvms)
    elif name == "buildId":
        known = list(ids.build_ids)
    elif name == "imageVersion":
        known = ["1.0", "2.0"]
    sources = [st.sampled_from(ODD_LABELS), st.text(max_size=30)]
    if known:
        sources = [st.sampled_from(known)] * 3 + sources
    return st.one_of(*sources)


def _encode_label(value: str, how: str) -> str:
    if how == "quoted":
        return urllib.parse.quote(value, safe="")
    if how == "arn-raw":
        return urllib.parse.quote(value, safe=":")
    return "".join(c if c.isprintable() and c not in " #?" else urllib.parse.quote(c) for c in value)


@st.composite
def wire_requests(draw: st.DrawFn, ids: Identifiers) -> WireRequest:
    """One request for a model operation, built the way the rest-json protocol places members."""
    operation: OperationModel = MODEL.operation_model(draw(st.sampled_from(OPERATIONS)))
    shape = operation.input_shape
    uri = operation.http["requestUri"]
    path, _, fixed_query = uri.partition("?")
    query: list[tuple[str, str]] = []
    body: dict[str, Any] = {}
    if shape is not None:
        for name, member in shape.members.items():
            location = member.serialization.get("location")
            wire = member.serialization.get("name", name)
            if location == "uri":
                value = draw(_label_strategy(wire, ids))
                how = draw(st.sampled_from(["quoted", "quoted", "arn-raw", "raw"]))
                path = path.replace("{" + wire + "}", _encode_label(value, how)).replace(
                    "{" + wire + "+}", value
                )
            elif location == "querystring":
                if draw(st.booleans()):
                    values = draw(
                        st.lists(
                            st.one_of(valid_value(member).map(str), st.text(max_size=20)),
                            min_size=1,
                            max_size=3,
                        )
                    )
                    query += [(wire, v) for v in (values if isinstance(member, ListShape) else values[:1])]
            elif location is None and (name in shape.required_members or draw(st.booleans())):
                body[name] = draw(member_value(member))
    if draw(st.integers(0, 9)) == 0:
        query.append((draw(st.text(min_size=1, max_size=10)), draw(st.text(max_size=10))))
    query_string = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    if fixed_query:
        query_string = "&".join(filter(None, [fixed_query, query_string]))
    full_path = path + (f"?{query_string}" if query_string else "")
    encoded = b""
    if body or operation.http["method"] in ("POST", "PUT", "PATCH"):
        mangle = draw(st.integers(0, 19))
        if mangle == 0:
            encoded = draw(st.binary(max_size=200))
        elif mangle == 1:
            encoded = json.dumps(draw(JUNK)).encode()
        else:
            encoded = json.dumps(body).encode()
    headers = {
        "Content-Type": draw(
            st.sampled_from(["application/json"] * 5 + ["text/plain", "application/x-amz-json-1.1", ""])
        )
    }
    return WireRequest(operation.name, operation.http["method"], full_path, encoded, headers)


# ------------------------------------------------------------------------------------------- sending


@dataclass
class Answer:
    status: int | None
    headers: dict[str, str]
    body: bytes
    seconds: float
    error: str | None = None


def _read_response(
    sock: socket.socket, deadline: float
) -> tuple[int | None, dict[str, str], bytes, str | None]:
    data = b""
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None, {}, data, "timed out waiting for the response head"
        if not chunk:
            return None, {}, data, "closed without a response" if not data else "closed mid-head"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ")[1])
    except (IndexError, ValueError):
        return None, {}, data, f"bad status line {lines[0]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    while len(rest) < length:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return status, headers, rest, "timed out reading the body"
        if not chunk:
            break
        rest += chunk
    return status, headers, rest, None


def send(port: int, request: WireRequest, key: str, secret: str, timeout: float = 15.0) -> Answer:
    """One request on a fresh connection, signed (unless request.signed is False)."""
    headers = dict(request.headers)
    if request.signed:
        headers = signed_headers(
            f"http://127.0.0.1:{port}{request.path}",
            request.method,
            request.body,
            key,
            secret,
            headers=headers,
        )
    lines = [
        f"{request.method} {request.path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Connection: close",
        f"Content-Length: {len(request.body)}",
    ]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    payload = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", errors="surrogateescape") + request.body
    started = time.monotonic()
    deadline = started + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(payload)
            status, answer_headers, body, error = _read_response(sock, deadline)
    except OSError as failure:
        return Answer(None, {}, b"", time.monotonic() - started, f"{type(failure).__name__}: {failure}")
    return Answer(status, answer_headers, body, time.monotonic() - started, error)


# Answers explained by known bugs (each shown by an xfail test): tallied, not flagged.
_ENCODED_LINE_BREAK = re.compile(r"%0[aAdD]")


def known_bug(request: WireRequest, answer: Answer) -> str | None:
    if answer.status == 404 and answer.body == b"404: Not Found" and _ENCODED_LINE_BREAK.search(request.path):
        return "test_fuzz.py::test_a_path_with_an_encoded_line_break_gets_an_aws_error"
    return None


@dataclass
class Verdict:
    """Tallies over many requests, and the problems worth a look."""

    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    known: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0
    slowest: float = 0.0

    def judge(self, request: WireRequest, answer: Answer) -> None:
        self.sent += 1
        self.slowest = max(self.slowest, answer.seconds)
        where = f"{request.method} {request.path[:150]} body={request.body[:120]!r}"
        if answer.status is not None:
            self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
        bug = known_bug(request, answer)
        if bug is not None:
            self.known[bug] = self.known.get(bug, 0) + 1
            return
        if answer.status is None:
            self.problems.append(f"no answer ({answer.error}) to {where}")
            return
        if answer.status >= 500:
            self.server_errors += 1
            self.problems.append(f"{answer.status} {answer.body[:200]!r} to {where}")
            return
        if answer.status == 400 and (not request.uri_safe or len(request.path) > MAX_REQUEST_LINE):
            # Refused by the HTTP parser before any routing (raw non-ASCII or control bytes in the
            # target, or a request line over aiohttp's 8190 bytes): any 400 will do.
            return
        code = answer.headers.get("x-amzn-errortype", "").split(":")[0]
        if (
            request.signed
            and request.uri_safe
            and code in ("InvalidSignatureException", "IncompleteSignatureException")
        ):
            self.problems.append(
                f"a correctly signed request was refused ({code}: {answer.body[:160]!r}): {where}"
            )
        try:
            document = json.loads(answer.body) if answer.body else None
        except ValueError:
            self.problems.append(
                f"{answer.status} with a body that is not JSON {answer.body[:100]!r}: {where}"
            )
            return
        try:
            if answer.status >= 300:
                if code == "UnknownOperationException":
                    return
                check_error(request.operation, code, document)
            else:
                expected = MODEL.operation_model(request.operation).http.get("responseCode", 200)
                if answer.status != expected:
                    self.problems.append(f"{answer.status}, not {expected}: {where}")
                check_output(request.operation, document)
        except ModelMismatch as mismatch:
            self.problems.append(f"answer does not fit the model ({mismatch}): {where}")


# --------------------------------------------------------------------------------------- raw HTTP

API_PATHS = [
    "/2025-09-09/microvm-images",
    "/2025-09-09/microvms",
    "/2025-09-09/managed-microvm-images",
    "/2017-03-31/tags/arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Amicrovm-image%3Ax",
]


def _request(
    method: str, path: str, headers: list[str], body: bytes = b"", version: str = "HTTP/1.1"
) -> bytes:
    return (f"{method} {path} {version}\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode(
        "utf-8", errors="surrogateescape"
    ) + body


def raw_corpus(endpoint_host: str) -> list[tuple[str, bytes]]:
    """Named malformed requests, each on its own connection. `endpoint_host` names a MicroVM
    endpoint (which need not exist), so the data-plane parser gets the same abuse."""
    api = "/2025-09-09/microvm-images"
    close = ["Host: 127.0.0.1", "Connection: close"]
    body = b'{"name": "x"}'
    corpus: list[tuple[str, bytes]] = [
        ("garbage", b"GARBAGE\r\n\r\n"),
        ("binary", bytes(range(256)) + b"\r\n\r\n"),
        ("empty request line", b"\r\n\r\n\r\n\r\n"),
        ("method only", b"GET\r\n\r\n"),
        ("no version", b"GET /\r\n\r\n"),
        ("HTTP/9.9", _request("GET", api, close, version="HTTP/9.9")),
        ("HTTP/0.9", b"GET /\r\n"),
        ("lowercase method", _request("get", api, close)),
        ("unknown method", _request("FROB", api, close)),
        ("TRACE", _request("TRACE", api, close)),
        ("CONNECT", _request("CONNECT", "127.0.0.1:22", close)),
        ("OPTIONS *", _request("OPTIONS", "*", close)),
        ("PATCH on a list", _request("PATCH", api, close)),
        ("DELETE on a collection", _request("DELETE", "/2025-09-09/microvms", close)),
        ("absolute-form", _request("GET", f"http://evil.example{api}", close)),
        ("NUL in path", _request("GET", api + "\x00", close)),
        (
            "space in path",
            b"GET /2025-09-09/microvm images HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        ),
        ("double slashes", _request("GET", "//2025-09-09//microvm-images//", close)),
        ("dot segments", _request("GET", "/2025-09-09/microvm-images/../microvms", close)),
        (
            "encoded dot segments",
            _request("GET", "/2025-09-09/microvm-images/%2e%2e/%2e%2e/etc/passwd", close),
        ),
        ("encoded slash in label", _request("GET", "/2025-09-09/microvms/a%2F..%2F..%2Fx", close)),
        ("bad percent", _request("GET", "/2025-09-09/microvms/%zz%", close)),
        ("overlong utf-8", _request("GET", "/2025-09-09/microvms/%c0%ae%c0%ae", close)),
        ("huge path", _request("GET", "/2025-09-09/microvms/" + "a" * 70000, close)),
        ("huge query", _request("GET", api + "?nameFilter=" + "a" * 70000, close)),
        ("many query params", _request("GET", api + "?" + "&".join(f"p{i}=x" for i in range(5000)), close)),
        ("huge header", _request("GET", api, [*close, "X-Big: " + "a" * 200000])),
        ("many headers", _request("GET", api, close + [f"X-H{i}: v" for i in range(5000)])),
        ("header without colon", _request("GET", api, [*close, "NoColonHere"])),
        ("space before colon", _request("GET", api, [*close, "Content-Length : 0"])),
        ("obs-fold", _request("GET", api, [*close, "X-Folded: a", " b"])),
        ("bare LF lines", b"GET /2025-09-09/microvm-images HTTP/1.1\nHost: 127.0.0.1\nConnection: close\n\n"),
        ("bare CR in header", _request("GET", api, [*close, "X-A: a\rb"])),
        ("NUL in header", _request("GET", api, [*close, "X-A: a\x00b"])),
        ("non-ascii header name", _request("GET", api, [*close, "X-\u00e9: 1"])),
        ("duplicate Host", _request("GET", api, ["Host: a", "Host: b", "Connection: close"])),
        ("no Host on 1.1", _request("GET", api, ["Connection: close"])),
        ("HTTP/1.0 no Host", _request("GET", api, [], version="HTTP/1.0")),
        (
            "CL and TE",
            _request("POST", api, [*close, "Content-Length: 4", "Transfer-Encoding: chunked"], b"0\r\n\r\n"),
        ),
        (
            "two different CLs",
            _request("POST", api, [*close, "Content-Length: 1", "Content-Length: 2"], b"ab"),
        ),
        ("negative CL", _request("POST", api, [*close, "Content-Length: -1"], body)),
        ("hex CL", _request("POST", api, [*close, "Content-Length: 0x10"], body)),
        ("plus CL", _request("POST", api, [*close, "Content-Length: +13"], body)),
        ("superscript CL", _request("POST", api, [*close, "Content-Length: \u00b2"], body)),
        ("huge CL", _request("POST", api, [*close, "Content-Length: 99999999999999999999999"], body)),
        ("CL larger than body", _request("POST", api, [*close, "Content-Length: 100"], body)),
        ("TE gzip", _request("POST", api, [*close, "Transfer-Encoding: gzip"], body)),
        (
            "TE chunked, chunked",
            _request("POST", api, [*close, "Transfer-Encoding: chunked, chunked"], b"0\r\n\r\n"),
        ),
        ("TE with space", _request("POST", api, [*close, "Transfer-Encoding : chunked"], b"0\r\n\r\n")),
        ("TE xchunked", _request("POST", api, [*close, "Transfer-Encoding: xchunked"], b"0\r\n\r\n")),
        (
            "chunk size junk",
            _request("POST", api, [*close, "Transfer-Encoding: chunked"], b"zz\r\nabc\r\n0\r\n\r\n"),
        ),
        (
            "chunk size overflow",
            _request(
                "POST",
                api,
                [*close, "Transfer-Encoding: chunked"],
                b"fffffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk size negative",
            _request("POST", api, [*close, "Transfer-Encoding: chunked"], b"-5\r\nabc\r\n0\r\n\r\n"),
        ),
        (
            "chunk without CRLF",
            _request("POST", api, [*close, "Transfer-Encoding: chunked"], b"3\r\nabcdef0\r\n\r\n"),
        ),
        (
            "chunk extension huge",
            _request(
                "POST",
                api,
                [*close, "Transfer-Encoding: chunked"],
                b"3;" + b"e" * 100000 + b"\r\nabc\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunked trailer junk",
            _request(
                "POST",
                api,
                [*close, "Transfer-Encoding: chunked"],
                b"0\r\nX-Trailer: " + b"t" * 100000 + b"\r\n\r\n",
            ),
        ),
        ("truncated chunked", _request("POST", api, [*close, "Transfer-Encoding: chunked"], b"10\r\nabc")),
        ("bad JSON", _request("POST", api, [*close, "Content-Length: 5"], b"{{{{{")),
        ("JSON array", _request("POST", api, [*close, "Content-Length: 2"], b"[]")),
        ("JSON null", _request("POST", api, [*close, "Content-Length: 4"], b"null")),
        ("non-utf8 JSON", _request("POST", api, [*close, "Content-Length: 4"], b"\xff\xfe{}")),
        ("deeply nested JSON", _request("POST", api, [*close, "Content-Length: 100000"], b"[" * 100000)),
        (
            "huge JSON number",
            _request("POST", api, [*close, "Content-Length: 10009"], b'{"n": ' + b"9" * 10000 + b"}"),
        ),
        (
            "body over the limit",
            _request("POST", api, [*close, f"Content-Length: {2 * 1024 * 1024}"], b"a" * 1024),
        ),
        ("expect 100-continue", _request("POST", api, [*close, "Content-Length: 5", "Expect: 100-continue"])),
        ("expect junk", _request("POST", api, [*close, "Content-Length: 2", "Expect: 200-ok"], b"{}")),
        (
            "h2c upgrade",
            _request(
                "GET",
                api,
                [
                    *close,
                    "Upgrade: h2c",
                    "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                    "Connection: Upgrade, HTTP2-Settings",
                ],
            ),
        ),
        ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        (
            "websocket on the API",
            _request(
                "GET",
                api,
                [
                    *close,
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    "Sec-WebSocket-Key: x",
                    "Sec-WebSocket-Version: 13",
                ],
            ),
        ),
        (
            "pipelined requests",
            b"".join(
                _request("GET", "/2025-09-09/managed-microvm-images", ["Host: 127.0.0.1"]) for _ in range(100)
            )
            + _request("GET", api, close),
        ),
        (
            "bad authorization",
            _request("GET", api, [*close, "Authorization: AWS4-HMAC-SHA256 Credential=\xff/\x00"]),
        ),
        (
            "authorization scope junk",
            _request(
                "GET",
                api,
                [
                    *close,
                    "Authorization: AWS4-HMAC-SHA256 Credential=A/B/C/D/"
                    "aws4_request, SignedHeaders=host, Signature=00",
                    "X-Amz-Date: 20200101T000000Z",
                ],
            ),
        ),
    ]
    for name, payload in list(corpus):
        if b"Host: 127.0.0.1\r\n" in payload:
            corpus.append(
                (
                    f"endpoint: {name}",
                    payload.replace(b"Host: 127.0.0.1\r\n", f"Host: {endpoint_host}\r\n".encode()),
                )
            )
    return corpus


_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "get", "G ET", "", "\x00", "POST\t"]
_VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "http/1.1", "HTTP/1.1 ", "", "HTTP/11"]
_HEADER_NAMES = [
    "Content-Length",
    "Transfer-Encoding",
    "Host",
    "Connection",
    "Expect",
    "Content-Type",
    "X-aws-proxy-auth",
    "X-aws-proxy-port",
    "Authorization",
    "X-Amz-Date",
    "Upgrade",
    "X-Any",
]


@st.composite
def raw_requests(draw: st.DrawFn, endpoint_host: str) -> bytes:
    """A request assembled from parts that are each sometimes wrong."""
    method = draw(st.sampled_from(_METHODS))
    path = draw(st.one_of(st.sampled_from(API_PATHS), st.text(max_size=60).map(lambda t: "/" + t)))
    version = draw(st.sampled_from(_VERSIONS))
    host = draw(st.sampled_from(["127.0.0.1", "x", endpoint_host, f"{endpoint_host}:1", "", "a b"]))
    headers = [f"Host: {host}", "Connection: close"]
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.one_of(st.sampled_from(_HEADER_NAMES), st.text(min_size=1, max_size=12)))
        value = draw(
            st.one_of(
                st.sampled_from(["0", "5", "chunked", "close", "-1", "", "\u00b2"]), st.text(max_size=30)
            )
        )
        headers.append(f"{name}: {value}")
    body = draw(st.one_of(st.just(b""), st.binary(max_size=64), st.just(b"5\r\nhello\r\n0\r\n\r\n")))
    line_end = draw(st.sampled_from(["\r\n"] * 8 + ["\n", "\r"]))
    text = f"{method} {path} {version}{line_end}" + "".join(h + line_end for h in headers) + line_end
    return text.encode("utf-8", errors="surrogateescape") + body


def send_raw(
    port: int, payload: bytes, timeout: float = 20.0, quiet: float = 0.5
) -> tuple[list[int], str | None]:
    """Send bytes and read what comes back until the server closes, or it has answered and then
    been quiet for a second. If it says nothing for `quiet` seconds (a request whose end it is
    still waiting for), the write side is closed and it gets two more seconds to answer or close.
    Returns (statuses seen, problem or None); the problem is a server still at it after `timeout`."""
    data = b""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            try:
                sock.sendall(payload)
            except OSError:
                pass  # the server may refuse to read it all; what it answered still counts
            last = time.monotonic()
            half_closed = False
            while time.monotonic() - started < timeout:
                window = 1.0 if data else (2.0 if half_closed else quiet)
                wait = window - (time.monotonic() - last)
                if wait <= 0:
                    if data or half_closed:
                        return _statuses(data), None
                    half_closed = True
                    last = time.monotonic()
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                    continue
                sock.settimeout(wait)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    return _statuses(data), None
                if not chunk:
                    return _statuses(data), None
                data += chunk
                last = time.monotonic()
            return _statuses(data), "timed out: the server kept the exchange going"
    except OSError as failure:
        return _statuses(data), f"{type(failure).__name__}: {failure}"


def _statuses(data: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]
