"""`openmicrovm tls init | ca`: the local certificate authority behind the optional TLS port."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from openmicrovm.config import load_settings
from openmicrovm.endpoint.tls import all_regions, ensure_ca, issue_server_certificate, tls_dir


def _init(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, {"data_dir": args.data_dir})
    directory = tls_dir(settings.data_dir)
    ca = ensure_ca(directory)
    cert, _ = issue_server_certificate(directory, all_regions(settings.default_region))
    print(f"CA certificate:     {ca}")
    print(f"server certificate: {cert} (localhost, 127.0.0.1, *.lambda-microvm.<region>.localhost)")
    print("serve TLS with tls_port in the settings (or OPENMICROVM_TLS_PORT), then trust the CA, e.g.")
    print(f"  curl --cacert {ca} https://<endpoint>:<tls port>/ -H 'X-aws-proxy-auth: <token>'")
    print(f"  boto3.client('lambda-microvms', endpoint_url='https://localhost:<tls port>', verify='{ca}')")
    return 0


def _ca(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, {"data_dir": args.data_dir})
    try:
        sys.stdout.write(ensure_ca(tls_dir(settings.data_dir)).read_text())
    except PermissionError:
        print(
            f"openmicrovm tls ca: {settings.data_dir} is not readable by this user. The CA certificate "
            "is public: ask the server's administrator for <data dir>/tls/ca.pem, or run "
            "`sudo openmicrovm tls ca`.",
            file=sys.stderr,
        )
        return 1
    return 0


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tls = commands.add_parser("tls", help="the local CA for https:// endpoints")
    verbs = tls.add_subparsers(dest="tls_command", required=True)
    for name, run, summary in (
        ("init", _init, "make the CA and the server certificate"),
        ("ca", _ca, "print the CA certificate (PEM) to trust"),
    ):
        verb = verbs.add_parser(name, help=summary)
        verb.add_argument("--data-dir", type=Path, help="the data dir (default ~/.local/share/openmicrovm)")
        verb.add_argument("--config", type=Path, help="settings file (default <data dir>/settings.toml)")
        verb.set_defaults(run=run)
