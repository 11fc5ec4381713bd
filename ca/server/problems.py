"""RFC 9457 problem responses, and the middleware that turns every error into one.

A client never sees a stack trace: unexpected errors are logged with the request
id and answered with a 500 that names that id.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from ca.audit.link import AuditUnreadable
from ca.errors import NotDone
from ca.policy import Refused
from ca.server.throttle import Throttle
from ca.store.errors import StoreDamaged, StoreUnavailable
from hsm.errors import AuditUnavailable, HSMUnavailable

log = structlog.get_logger("hsmca.http")


def _left_unlogged(_key: object, count: int) -> None:
    log.info("clients that closed the connection before their request arrived whole, "
             "not logged one by one", unlogged=count)


_LEFT = Throttle(burst=10, on_quiet=_left_unlogged)
TYPE_BASE = "https://hsmca.dev/problems/"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _hint(request: web.Request) -> str:
    """Where a client that asked for the wrong path probably meant to go (an ACME
    trial: certbot --server https://ca:8443/acme got a bare "no such endpoint")."""
    path = request.path.rstrip("/")
    if path not in ("", "/acme") and not path.startswith("/acme/"):
        return ""
    acme = any(r.canonical == "/acme/directory" for r in request.app.router.resources())
    if not acme and path.startswith("/acme"):
        return (": this CA serves no ACME (its config has no [acme] section: "
                "docs/acme.md)")
    return ": an ACME client's --server is https://HOST:PORT/acme/directory" if acme else ""


# The type of a problem raised without one of its own, by status: fixed here, so that
# a title reworded never renames a type a client branches on (docs/api.md lists them).
KINDS = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found",
         405: "method-not-allowed", 408: "request-timeout", 409: "conflict",
         413: "request-entity-too-large", 415: "unsupported-media-type",
         429: "rate-limited", 500: "internal", 503: "unavailable"}


def problem(status: int, title: str, detail: str, kind: str | None = None,
            headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": TYPE_BASE + (kind or KINDS.get(status, "error")), "title": title,
            "status": status, "detail": detail}
    return web.Response(status=status, text=json.dumps(body),
                        content_type="application/problem+json", headers=headers)


class Problem(web.HTTPException):
    """Raise from a handler to answer with a problem+json."""

    def __init__(self, status: int, title: str, detail: str, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        super().__init__(reason=title)
        self.title, self.detail, self.kind = title, detail, kind
        self.extra = headers


TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
          405: "Method Not Allowed", 409: "Conflict", 413: "Request Entity Too Large",
          415: "Unsupported Media Type", 429: "Too Many Requests", 503: "Service Unavailable"}


NOT_UNICODE = ("the request holds text that is not Unicode (bytes that are not UTF-8, or a "
               "lone UTF-16 surrogate)")


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as p:
        return problem(p.status_code, p.title, p.detail, p.kind, p.extra)
    except Refused as r:
        status = r.reason.status
        return problem(status, TITLES.get(status, "Refused"), r.detail, r.reason.type)
    except NotDone as exc:  # the host's doing, in words that say what to free or fix
        return problem(503, "Service Unavailable", str(exc), "unavailable",
                       headers={"Retry-After": "30"})
    except AuditUnreadable as exc:  # a question, not a signature: say what is wrong
        return problem(503, "Service Unavailable", f"the audit log cannot answer this: {exc}",
                       "unavailable", headers={"Retry-After": "1"})
    except (AuditUnavailable, HSMUnavailable, StoreUnavailable) as exc:
        part = ("audit log" if isinstance(exc, AuditUnavailable) else "HSM"
                if isinstance(exc, HSMUnavailable) else "inventory (database)")
        # What did not happen, for this request: a revocation's client must know that it
        # was not recorded (a cluster trial read "nothing can be signed" and wondered).
        what = ("nothing was revoked" if "revoke" in request.path else
                "this cannot be answered right now" if request.method in ("GET", "HEAD")
                else "no token can be made right now" if request.path == "/v1/tokens"
                else "nothing can be signed right now")
        if isinstance(exc, StoreDamaged):  # a retry helps only once the operator acts
            return problem(503, "Service Unavailable",
                           f"the inventory (database) is damaged, so {what}; the CA's "
                           "operator must restore it from a backup (a retry will not help "
                           "until then)", "unavailable", headers={"Retry-After": "300"})
        return problem(503, "Service Unavailable",
                       f"the {part} is unavailable, so {what}; retry later", "unavailable",
                       headers={"Retry-After": "1"})
    except web.HTTPException as exc:
        if exc.status_code < 400:
            raise
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status_code}:") else (
            exc.reason)
        if exc.status_code == 413:
            detail = "request bodies are limited to 64 KiB"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.path}"
        elif exc.status_code == 404:
            detail = f"no such endpoint: {request.path[:200]}" + _hint(request)
        # A 405 names the methods that work (Allow: RFC 9110 15.5.6), a 401 its scheme,
        # a 415 of a coding names those taken (Accept-Encoding: RFC 9110 15.5.16).
        kept = {k: v for k, v in exc.headers.items()
                if k in ("Allow", "WWW-Authenticate", "Accept-Encoding")}
        return problem(exc.status_code, TITLES.get(exc.status_code, exc.reason), detail,
                       headers=kept or None)
    except UnicodeError as exc:  # a client's text no encoder takes, past every parser's check
        log.warning("text that is not Unicode", request_id=request.get("request_id", "-"),
                    path=request.path[:200], error=str(exc)[:200])
        return problem(400, "Bad Request", NOT_UNICODE, "bad-request")
    except Exception as exc:
        rid = request.get("request_id", "-")
        if isinstance(exc, ConnectionResetError) and _client_left(request):
            # Its doing, not a fault (its body stopped halfway); the answer reaches nobody.
            # Bounded as every line anyone can cause (a soak trial: one per request).
            if (unlogged := _LEFT.allow("left")) is not None:
                log.info("the client closed the connection before its request arrived "
                         "whole", request_id=rid, path=request.path[:200],
                         **({"unlogged_before": unlogged} if unlogged else {}))
            return problem(400, "Bad Request", "the connection closed before the request "
                           "arrived whole", "incomplete-request")
        log.exception("unhandled error", request_id=rid, path=request.path)
        return problem(500, "Internal Server Error",
                       f"an unexpected error occurred; the operator can find it in the logs "
                       f"under request id {rid}", "internal")


def _client_left(request: web.Request) -> bool:
    """Whether the client's connection is gone (not some other connection reset)."""
    transport = request.transport
    return transport is None or transport.is_closing()
