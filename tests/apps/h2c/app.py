"""An app that speaks only cleartext HTTP/2 (prior knowledge) on 127.0.0.1:8080: every request is
answered with JSON describing it, so a test can see what reached the app over h2c.
(Threads and blocking sockets: this gVisor release cannot checkpoint an asyncio event loop's epoll.)"""

import json
import socketserver

import h2.config
import h2.connection
import h2.events
import h2.exceptions


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        connection.initiate_connection()
        self.request.sendall(connection.data_to_send())
        requests: dict[int, dict] = {}
        while data := self.request.recv(65536):
            try:
                events = connection.receive_data(data)
            except h2.exceptions.ProtocolError:
                break
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id] = {"headers": dict(event.headers), "body": b""}
                elif isinstance(event, h2.events.DataReceived):
                    requests[event.stream_id]["body"] += event.data
                    connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    request = requests.pop(event.stream_id)
                    headers = request["headers"]
                    body = json.dumps(
                        {
                            "protocol": "h2",
                            "method": headers.get(":method"),
                            "path": headers.get(":path"),
                            "authority": headers.get(":authority"),
                            "headers": {k: v for k, v in headers.items() if not k.startswith(":")},
                            "body_bytes": len(request["body"]),
                        }
                    ).encode()
                    connection.send_headers(
                        event.stream_id, [(":status", "200"), ("content-type", "application/json")]
                    )
                    connection.send_data(event.stream_id, body, end_stream=True)
            self.request.sendall(connection.data_to_send())


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


if __name__ == "__main__":
    print("h2c app on 127.0.0.1:8080", flush=True)
    Server(("127.0.0.1", 8080), Handler).serve_forever()
