"""The key ring remembers tokens it opened: that memory never lets a forged token through and
never grows without bound."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from openmicrovm.service.token_seal import OPENED_TOKENS_KEPT, KeyRing, TokenClaims, TokenError


def _claims(n: int = 0) -> TokenClaims:
    return TokenClaims("123456789012", f"vm-{n}", ((8080, 8080),), "endpoint", 0.0, 10.0**10, f"jti-{n}")


def _ring() -> KeyRing:
    return KeyRing({"k1": AESGCM.generate_key(bit_length=256)}, "k1")


def test_an_opened_token_opens_again_and_altered_copies_still_fail() -> None:
    ring = _ring()
    token = ring.seal(_claims())
    assert ring.open(token) == ring.open(token) == _claims()
    header, empty, iv, ciphertext, tag = token.split(".")
    flipped = ciphertext[:-2] + ("A" if ciphertext[-2] != "A" else "B") + ciphertext[-1]
    for forged in (
        ".".join([header, empty, iv, flipped, tag]),
        token + "A",
        token[:-1],
        token.replace(".", "..", 1),
    ):
        with pytest.raises(TokenError):
            ring.open(forged)


def test_another_rings_token_does_not_open_after_this_ring_opened_its_own() -> None:
    ours, theirs = _ring(), _ring()
    assert ours.open(ours.seal(_claims())) == _claims()
    with pytest.raises(TokenError):
        ours.open(theirs.seal(_claims()))


def test_the_remembered_tokens_are_bounded_and_the_forgotten_still_open() -> None:
    ring = _ring()
    tokens = [ring.seal(_claims(n)) for n in range(OPENED_TOKENS_KEPT + 50)]
    for token in tokens:
        ring.open(token)
    assert len(ring._opened) == OPENED_TOKENS_KEPT
    assert ring.open(tokens[0]) == _claims(0)
    for n in range(30):  # guesses are not remembered
        with pytest.raises(TokenError):
            ring.open(f"garbage-{n}")
    assert len(ring._opened) == OPENED_TOKENS_KEPT
