"""A tenant app for the reliability tests: a well-behaved target for endpoint abuse, and, on
request, a hostile tenant that tries to hurt its host and its neighbours.

Port 8080 (all interfaces) and 9090 (127.0.0.1 only, the port a token must not escalate to):
GET  /headers            the request headers as JSON, the port, and how many requests this port saw
GET  /count              how many requests this port has seen (smuggled requests would show here)
GET  /slow?seconds=S     answers after S seconds
GET  /probe?targets=h:p,…  tries a TCP connection to each target and says what happened
GET  /pids               how many processes this sandbox shows
POST /forkbomb           starts a fork bomb in a detached child, answers at once (202)
POST /eat-memory?mib=N   a child allocates and touches N MiB; answers how it ended
POST /fill-disk?mib=N    writes N MiB to /tmp/fill; answers how much got written and why it stopped
"""

import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

MIB = 1024 * 1024
counts = {8080: 0, 9090: 0}
lock = threading.Lock()


def fork_bomb() -> None:
    if os.fork():
        return
    os.setsid()
    while True:
        try:
            os.fork()
        except OSError:
            time.sleep(0.01)


def eat_memory(mib: int) -> dict:
    pid = os.fork()
    if pid == 0:
        blocks = []
        for _ in range(mib):
            block = bytearray(MIB)
            for offset in range(0, MIB, 4096):
                block[offset] = 1
            blocks.append(block)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status)}


def fill_disk(mib: int) -> dict:
    written, error = 0, None
    chunk = b"\xa5" * MIB
    try:
        with open("/tmp/fill", "wb") as handle:
            for _ in range(mib):
                handle.write(chunk)
                handle.flush()
                written += MIB
    except OSError as failure:
        error = f"{type(failure).__name__}: {failure}"
    return {"written": written, "error": error}


def probe(targets: str) -> dict:
    results = {}
    for target in filter(None, targets.split(",")):
        host, _, port = target.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            results[target] = "connected"
        except OSError as failure:
            results[target] = f"{type(failure).__name__}"
    return results


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def count(self) -> int:
        port = self.server.server_address[1]
        with lock:
            counts[port] += 1
            return counts[port]

    def do_GET(self) -> None:
        seen = self.count()
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        port = self.server.server_address[1]
        if url.path == "/headers":
            self.reply(
                200,
                {
                    "headers": [[k, v] for k, v in self.headers.items()],
                    "port": port,
                    "count": seen,
                    "path": self.path,
                },
            )
        elif url.path == "/count":
            self.reply(200, {"count": seen, "port": port})
        elif url.path == "/slow":
            time.sleep(float(query.get("seconds", "1")))
            self.reply(200, {"slept": float(query.get("seconds", "1"))})
        elif url.path == "/probe":
            self.reply(200, probe(query.get("targets", "")))
        elif url.path == "/pids":
            self.reply(200, {"pids": sum(name.isdigit() for name in os.listdir("/proc"))})
        else:
            self.reply(404, {"error": "not found", "path": self.path})

    def do_POST(self) -> None:
        self.count()
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if url.path == "/forkbomb":
            fork_bomb()
            self.reply(202, {"started": True})
        elif url.path == "/eat-memory":
            self.reply(200, eat_memory(int(query.get("mib", "64"))))
        elif url.path == "/fill-disk":
            self.reply(200, fill_disk(int(query.get("mib", "64"))))
        else:
            self.reply(200, {"bytes": len(body), "path": self.path})

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    request_queue_size = 256  # a flood is queued, not refused by a 5-deep accept backlog


def serve(host: str, port: int) -> None:
    Server((host, port), Handler).serve_forever()


if __name__ == "__main__":
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    threading.Thread(target=serve, args=("127.0.0.1", 9090), daemon=True).start()
    print(f"tenant app pid {os.getpid()} on :8080 and 127.0.0.1:9090", flush=True)
    serve("0.0.0.0", 8080)
