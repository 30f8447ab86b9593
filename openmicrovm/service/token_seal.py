"""Sealed endpoint tokens: compact JWE with alg "dir" and enc "A256GCM", as the live service issues.

The claims (account, MicroVM, allowed ports, kind, expiry) are encrypted and authenticated with a
key kept in the database, so that every server of one database opens every token.
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

from openmicrovm.store import Store, Tx


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


# How many opened tokens a key ring remembers (the oldest goes first).
OPENED_TOKENS_KEPT = 4096


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
    """The token keys of one database. Several may be known at once so that a key can be
    replaced: new tokens use the newest key, older ones still open the tokens they sealed."""

    def __init__(self, keys: dict[str, bytes], current: str) -> None:
        self._keys = dict(keys)
        self._current = current
        # Tokens opened lately, as they opened: an endpoint client sends the same token with
        # every request, and decrypting it each time was a tenth of the endpoint's work. Only
        # tokens that opened are kept (a stranger's guesses cannot fill it), and the keys never
        # change under it; the caller still checks expiry and ports every time.
        self._opened: dict[str, TokenClaims] = {}

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
        claims = self._opened.get(token)
        if claims is None:
            claims = self._decrypt(token)
            if len(self._opened) >= OPENED_TOKENS_KEPT:
                del self._opened[next(iter(self._opened))]
            self._opened[token] = claims
        return claims

    def _decrypt(self, token: str) -> TokenClaims:
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


def load_keyring(store: Store, legacy_file: Path) -> KeyRing:
    """The database's token keys; the first server makes one. Keys an older openmicrovm kept in
    a file of the data dir are imported (tokens it sealed stay valid), then the file is removed."""

    def load(tx: Tx) -> list[tuple[str, bytes, float]]:
        if not tx.token_keys.all():
            now = store.clock()
            if legacy_file.exists():
                stored = json.loads(legacy_file.read_text())
                # The current key is stored last, so that it is the newest.
                others = [kid for kid in stored["keys"] if kid != stored["current"]]
                for offset, kid in enumerate([*others, stored["current"]]):
                    tx.token_keys.add(kid, bytes.fromhex(stored["keys"][kid]), now + offset * 0.001)
            else:
                tx.token_keys.add(str(uuid.uuid4()), AESGCM.generate_key(bit_length=256), now)
        return tx.token_keys.all()

    keys = store.transact(load)
    legacy_file.unlink(missing_ok=True)
    return KeyRing({kid: key for kid, key, _ in keys}, keys[-1][0])
