"""RFC 7512 PKCS#11 URIs: the way config names a key without naming a secret.

Only what hsmca needs is interpreted (`token`, `object`, `id`, `type` in the path;
`module-path` and `pin-source` in the query); other standard attributes are kept
so that a URI round-trips. `pin-value` is refused outright: a PIN never lives in
config text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote_to_bytes

PATH_ATTRS = {
    "token", "manufacturer", "serial", "model", "library-manufacturer",
    "library-description", "library-version", "object", "type", "id", "slot-id",
    "slot-description", "slot-manufacturer",
}
QUERY_ATTRS = {"module-name", "module-path", "pin-source", "pin-value"}
OBJECT_TYPES = {"private", "public", "cert", "secret-key", "data"}
# RFC 7512 section 2.3: pchar without ';' and '/', plus unreserved; the rest is %-encoded.
_SAFE = "-._~!$&'()*+=:@"


class URIError(ValueError):
    """A PKCS#11 URI that cannot be used; the message says which part is wrong."""


@dataclass(frozen=True)
class PKCS11URI:
    path: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    key_id: bytes | None = None

    @property
    def token(self) -> str | None:
        return self.path.get("token")

    @property
    def object(self) -> str | None:
        return self.path.get("object")

    @property
    def type(self) -> str | None:
        return self.path.get("type")

    def __str__(self) -> str:
        parts = []
        for k, v in self.path.items():
            parts.append(f"{k}={quote(v, safe=_SAFE.replace('&', ''))}")
        if self.key_id is not None:
            parts.append("id=" + "".join(f"%{b:02X}" for b in self.key_id))
        text = "pkcs11:" + ";".join(parts)
        if self.query:
            text += "?" + "&".join(f"{k}={quote(v, safe='/:')}" for k, v in self.query.items())
        return text


def _decode(value: str, where: str) -> bytes:
    if any(c in value for c in "\x00\n\r\t "):
        raise URIError(f"{where}: whitespace or control characters must be %-encoded")
    try:
        return unquote_to_bytes(value)
    except Exception as exc:  # unquote_to_bytes is lenient; keep the guard for odd input
        raise URIError(f"{where}: bad %-encoding") from exc


def parse(text: str) -> PKCS11URI:
    """Parse `pkcs11:token=hsmca;object=issuing-ca;type=private` (RFC 7512)."""
    if not text.startswith("pkcs11:"):
        raise URIError(f"not a PKCS#11 URI (must start with 'pkcs11:'): {text[:40]!r}")
    body = text[len("pkcs11:"):]
    path_text, _, query_text = body.partition("?")
    path: dict[str, str] = {}
    key_id: bytes | None = None
    for item in filter(None, path_text.split(";")):
        name, eq, value = item.partition("=")
        if not eq:
            raise URIError(f"path attribute {name!r} has no '=value'")
        name = name.lower()
        if name in path or (name == "id" and key_id is not None):
            raise URIError(f"path attribute {name!r} appears twice")
        if name == "id":
            key_id = _decode(value, "id")
            continue
        if name not in PATH_ATTRS and not name.startswith("x-"):
            raise URIError(f"unknown path attribute {name!r}")
        try:
            path[name] = _decode(value, name).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise URIError(f"{name}: not valid UTF-8 after %-decoding") from exc
    if "type" in path and path["type"] not in OBJECT_TYPES:
        raise URIError(f"type must be one of {sorted(OBJECT_TYPES)}, not {path['type']!r}")
    query: dict[str, str] = {}
    for item in filter(None, query_text.split("&")):
        name, eq, value = item.partition("=")
        name = name.lower()
        if not eq:
            raise URIError(f"query attribute {name!r} has no '=value'")
        if name == "pin-value":
            raise URIError("pin-value is not accepted: give the PIN through pin-source or the "
                           "environment, never in config text")
        if name not in QUERY_ATTRS and not name.startswith("x-"):
            raise URIError(f"unknown query attribute {name!r}")
        query[name] = _decode(value, name).decode("utf-8", "replace")
    return PKCS11URI(path, query, key_id)


def key_uri(token: str, label: str, type_: str = "private") -> PKCS11URI:
    return PKCS11URI({"token": token, "object": label, "type": type_})
