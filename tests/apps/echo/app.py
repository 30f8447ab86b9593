"""A protocol test app for the endpoint: it listens on 127.0.0.1 only (the endpoint must still reach
it) on ports 8080 and 9090, and shows what arrives.

GET  /headers            the request headers as JSON, plus the port that served them
GET  /download?bytes=N   N bytes of a repeating pattern, chunked, written 64 KiB at a time
POST /upload             reads the body (Content-Length or chunked), answers its size and sha256
GET  /sse?count=N&gap=S  N server-sent events, S seconds apart, each flushed as it is made
GET  /ws                 a WebSocket that echoes every message back
"""

import base64
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PATTERN = bytes(range(256)) * 256  # 64 KiB
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/headers":
            headers = [[k, v] for k, v in self.headers.items()]
            body = {
                "headers": headers,
                "port": self.server.server_address[1],
                "client": self.client_address[0],
            }
            self.reply(200, json.dumps(body).encode())
        elif url.path == "/download":
            remaining = int(query.get("bytes", "0"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while remaining:
                piece = PATTERN[: min(remaining, len(PATTERN))]
                self.chunk(piece)
                remaining -= len(piece)
            self.chunk(b"")
        elif url.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            time.sleep(float(query.get("wait", "0")))  # before the first event
            for index in range(int(query.get("count", "3"))):
                self.chunk(f"data: {json.dumps({'n': index, 't': time.time()})}\n\n".encode())
                time.sleep(float(query.get("gap", "0.2")))
            self.chunk(b"")
        elif url.path == "/ws":
            self.websocket()
        else:
            self.reply(404, b'{"error": "not found"}')

    def do_POST(self) -> None:
        digest = hashlib.sha256()
        size = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                length = int(self.rfile.readline().split(b";")[0], 16)
                if length == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    break
                data = self.rfile.read(length)
                self.rfile.readline()
                digest.update(data)
                size += len(data)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                data = self.rfile.read(min(remaining, 1 << 16))
                digest.update(data)
                size += len(data)
                remaining -= len(data)
        self.reply(200, json.dumps({"bytes": size, "sha256": digest.hexdigest()}).encode())

    def websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        if offered:
            self.send_header("Sec-WebSocket-Protocol", offered[0])
        self.end_headers()
        self.wfile.flush()
        while True:
            header = self.rfile.read(2)
            if len(header) < 2:
                return
            opcode, length = header[0] & 0x0F, header[1] & 0x7F
            if length == 126:
                length = int.from_bytes(self.rfile.read(2), "big")
            elif length == 127:
                length = int.from_bytes(self.rfile.read(8), "big")
            mask = self.rfile.read(4) if header[1] & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 0x8:  # close: answer it and stop
                self.wfile.write(b"\x88\x00")
                return
            size = len(payload)
            prefix = bytes([0x80 | opcode])
            if size < 126:
                prefix += bytes([size])
            elif size < 65536:
                prefix += bytes([126]) + size.to_bytes(2, "big")
            else:
                prefix += bytes([127]) + size.to_bytes(8, "big")
            self.wfile.write(prefix + payload)
            self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(port: int) -> None:
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    threading.Thread(target=serve, args=(9090,), daemon=True).start()
    print(f"echo app pid {os.getpid()} on 127.0.0.1:8080 and :9090", flush=True)
    serve(8080)
