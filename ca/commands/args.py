"""Argument checks shared by the commands, kept free of heavy imports (the parser is
built for every command, `serve` included)."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_url(url: str) -> str:
    """The daemon's base URL without a trailing slash, or ValueError saying what is
    wrong with it: an http:// URL would otherwise end in 'Server disconnected' and a
    URL without a scheme in a bare echo of itself."""
    text = url.strip()
    if "://" not in text:
        raise ValueError(f"{url!r} has no scheme; write https://{text.rstrip('/')}")
    parts = urlsplit(text)
    if parts.scheme.lower() == "http":
        raise ValueError(f"{url}: hsmca serves HTTPS only; use "
                         f"https://{text.split('://', 1)[1].rstrip('/')}")
    if parts.scheme.lower() != "https":
        raise ValueError(f"{url}: the scheme must be https, not {parts.scheme!r}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError(f"{url}: the port is not a number") from None
    if not parts.hostname:
        raise ValueError(f"{url} names no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{url}: give only https://HOST[:PORT][/PATH]")
    return text.rstrip("/")
