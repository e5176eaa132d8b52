"""The service's own pages (``web/*.html``: the playground and the API reference), each served under a fresh nonce,
and the playground's development helper: the walk-through's sample records loaded for its user."""

from __future__ import annotations

import os
import secrets

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from errors import NotFound
from services.store import sample_data
from settings import Settings
from web import inputs
from web.caller import caller_of, read_body

WEB_DIR = os.path.dirname(os.path.abspath(__file__))


async def playground(request: Request) -> Response:
    """A small chat page for trying the API in a browser: development only, unless PLAYGROUND=1."""
    settings: Settings = request.state.settings
    if settings.environment != "development" and not settings.playground:
        raise NotFound()
    return page("playground.html")


async def load_sample_data(request: Request) -> Response:
    """README's walk-through records (``services/store/sample_data.py``) for the caller, so the playground can ask
    about real rows. Development only: 404 in production, whatever PLAYGROUND says, since it writes records."""
    settings: Settings = request.state.settings
    if settings.environment != "development":
        raise NotFound()
    given = inputs.LOAD_SAMPLE_DATA.given(request, await read_body(request))
    caller = await caller_of(request, given)
    written, existing = await sample_data.load(request.state.store, caller)
    return JSONResponse({"status": "loaded", "user_id": given["user_id"], "written": written, "existing": existing})


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
