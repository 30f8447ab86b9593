"""A separate process that fetches one manifest and reports what it did (concurrency tests):

    python -m tests.objects.fetcher <store url> <endpoint url> <manifest uri> <cache root>

prints {"path": ..., "gets": <GetObject requests sent>} as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from openmicrovm.objects import ObjectStore, fetch_blocking


def main(url: str, endpoint: str, manifest_uri: str, cache_root: str) -> None:
    store = ObjectStore(url, endpoint, workers=2)
    gets: list[str] = []
    store.client.meta.events.register("before-call.s3.GetObject", lambda **_: gets.append("get"))
    path = fetch_blocking(store, manifest_uri, Path(cache_root))
    print(json.dumps({"path": str(path), "gets": len(gets)}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
