"""The service's own pages (``web/*.html``: the playground and the API reference), each served under a fresh nonce."""

from __future__ import annotations

import os
import secrets

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from errors import NotFound
from settings import Settings

WEB_DIR = os.path.dirname(os.path.abspath(__file__))


async def playground(request: Request) -> Response:
    """A small chat page for trying the API in a browser: development only, unless PLAYGROUND=1."""
    settings: Settings = request.state.settings
    if settings.environment != "development" and not settings.playground:
        raise NotFound()
    return page("playground.html")


async def docs(request: Request) -> Response:
    """``/openapi.json`` rendered readably by the page's own script (no CDN), in every environment, like it."""
    return page("docs.html")


def page(name: str) -> Response:
    """One of ``web/``'s self-contained pages, whose one inline script and one style run under a fresh nonce; the
    policy allows nothing else, and requests only to this origin (the API, ``/openapi.json``)."""
    with open(os.path.join(WEB_DIR, name), encoding="utf-8") as source:
        html = source.read()
    nonce = secrets.token_urlsafe(16)
    policy = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
    return HTMLResponse(html.replace("{{nonce}}", nonce), headers={"Content-Security-Policy": policy})
