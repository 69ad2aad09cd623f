"""The chat page served at ``/``: plain HTML, CSS and JavaScript shipped in the package.

Nothing is fetched from elsewhere: the page's Content-Security-Policy allows only this server
(and the ``data:``/``blob:`` URLs of the user's own pictures), so it works offline and a model's
answer cannot load anything into it. The page is public and static; the API calls it makes
carry the key the user types in (kept in the tab's ``sessionStorage``).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

#: The page's files: name -> media type. Nothing else under ``ui/`` is served.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "boxes.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("ui", name).read_bytes()


def _file(name: str) -> Response:
    return Response(_read(name), media_type=FILES[name], headers=HEADERS)


async def _index(request: Request) -> Response:
    return _file("index.html")


async def _asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in FILES or name == "index.html":
        return Response("not found", status_code=404, media_type="text/plain")
    return _file(name)


def ui_routes() -> list[Route]:
    """``/`` and ``/ui/<file>``."""
    return [Route("/", _index, methods=["GET"]), Route("/ui/{name}", _asset, methods=["GET"])]
