"""Messages between the primary process and its workers, over socketpairs.

A frame is a 4-byte big-endian length and a msgpack body (msgspec: no pickle, so a
worker can send the primary nothing but plain data). The socketpairs are made by
the primary before it starts a worker and inherited by it, so there is no socket
name another local user could connect to.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgspec

MAX_FRAME = 64 * 1024 * 1024  # audit entries pages are at most a few MB
_LEN = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class ChannelClosed(ConnectionError):
    """The other end of a channel is gone (the primary or a worker exited)."""


def encode(message: Any) -> bytes:
    body = _encoder.encode(message)
    return _LEN.pack(len(body)) + body


def send(sock: socket.socket, message: Any) -> None:
    send_frame(sock, encode(message))


def send_frame(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.sendall(frame)
    except OSError as exc:
        raise ChannelClosed(f"the other process closed the channel ({exc})") from None


def recv(sock: socket.socket) -> Any:
    """One message from a blocking socket; ChannelClosed if it is gone, silent past its
    timeout, or sends something that is not a message."""
    (length,) = _LEN.unpack(_recv_exactly(sock, 4))
    if length > MAX_FRAME:
        raise ChannelClosed(f"a {length}-byte frame is more than any message can be")
    try:
        return _decoder.decode(_recv_exactly(sock, length))
    except msgspec.DecodeError as exc:
        raise ChannelClosed(f"a frame that does not decode ({exc})") from None


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


class FrameReader:
    """Splits bytes read from a non-blocking socket into messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (length,) = _LEN.unpack_from(self._buf)
            if length > MAX_FRAME:
                raise ChannelClosed(f"a {length}-byte frame is more than any message can be")
            if len(self._buf) < 4 + length:
                break
            try:
                out.append(_decoder.decode(bytes(self._buf[4:4 + length])))
            except msgspec.DecodeError as exc:
                raise ChannelClosed(f"a frame that does not decode ({exc})") from None
            del self._buf[:4 + length]
        return out
