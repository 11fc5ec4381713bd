"""Where the HSM is and how to log in: what a config names, apart from the session
(which loads the PKCS#11 library's bindings) so that reading a config loads neither."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HSMConfig:
    module: str
    token: str
    pin_source: str  # "file:/path", "env:NAME", or a plain file path
    # A file the processes of one daemon share (ca.config.Config.hsm_session): their
    # logins take turns through it, and a PIN file the token refused is not offered
    # again by any of them until it changes. Without it, each process remembers alone.
    login_gate: str | None = None
