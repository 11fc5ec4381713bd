"""Reading a request's body, for every hsmca server (the daemon's routes, ACME, the
witness): what `request.read()` does, with the client's own mistakes answered as
such."""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestPayloadError

# The request codings every hsmca server decodes (aiohttp's, without the optional
# Brotli and Zstandard libraries), and what a 415 says it takes.
DECODED = ("gzip", "deflate", "identity")
ACCEPTED = "gzip, deflate"


def coding_missing(exc: BaseException) -> str | None:
    """The coding of aiohttp's ContentEncodingError for a coding whose decoder it lacks
    (br, zstd: "... brotli (br). Please install ..."); None for a body that does not
    decode as its coding says, which is a 400."""
    found = re.search(r"\((br|zstd)\)", str(exc))
    return found[1] if found else None


def unsupported_coding(coding: str | None) -> str:
    named = f" ({coding[:40]!r})" if coding else ""
    return (f"the body's Content-Encoding{named} is one this server does not decode; "
            f"nothing was done (send it uncompressed, or as {ACCEPTED})")


async def read_body(request: web.BaseRequest) -> bytes:
    """The request's body, as `request.read()` reads it, with two more answers of the
    client's own mistakes. A declared Content-Length over the application's limit is
    refused at once (413), not once the body has had its time to arrive: a trial's
    request that claimed 999,999,999 bytes and sent two waited 15 s for a 408. A body
    that does not decode as its Content-Encoding says is a 400 that says so: aiohttp's
    error surfaced as a 500 and two logged tracebacks, for anyone who could connect."""
    transfer = request.headers.get("Transfer-Encoding")
    if transfer is not None and [t.strip().lower() for t in transfer.split(",")] != [
            "chunked"]:
        # aiohttp reads any list ending in chunked as chunked alone, the codings before it
        # unapplied ("foo, chunked" was taken; a body "gzip, chunked" was read as JSON):
        # what a front proxy and the daemon would read differently. RFC 9112 6.1 has 501;
        # a 4xx here, as for any request the client can mend.
        raise web.HTTPBadRequest(text=f"the Transfer-Encoding {transfer[:40]!r} is not one "
                                 "this server takes; nothing was done (send the body with "
                                 "Content-Length, or Transfer-Encoding: chunked alone)")
    coding = request.headers.get("Content-Encoding", "")
    if coding and coding.strip().lower() not in DECODED:
        # aiohttp passed a coding it does not know ("compress", "gzip, br", "x-gzip")
        # through as if it were none, so its bytes were read as JSON or DER; RFC 9110
        # (15.5.16) answers an unsupported coding with 415 and the codings taken.
        raise web.HTTPUnsupportedMediaType(text=unsupported_coding(coding),
                                           headers={"Accept-Encoding": ACCEPTED})
    declared = request.content_length
    if declared is not None and declared > request.client_max_size:
        raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size,
                                            actual_size=declared)
    try:
        return await request.read()
    except RequestPayloadError:
        coding = coding[:40]
        if not coding:  # (aiohttp says any body it cannot read so)
            raise web.HTTPBadRequest(text="the body could not be read as its headers "
                                     "describe it; nothing was done") from None
        raise web.HTTPBadRequest(text=f"the body does not decode as its Content-Encoding "
                                 f"({coding!r}) says; nothing was done (send it "
                                 "uncompressed, or compressed as that header says)") from None


async def read_at_most(stream: StreamReader, limit: int) -> bytes:
    """Up to `limit` bytes of a body a third party sends (an ACME client's challenge
    answer, a witness's): read() may return less than is on its way."""
    body = b""
    while len(body) < limit:
        chunk = await stream.read(limit - len(body))
        if not chunk:
            break
        body += chunk
    return body
