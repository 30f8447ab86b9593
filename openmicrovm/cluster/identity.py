"""A host's identity: chosen once per data dir, so that a restarted agent is the same host and
re-adopts its sandboxes."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from openmicrovm.private_files import write_private_file

HOST_ID_FILE = "host-id"
_HOST_ID = re.compile(r"host-[0-9a-f]{12}")


def host_id_of(data_dir: Path) -> str:
    """The id in `<data_dir>/host-id`, made on first use."""
    path = data_dir / HOST_ID_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if _HOST_ID.fullmatch(text):
        return text
    if text:
        raise ValueError(f"{path} holds {text!r}, not a host id (host-<12 hex digits>): remove the file")
    host_id = f"host-{secrets.token_hex(6)}"
    write_private_file(path, host_id.encode())
    return host_id
