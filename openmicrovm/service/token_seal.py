"""Sealed endpoint tokens: compact JWE with alg "dir" and enc "A256GCM", as the live service issues.

The claims (account, MicroVM, allowed ports, kind, expiry) are encrypted and authenticated with a
key kept in the data dir. Several keys may be known at once so that the key can be rotated:
new tokens use the newest key, tokens sealed with an older one stay valid until they expire.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from openmicrovm.private_files import private_dir, write_private_file


class TokenError(Exception):
    """The token is not one of ours: malformed, truncated, forged or sealed with an unknown key."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _b64decode(text: str) -> bytes:
    if not text or any(
        c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text
    ):
        raise TokenError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class TokenClaims:
    account: str
    microvm_id: str
    ports: tuple[tuple[int, int], ...]  # inclusive ranges
    kind: str  # "endpoint" or "shell"
    issued_at: float
    expires_at: float
    token_id: str

    def allows_port(self, port: int) -> bool:
        return any(start <= port <= end for start, end in self.ports)


class KeyRing:
    """The token keys of one data dir, in <data dir>/keys/token-keys.json (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, bytes] = {}
        self._current = ""
        self._load()

    def _load(self) -> None:
        if self.path.exists():
            stored = json.loads(self.path.read_text())
            self._keys = {kid: bytes.fromhex(key) for kid, key in stored["keys"].items()}
            self._current = stored["current"]
        else:
            self.rotate()

    def _save(self) -> None:
        private_dir(self.path.parent, "token keys dir")
        stored = {"current": self._current, "keys": {k: v.hex() for k, v in self._keys.items()}}
        # A crash mid-write must not leave a truncated key file: every token would stop opening.
        write_private_file(self.path, json.dumps(stored).encode())

    def rotate(self) -> str:
        """A new key seals new tokens; the previous key still opens the tokens it sealed (a token lives
        at most 60 minutes, so rotate no more often than that to keep every token valid)."""
        kid = str(uuid.uuid4())
        kept = {self._current: self._keys[self._current]} if self._current in self._keys else {}
        self._keys = {**kept, kid: AESGCM.generate_key(bit_length=256)}
        self._current = kid
        self._save()
        return kid

    def seal(self, claims: TokenClaims) -> str:
        header = _b64encode(json.dumps({"kid": self._current, "alg": "dir", "enc": "A256GCM"}).encode())
        payload = json.dumps(
            {
                "acct": claims.account,
                "vm": claims.microvm_id,
                "ports": [list(r) for r in claims.ports],
                "kind": claims.kind,
                "iat": claims.issued_at,
                "exp": claims.expires_at,
                "jti": claims.token_id,
            },
            separators=(",", ":"),
        ).encode()
        iv = secrets.token_bytes(12)
        sealed = AESGCM(self._keys[self._current]).encrypt(iv, payload, header.encode("ascii"))
        ciphertext, tag = sealed[:-16], sealed[-16:]
        # Compact serialisation; the encrypted-key part is empty with "dir".
        return ".".join([header, "", _b64encode(iv), _b64encode(ciphertext), _b64encode(tag)])

    def open(self, token: str) -> TokenClaims:
        parts = token.split(".")
        if len(parts) != 5 or parts[1] != "":
            raise TokenError("not a compact JWE with a direct key")
        try:
            header: dict[str, Any] = json.loads(_b64decode(parts[0]))
            if not isinstance(header, dict):
                raise TokenError("the protected header is not a JSON object")
            if header.get("alg") != "dir" or header.get("enc") != "A256GCM":
                raise TokenError("unsupported algorithm")
            key = self._keys.get(str(header.get("kid")))
            if key is None:
                raise TokenError("unknown key")
            iv, ciphertext, tag = (_b64decode(p) for p in parts[2:])
            payload = AESGCM(key).decrypt(iv, ciphertext + tag, parts[0].encode("ascii"))
            claims = json.loads(payload)
            if not isinstance(claims, dict):
                raise TokenError("the claims are not a JSON object")
            return TokenClaims(
                account=str(claims["acct"]),
                microvm_id=str(claims["vm"]),
                ports=tuple((int(a), int(b)) for a, b in claims["ports"]),
                kind=str(claims["kind"]),
                issued_at=float(claims["iat"]),
                expires_at=float(claims["exp"]),
                token_id=str(claims["jti"]),
            )
        except TokenError:
            raise
        except (InvalidTag, ValueError, KeyError, TypeError) as error:
            raise TokenError(f"cannot open token: {type(error).__name__}") from None
