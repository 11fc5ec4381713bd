"""Errors of the HSM layer, each with a message an operator can act on.

PINs never appear in a message: the layer does not even hold the PIN after login.
"""

from __future__ import annotations


class HSMError(Exception):
    """A PKCS#11 problem that the operator must fix (module, token, PIN, key)."""


class HSMUnavailable(HSMError):
    """The session is broken; the worker is reconnecting. Callers answer 503."""


class PinRefused(HSMError):
    """The token refused the PIN (wrong, or the PIN is locked). Never tried again with
    the same PIN: many HSMs lock the user PIN after a few wrong tries."""


class KeyNotFound(HSMError):
    """The token holds no key by that label (once a fresh session agrees)."""


class KeyExportable(HSMError):
    """A key's attributes would let it leave the HSM; the daemon refuses to use it."""


class AuditUnavailable(Exception):
    """The operation log cannot be written, so nothing may be signed (fail closed)."""


class SignatureCheckFailed(HSMError):
    """The HSM returned a signature that does not verify with the key's public half."""
