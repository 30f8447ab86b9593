"""TLS with the local CA: the API and the endpoints over https://, verified against the CA."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from typing import Any

import boto3

from tests.support.endpoint import auth_token
from tests.support.server import ServerProcess


def test_api_and_endpoint_over_tls(endpoint_server: ServerProcess, echo_vm: dict[str, Any]) -> None:
    tls_port = endpoint_server.settings["tls_port"]
    ca = endpoint_server.data_dir / "tls" / "ca.pem"
    assert ca.exists()
    printed = subprocess.run(
        [sys.executable, "-m", "openmicrovm", "tls", "ca", "--data-dir", str(endpoint_server.data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert printed.stdout == ca.read_text()

    client = boto3.client(
        "lambda-microvms",
        endpoint_url=f"https://localhost:{tls_port}",
        verify=str(ca),
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    assert client.get_microvm(microvmIdentifier=echo_vm["microvmId"])["state"] == "RUNNING"

    token = auth_token(endpoint_server.client(), echo_vm["microvmId"])
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", tls_port)) as raw,
        context.wrap_socket(raw, server_hostname=echo_vm["endpoint"]) as tls,
    ):
        tls.sendall(
            f"GET /headers HTTP/1.1\r\nHost: {echo_vm['endpoint']}\r\nX-aws-proxy-auth: {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = b""
        while data := tls.recv(65536):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["port"] == 8080

    # A client that does not trust the CA is refused at the handshake.
    untrusting = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", tls_port)) as raw:
        try:
            untrusting.wrap_socket(raw, server_hostname=echo_vm["endpoint"])
            raise AssertionError("the handshake should have failed")
        except ssl.SSLCertVerificationError:
            pass


def test_the_console_is_served_over_tls_too(endpoint_server: ServerProcess) -> None:
    context = ssl.create_default_context(cafile=str(endpoint_server.data_dir / "tls" / "ca.pem"))
    url = f"https://localhost:{endpoint_server.settings['tls_port']}/console/"
    with urllib.request.urlopen(url, context=context, timeout=30) as page:
        assert page.status == 200
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        assert b'src="/console/app.js"' in page.read()
