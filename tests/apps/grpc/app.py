"""A gRPC server for the endpoint tests, on 127.0.0.1:8080 (cleartext HTTP/2, as gRPC apps in a
MicroVM listen). Messages are raw bytes (no protobuf): the endpoint sees gRPC framing only.

/echo.Echo/Say      unary: b"said:" + the request; metadata "x-echo" comes back as a trailer;
                    a request of b"fail" ends with status INVALID_ARGUMENT and a message
/echo.Echo/Chat     bidirectional: each message comes back as b"<n>:" + message, n counting every
                    message this process has seen (it survives a suspend/resume, as memory does)
/echo.Echo/Count    server streaming: the request is a number N; N messages, one every 50 ms
/echo.Echo/Headers  unary: the request metadata as "name=value" lines (what the app was sent)
/echo.Echo/LastCount unary: how the last Count went: b"<messages sent> cancelled|finished"
"""

import threading
import time
from concurrent import futures

import grpc

seen = 0
lock = threading.Lock()


def say(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"fail":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "asked to fail")
    echo = dict(context.invocation_metadata()).get("x-echo")
    if echo:
        context.set_trailing_metadata((("x-echo", echo),))
    return b"said:" + request


def chat(requests, context: grpc.ServicerContext):
    global seen
    for message in requests:
        with lock:
            seen += 1
            number = seen
        yield b"%d:%s" % (number, message)


last_count = {"sent": 0, "cancelled": False}


def count(request: bytes, context: grpc.ServicerContext):
    last_count.update(sent=0, cancelled=False)
    context.add_callback(lambda: last_count.update(cancelled=not context.is_active()))
    for n in range(int(request)):
        if not context.is_active():
            last_count["cancelled"] = True
            return
        yield b"%d" % n
        last_count["sent"] = n + 1
        time.sleep(0.05)


def last(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"%d %s" % (last_count["sent"], b"cancelled" if last_count["cancelled"] else b"finished")


def headers(request: bytes, context: grpc.ServicerContext) -> bytes:
    return "\n".join(f"{k}={v}" for k, v in context.invocation_metadata()).encode()


handlers = {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
    "Count": grpc.unary_stream_rpc_method_handler(count),
    "Headers": grpc.unary_unary_rpc_method_handler(headers),
    "LastCount": grpc.unary_unary_rpc_method_handler(last),
}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("echo.Echo", handlers),))
server.add_insecure_port("127.0.0.1:8080")
server.start()
print("grpc app listening on 127.0.0.1:8080", flush=True)
server.wait_for_termination()
