"""An ASGI app built on its first event, so a module can name its app without reading any settings on import.

``uvicorn app:app`` imports ``app.py`` and takes its ``app``; the service's settings are read and checked when uvicorn
starts the app (its lifespan's startup), not when a test or a tool imports the module. ``uvicorn app:serve --factory``
does the same through uvicorn itself.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send


class Deferred:
    """The app ``factory`` builds, built once, on the first event. A factory that exits (having said why) fails the
    lifespan's startup, so uvicorn stops instead of serving without the app."""

    def __init__(self, factory: Callable[[], ASGIApp]) -> None:
        self._factory = factory
        self._app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            try:
                self._app = self._factory()
            except SystemExit as exc:
                if scope["type"] != "lifespan":
                    raise
                await receive()  # lifespan.startup
                await send({"type": "lifespan.startup.failed", "message": f"The app could not be built ({exc.code})."})
                return
        await self._app(scope, receive, send)
