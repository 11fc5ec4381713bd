"""When a certificate's validity ends.

RFC 5280 4.1.2.5: the validity period runs from notBefore through notAfter,
inclusive, and both are whole seconds; OpenSSL's TLS layer agrees (it compares at
the second). So a certificate is still valid during its notAfter second, and the
daemon's own checks say the same as the handshake that let the client in."""

from __future__ import annotations

import datetime as dt


def ended(not_after: dt.datetime, now: dt.datetime) -> bool:
    """Whether a validity ending at `not_after` (a whole second) is over at `now`."""
    return now.replace(microsecond=0) > not_after
