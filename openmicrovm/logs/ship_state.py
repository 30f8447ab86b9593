"""How far each stream has been shipped, one small JSON file per stream, so that a restart (or an
endpoint that comes back) continues exactly after the last event CloudWatch accepted."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ShipState:
    offset: int = 0  # LogStore offset just after the last event CloudWatch accepted
    done: bool = False  # the build or MicroVM has ended and everything it wrote was shipped
    # A batch whose PutLogEvents got no answer (timeout, dropped connection): it may or may not
    # have been stored, so it is looked up before it is sent again. [first offset, end offset].
    uncertain: list[int] | None = None


class ShipStateStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, ShipState] = {}

    def _path(self, stream: str) -> Path:
        kind, _, name = stream.partition("/")
        return self.root / kind / f"{name}.json"

    def get(self, stream: str) -> ShipState:
        state = self._cache.get(stream)
        if state is None:
            try:
                document = json.loads(self._path(stream).read_text())
                state = ShipState(
                    offset=int(document.get("offset", 0)),
                    done=bool(document.get("done", False)),
                    uncertain=document.get("uncertain"),
                )
            except (FileNotFoundError, ValueError, TypeError, AttributeError):
                state = ShipState()
            self._cache[stream] = state
        return state

    def save(self, stream: str, state: ShipState) -> None:
        """Durable before it returns: a lost update would ship the same events twice."""
        path = self._path(stream)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w") as handle:
            json.dump(asdict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        self._cache[stream] = state

    def streams(self) -> list[str]:
        """Every stream with a state file."""
        found = []
        for kind in ("builds", "microvms"):
            folder = self.root / kind
            if folder.is_dir():
                found += [f"{kind}/{file.stem}" for file in folder.glob("*.json")]
        return found

    def forget(self, stream: str) -> None:
        self._path(stream).unlink(missing_ok=True)
        self._cache.pop(stream, None)
