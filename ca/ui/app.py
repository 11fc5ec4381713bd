"""The web view's aiohttp application: the pages, the assets shipped in the package,
and the headers every answer carries.

- A strict Content-Security-Policy: scripts, styles and images from this server only,
  no inline script or style, no frames, forms only to itself. Even a value that
  escaped escaping (none should: the templates escape everything) could not run.
- Only the Host names this server listens as (loopback by default): a web page the
  auditor visits cannot read these pages by pointing its own DNS name at 127.0.0.1
  (DNS rebinding).
- On loopback, only connections from the user it runs as (or root): the view reads
  with that user's client certificate, which no other user may read (ca/ui/peer.py).
- Only what the browser was asked for by this view's own pages, or typed or
  bookmarked (Sec-Fetch-Site same-origin or none): a web page elsewhere cannot make the
  auditor's browser load the daemon through it, even blind.
- Pages are not cached (they show the inventory), assets briefly.
"""

from __future__ import annotations

import weakref
from importlib import resources

from aiohttp import HttpVersion10, web

from ca.ui import pages, peer
from ca.ui.pages import UI, UI_KEY

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cross-Origin-Opener-Policy": "same-origin",
           "Cross-Origin-Resource-Policy": "same-origin",
           "Server": "hsmca"}  # not aiohttp's and Python's versions (a security trial)
ASSETS = {"ui.css": "text/css", "ui.js": "text/javascript", "favicon.svg": "image/svg+xml"}


def _assets() -> dict[str, bytes]:
    folder = resources.files("ca.ui") / "static"
    return {name: (folder / name).read_bytes() for name in ASSETS}


_OWNERS: weakref.WeakKeyDictionary[object, int | None] = weakref.WeakKeyDictionary()


def _connected_user(request: web.Request) -> int | None:
    """The local user owning the client's socket, looked up once per connection."""
    transport = request.transport
    if transport is None:
        return None
    if transport not in _OWNERS:
        client, server = (transport.get_extra_info(k) for k in ("peername", "sockname"))
        _OWNERS[transport] = (peer.owner(client[:2], server[:2])
                              if client and server else None)
    return _OWNERS[transport]


def _refusal(request: web.Request, ui: UI) -> web.Response | None:
    if ui.allowed_hosts is not None and request.host.lower() not in ui.allowed_hosts:
        return web.Response(status=421, text="this server answers only as "
                            + ", ".join(sorted(ui.allowed_hosts)) + "\n")
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return web.Response(status=403, text="this view answers only its own pages and "
                            "addresses typed or bookmarked, not requests another site "
                            "makes\n")
    if ui.local_users is not None and _connected_user(request) not in ui.local_users:
        return web.Response(status=403, text="this view serves only the user who runs "
                            "`hsmca ui` (it reads with that user's client certificate): "
                            "run your own\n")
    return None


@web.middleware
async def guard(request: web.Request, handler: pages.Handler) -> web.StreamResponse:
    refused = _refusal(request, request.app[UI_KEY])
    if request.version < HttpVersion10:  # (aiohttp's HTTP/0.9, as the daemon's API)
        refused = web.Response(status=400, text="send HTTP/1.1\n")
        refused.force_close()
    if refused is not None:
        response: web.StreamResponse = refused
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
    response.headers.update(HEADERS)
    if request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "max-age=300"
    else:
        response.headers["Cache-Control"] = "no-store"
    return response


def build_app(ui: UI) -> web.Application:
    app = web.Application(middlewares=[guard])
    app[UI_KEY] = ui
    pages.add_routes(app)
    assets = _assets()

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in assets:
            raise web.HTTPNotFound(text="no such asset\n")
        return web.Response(body=assets[name], content_type=ASSETS[name])

    async def favicon(_request: web.Request) -> web.Response:
        return web.Response(body=assets["favicon.svg"], content_type=ASSETS["favicon.svg"])

    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/favicon.ico", favicon)
    # Last: any other path is a page that says so, with the banner and the way back,
    # not aiohttp's bare "404: Not Found" (a web trial).
    app.router.add_get("/{tail:.*}", pages.no_such_page)

    async def close(_app: web.Application) -> None:
        await ui.logs.close()
        await ui.ca.close()

    app.on_cleanup.append(close)
    return app
