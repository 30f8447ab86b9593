"""A small MicroVM app that exercises everything a MicroVM image can do.

GET / answers JSON: the id chosen at import (shared by every MicroVM restored from one snapshot),
a request counter, the microvmId and payload the run hook delivered, and how often each hook ran.
Every lifecycle hook is served on the same port under /aws/lambda-microvms/runtime/v1/<hook>.

Knobs, read on every request so tests can make hooks misbehave. They come from the environment
(the image's environmentVariables, shared by every MicroVM of a version) or, for one MicroVM, from
a run hook payload that is a JSON object, e.g. runHookPayload='{"SUSPEND_STATUS": "500"}':
  PORT (8080)            where to listen (all interfaces, as the hook caller requires; env only)
  READY_DELAY (0.3)      seconds after start during which /ready answers 503 ("not yet")
  <HOOK>_STATUS (200)    status a hook answers, e.g. READY_STATUS=500, SUSPEND_STATUS=500
  <HOOK>_SLEEP (0)       seconds a hook waits before answering, e.g. READY_SLEEP=3600
"""

import json
import os
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOOK_PREFIX = "/aws/lambda-microvms/runtime/v1/"
HOOKS = ("ready", "validate", "run", "resume", "suspend", "terminate")

# Made once at import, i.e. before the snapshot: every MicroVM of a version shares them (spec 4.7).
INSTANCE_ID = f"{uuid.uuid4()}-{random.randrange(10**6):06d}"
STARTED = time.monotonic()

lock = threading.Lock()
counter = 0
run_hook_body: dict[str, object] = {"microvmId": None, "runHookPayload": None}
hook_calls = {hook: 0 for hook in HOOKS}
payload_knobs: dict[str, str] = {}  # this MicroVM's knobs, from its run hook payload


def knob(name: str, default: str) -> str:
    return payload_knobs.get(name, os.environ.get(name, default))


def hook_status(hook: str) -> int:
    if hook == "ready" and time.monotonic() - STARTED < float(knob("READY_DELAY", "0.3")):
        return 503
    return int(knob(f"{hook.upper()}_STATUS", "200"))


def take_run_body(raw: bytes) -> None:
    """Remember microvmId and runHookPayload; a payload that is a JSON object also sets knobs."""
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    payload = body.get("runHookPayload")
    run_hook_body["microvmId"] = body.get("microvmId")
    run_hook_body["runHookPayload"] = payload
    try:
        knobs = json.loads(payload) if isinstance(payload, str) else None
    except ValueError:
        knobs = None  # an ordinary string payload
    if isinstance(knobs, dict):
        payload_knobs.update({str(key): str(value) for key, value in knobs.items()})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send_json(self, status: int, body: dict[str, object], close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            # Hook connections are not reused across a freeze (spec 5.7 advice).
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        global counter
        with lock:
            counter += 1
            body = {
                "id": INSTANCE_ID,
                "counter": counter,
                "microvmId": run_hook_body["microvmId"],
                "payload": run_hook_body["runHookPayload"],
                "hooks": dict(hook_calls),
            }
        self.send_json(200, body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        hook = self.path[len(HOOK_PREFIX) :] if self.path.startswith(HOOK_PREFIX) else None
        if hook not in HOOKS:
            self.send_json(404, {"error": f"no such path {self.path}"})
            return
        if hook == "run":
            with lock:
                take_run_body(raw)
        time.sleep(float(knob(f"{hook.upper()}_SLEEP", "0")))
        status = hook_status(hook)
        with lock:
            hook_calls[hook] += 1
        self.send_json(status, {"hook": hook, "status": status}, close=True)

    def log_message(self, format: str, *args: object) -> None:
        print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}", flush=True)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8080"))
    print(f"sample app {INSTANCE_ID} listening on 0.0.0.0:{port}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
