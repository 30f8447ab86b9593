"""The gRPC test app (tests/apps/grpc) and what its image needs: grpcio and typing_extensions
from this venv, copied into the build context (the managed base image has the same Python and
glibc; builds reach no package index)."""

from __future__ import annotations

import importlib
from pathlib import Path

import grpc

from tests.support.images import REPO

GRPC_APP = REPO / "tests" / "apps" / "grpc"


def grpc_app_files() -> dict[str, bytes]:
    """The build context: the app, its Dockerfile, grpc/ and typing_extensions.py."""
    files = {p.name: p.read_bytes() for p in GRPC_APP.iterdir() if p.is_file()}
    grpc_root = Path(grpc.__file__).parent
    for path in grpc_root.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            files[f"grpc/{path.relative_to(grpc_root)}"] = path.read_bytes()
    typing_extensions = importlib.import_module("typing_extensions")
    files["typing_extensions.py"] = Path(str(typing_extensions.__file__)).read_bytes()
    return files
