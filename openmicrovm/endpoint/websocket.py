"""Just enough WebSocket framing (RFC 6455 §5.2) for the proxy to end a relayed WebSocket itself:
it follows where the app's frames start and end, so that a close frame of ours (the token
expired) goes between two of them and never inside one, where it would corrupt the stream."""

from __future__ import annotations

POLICY_VIOLATION = 1008  # RFC 6455 §7.4.1: the endpoint's policy (the token's lifetime) ends it
TOKEN_EXPIRED = "token expired"


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked close frame, as a server sends it."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123]  # control frames carry ≤ 125 bytes
    return bytes([0x88, len(payload)]) + payload


class FrameBoundaries:
    """Follows the frames of one direction of a WebSocket from the bytes relayed."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._payload_left = 0

    @property
    def at_boundary(self) -> bool:
        """Whether the bytes so far end exactly at the end of a frame."""
        return not self._header and not self._payload_left

    def _header_size(self) -> int:
        if len(self._header) < 2:
            return 2
        code = self._header[1] & 0x7F
        extended = 2 if code == 126 else 8 if code == 127 else 0
        mask = 4 if self._header[1] & 0x80 else 0
        return 2 + extended + mask

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._payload_left:
                taken = min(self._payload_left, len(view))
                self._payload_left -= taken
                view = view[taken:]
                continue
            wanted = self._header_size() - len(self._header)
            self._header += view[:wanted]
            view = view[wanted:]
            if len(self._header) >= 2 and len(self._header) == self._header_size():
                code = self._header[1] & 0x7F
                if code == 126:
                    self._payload_left = int.from_bytes(self._header[2:4], "big")
                elif code == 127:
                    self._payload_left = int.from_bytes(self._header[2:10], "big")
                else:
                    self._payload_left = code
                self._header.clear()
