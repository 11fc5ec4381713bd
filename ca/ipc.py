"""Framing for the messages between the primary process and its workers.

A frame is a 4-byte big-endian length and a msgpack body, decoded into the typed
messages of a channel (ca/audit/wire.py, ca/daemon/control.py): anything else is
refused as a broken channel. The socketpairs are made by the primary before it
starts a worker and inherited by it, so there is no socket name another local user
could connect to.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Generic, TypeVar

import msgspec

MAX_FRAME = 64 * 1024 * 1024  # audit entries pages are at most a few MB
_LEN = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()
M = TypeVar("M")


class ChannelClosed(ConnectionError):
    """The other end of a channel is gone (the primary or a worker exited), or it
    sent something that is not a message of the channel."""


def encode(message: Any) -> bytes:
    """A frame; TypeError/ValueError/OverflowError for what is not plain data."""
    body = _encoder.encode(message)
    return _LEN.pack(len(body)) + body


def send_frame(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.sendall(frame)
    except OSError as exc:
        raise ChannelClosed(f"the other process closed the channel ({exc})") from None


class Decoder(Generic[M]):
    """Decodes the frames of one channel into its message type `kind`."""

    def __init__(self, kind: Any) -> None:
        self._decoder = msgspec.msgpack.Decoder(kind)

    def decode(self, body: bytes) -> M:
        try:
            return self._decoder.decode(body)  # type: ignore[no-any-return]
        except msgspec.DecodeError as exc:  # ValidationError included
            raise ChannelClosed(f"a frame that is not a message of this channel ({exc})"
                                ) from None

    def recv(self, sock: socket.socket) -> M:
        """One message from a blocking socket; ChannelClosed if it is gone, silent past
        its timeout, or sends something that is not a message."""
        (length,) = _LEN.unpack(_recv_exactly(sock, 4))
        if length > MAX_FRAME:
            raise ChannelClosed(f"a {length}-byte frame is more than any message can be")
        return self.decode(_recv_exactly(sock, length))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError as exc:
            raise ChannelClosed(f"the channel failed ({exc})") from None
        if not chunk:
            raise ChannelClosed("the other process closed the channel")
        buf += chunk
    return bytes(buf)


class FrameReader(Generic[M]):
    """Splits bytes read from a non-blocking socket into messages."""

    def __init__(self, decoder: Decoder[M]) -> None:
        self._decoder = decoder
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[M]:
        self._buf += data
        out: list[M] = []
        while len(self._buf) >= 4:
            (length,) = _LEN.unpack_from(self._buf)
            if length > MAX_FRAME:
                raise ChannelClosed(f"a {length}-byte frame is more than any message can be")
            if len(self._buf) < 4 + length:
                break
            out.append(self._decoder.decode(bytes(self._buf[4:4 + length])))
            del self._buf[:4 + length]
        return out
