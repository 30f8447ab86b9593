"""`openmicrovm curl | forward | shell`: a MicroVM's endpoint without handling tokens by hand.

Each mints a token through the public API (CreateMicrovmAuthToken / CreateMicrovmShellAuthToken),
then talks to the endpoint through the server, naming the MicroVM's endpoint in the Host header
(`<uuid>.lambda-microvm.<region>.localhost` need not resolve on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import aiohttp

from openmicrovm.cli.connection import CliError, Connection, add_connection_arguments, connect
from openmicrovm.cli.output import cli_command
from openmicrovm.endpoint.http1 import (
    MAX_HEAD_BYTES,
    ProtocolError,
    parse_head,
    pipe,
    read_head,
    relay_body,
    request_framing,
    response_framing,
)

TOKEN_MINUTES = 60
REFRESH_BEFORE_SECONDS = 300


class _Tokens:
    """An endpoint token for one MicroVM and port, minted again before it expires."""

    def __init__(self, connection: Connection, microvm_id: str, port: int, shell: bool = False) -> None:
        self.client = connection.client()
        self.microvm_id = microvm_id
        self.port = port
        self.shell = shell
        self._token = ""
        self._expires = 0.0
        microvm = self.client.get_microvm(microvmIdentifier=microvm_id)
        self.endpoint = microvm["endpoint"]
        self.state = microvm["state"]

    def current(self) -> str:
        if time.monotonic() > self._expires - REFRESH_BEFORE_SECONDS:
            if self.shell:
                answer = self.client.create_microvm_shell_auth_token(
                    microvmIdentifier=self.microvm_id, expirationInMinutes=TOKEN_MINUTES
                )
            else:
                answer = self.client.create_microvm_auth_token(
                    microvmIdentifier=self.microvm_id,
                    expirationInMinutes=TOKEN_MINUTES,
                    allowedPorts=[{"port": self.port}],
                )
            self._token = answer["authToken"]["X-aws-proxy-auth"]
            self._expires = time.monotonic() + TOKEN_MINUTES * 60
        return self._token


def _server_address(connection: Connection) -> tuple[str, int, str]:
    url = urllib.parse.urlsplit(connection.endpoint_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.hostname or "127.0.0.1", port, url.scheme


# -- curl ------------------------------------------------------------------------------------------
@cli_command
def _curl(args: argparse.Namespace) -> int:
    connection = connect(args)
    tokens = _Tokens(connection, args.microvm_id, args.port)
    host, port, scheme = _server_address(connection)
    headers = {
        "Host": f"{tokens.endpoint}:{port}",
        "X-aws-proxy-auth": tokens.current(),
        "X-aws-proxy-port": str(args.port),
    }
    for header in args.header or []:
        name, colon, value = header.partition(":")
        if not colon:
            raise CliError(f"--header must look like 'Name: value', not {header!r}", 2)
        headers[name.strip()] = value.strip()
    data = args.data.encode() if args.data is not None else None
    path = args.path if args.path.startswith("/") else f"/{args.path}"

    async def fetch() -> int:
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                args.request or ("POST" if data is not None else "GET"),
                f"{scheme}://{host}:{port}{path}",
                headers=headers,
                data=data,
                allow_redirects=False,
            ) as response,
        ):
            if args.include:
                sys.stdout.write(f"HTTP/1.1 {response.status} {response.reason}\r\n")
                for name, value in response.raw_headers:
                    sys.stdout.write(f"{name.decode('latin-1')}: {value.decode('latin-1')}\r\n")
                sys.stdout.write("\r\n")
                sys.stdout.flush()
            async for chunk in response.content.iter_any():
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            if response.status >= 400:
                print(f"openmicrovm curl: HTTP {response.status} from {args.microvm_id}", file=sys.stderr)
                return 22  # as curl --fail does
            return 0

    return asyncio.run(fetch())


# -- forward ---------------------------------------------------------------------------------------
async def _forward_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: tuple[str, int],
    tokens: _Tokens,
    host_header: str,
) -> None:
    """Relay one local connection to the endpoint, adding the token to every request."""
    try:
        up_reader, up_writer = await asyncio.open_connection(*target, limit=MAX_HEAD_BYTES)
    except OSError:
        writer.close()
        return
    try:
        while (raw := await read_head(reader)) is not None:
            head = parse_head(raw, request=True)
            head.remove(lambda name: name in ("host", "x-aws-proxy-auth", "x-aws-proxy-port"))
            head.headers[:0] = [
                ("Host", host_header),
                ("X-aws-proxy-auth", tokens.current()),
                ("X-aws-proxy-port", str(tokens.port)),
            ]
            up_writer.write(head.serialize())
            await relay_body(request_framing(head), reader, up_writer, lambda _d: None)
            answer = await read_head(up_reader)
            if answer is None:
                break
            response = parse_head(answer, request=False)
            writer.write(answer)
            if response.start[1] == "101":
                await asyncio.gather(
                    pipe(reader, up_writer, lambda _d: None), pipe(up_reader, writer, lambda _d: None)
                )
                break
            framing = response_framing(response, head.start[0])
            await relay_body(framing, up_reader, writer, lambda _d: None)
            if framing.kind == "close":
                break
    except (ProtocolError, ConnectionError, OSError):
        pass
    finally:
        up_writer.close()
        writer.close()


@cli_command
def _forward(args: argparse.Namespace) -> int:
    connection = connect(args)
    tokens = _Tokens(connection, args.microvm_id, args.port)
    host, port, scheme = _server_address(connection)
    if scheme != "http":
        raise CliError("forward speaks plain HTTP to the server; use an http:// --endpoint-url", 2)
    host_header = f"{tokens.endpoint}:{port}"

    async def serve() -> None:
        server = await asyncio.start_server(
            lambda r, w: _forward_connection(r, w, (host, port), tokens, host_header),
            args.bind,
            args.local,
            limit=MAX_HEAD_BYTES,
        )
        print(
            f"forwarding http://{args.bind}:{args.local} → {args.microvm_id} port {args.port} (Ctrl-C to stop)",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with server:
            await stop.wait()

    try:
        asyncio.run(serve())
    except OSError as error:
        raise CliError(f"cannot listen on {args.bind}:{args.local}: {error.strerror}") from None
    return 0


# -- shell -----------------------------------------------------------------------------------------
def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
        return size.lines, size.columns
    except OSError:
        return 24, 80


async def _shell_session(
    url: str, headers: dict[str, str], token: str, on_resize: Callable[[Any], None]
) -> int:
    rows, cols = _terminal_size()
    loop = asyncio.get_running_loop()
    status = 1
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            f"{url}/shell?rows={rows}&cols={cols}",
            headers=headers,
            protocols=(
                "lambda-microvms",
                f"lambda-microvms.authentication.{token}",
                "lambda-microvms.port.8022",
            ),
        ) as socket,
    ):
        on_resize(
            lambda: asyncio.ensure_future(
                socket.send_str(
                    json.dumps({"type": "resize", "rows": _terminal_size()[0], "cols": _terminal_size()[1]})
                )
            )
        )
        keys: asyncio.Queue[bytes] = asyncio.Queue()
        stdin = sys.stdin.fileno()
        loop.add_reader(stdin, lambda: keys.put_nowait(os.read(stdin, 4096)))

        async def send_keys() -> None:
            while data := await keys.get():
                await socket.send_bytes(data)
            loop.remove_reader(stdin)  # end of input

        sender = asyncio.ensure_future(send_keys())
        try:
            async for message in socket:
                if message.type == aiohttp.WSMsgType.BINARY:
                    os.write(sys.stdout.fileno(), message.data)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    control = json.loads(message.data)
                    if control.get("type") == "exit":
                        status = int(control.get("status", 0))
        finally:
            sender.cancel()
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(stdin)
    return status


@cli_command
def _shell(args: argparse.Namespace) -> int:
    connection = connect(args)
    tokens = _Tokens(connection, args.microvm_id, 8022, shell=True)
    host, port, scheme = _server_address(connection)
    headers = {"Host": f"{tokens.endpoint}:{port}"}
    interactive = sys.stdin.isatty()
    saved = None
    if interactive:
        import termios
        import tty

        saved = termios.tcgetattr(sys.stdin.fileno())
        tty.setraw(sys.stdin.fileno())

    def on_resize(callback: Any) -> None:
        if interactive:
            asyncio.get_running_loop().add_signal_handler(signal.SIGWINCH, callback)

    try:
        return asyncio.run(_shell_session(f"{scheme}://{host}:{port}", headers, tokens.current(), on_resize))
    except aiohttp.WSServerHandshakeError as error:
        raise CliError(
            f"the shell of {args.microvm_id} refused the connection: HTTP {error.status}"
        ) from None
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    curl = commands.add_parser("curl", help="send one HTTP request to a MicroVM's endpoint")
    curl.add_argument("microvm_id")
    curl.add_argument("path", nargs="?", default="/")
    curl.add_argument("--port", type=int, default=8080, help="port inside the MicroVM (default 8080)")
    curl.add_argument("-X", "--request", help="method (default GET, or POST with --data)")
    curl.add_argument("-d", "--data", help="request body")
    curl.add_argument("-H", "--header", action="append", help="extra header 'Name: value' (repeatable)")
    curl.add_argument("-i", "--include", action="store_true", help="print the response status and headers")
    add_connection_arguments(curl)
    curl.set_defaults(run=_curl)

    forward = commands.add_parser("forward", help="a local port that reaches a MicroVM port, token added")
    forward.add_argument("microvm_id")
    forward.add_argument("--port", type=int, default=8080, help="port inside the MicroVM (default 8080)")
    forward.add_argument("--local", type=int, required=True, help="local port to listen on")
    forward.add_argument("--bind", default="127.0.0.1", help="local address to listen on (default 127.0.0.1)")
    add_connection_arguments(forward)
    forward.set_defaults(run=_forward)

    shell = commands.add_parser("shell", help="an interactive shell in a MicroVM run with SHELL_INGRESS")
    shell.add_argument("microvm_id")
    add_connection_arguments(shell)
    shell.set_defaults(run=_shell)
