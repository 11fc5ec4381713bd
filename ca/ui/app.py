"""The web view's aiohttp application: the pages, the assets shipped in the package,
and the headers every answer carries.

- A strict Content-Security-Policy: scripts, styles and images from this server only,
  no inline script or style, no frames, forms only to itself. Even a value that
  escaped escaping (none should: the templates escape everything) could not run.
- Only the Host names this server listens as (loopback by default): a web page the
  auditor visits cannot read these pages by pointing its own DNS name at 127.0.0.1
  (DNS rebinding).
- Pages are not cached (they show the inventory), assets briefly.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from ca.ui import pages
from ca.ui.pages import UI, UI_KEY

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cross-Origin-Opener-Policy": "same-origin",
           "Cross-Origin-Resource-Policy": "same-origin"}
ASSETS = {"ui.css": "text/css", "ui.js": "text/javascript", "favicon.svg": "image/svg+xml"}


def _assets() -> dict[str, bytes]:
    folder = resources.files("ca.ui") / "static"
    return {name: (folder / name).read_bytes() for name in ASSETS}


@web.middleware
async def guard(request: web.Request, handler: pages.Handler) -> web.StreamResponse:
    allowed = request.app[UI_KEY].allowed_hosts
    if allowed is not None and request.host.lower() not in allowed:
        response: web.StreamResponse = web.Response(
            status=421, text="this server answers only as " + ", ".join(sorted(allowed)) + "\n")
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

    async def close(_app: web.Application) -> None:
        await ui.logs.close()
        await ui.ca.close()

    app.on_cleanup.append(close)
    return app
