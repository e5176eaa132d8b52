"""The service's answers about itself: ``/`` (its name and version), ``/health`` and ``/metrics``. Nothing secret."""

from __future__ import annotations

import asyncio
import hmac
import weakref

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from errors import AppError, NotFound, Unauthorized
from services.model import ChatModel
from services.store import Store
from settings import Settings

SERVICE_NAME = "Canvalo Multi-Agent Chat API"
VERSION = "2.0.0"


async def root(request: Request) -> Response:
    return JSONResponse({"status": "ok", "service": SERVICE_NAME, "version": VERSION})


async def health(request: Request) -> Response:
    """Probes the store (a read, then a write, each within 3 s); says which store, model provider and auth mode are
    active, and whether the model can answer. 503 when the store cannot read or write; ``degraded`` (200) when the
    model is not configured. Nothing secret."""
    state = request.state
    settings: Settings = state.settings
    model: ChatModel = state.model
    store: Store = state.store
    readable, writable = await _probe_shared(store)
    store_ok = readable and writable is not False
    status = "unhealthy" if not store_ok else "healthy" if model.configured else "degraded"
    body = {
        "status": status,
        "service": SERVICE_NAME,
        "version": VERSION,
        "environment": settings.environment,
        # writable is null where the store cannot check it (Supabase: PostgREST acts only as signed-in users).
        "store": {"kind": store.kind, "reachable": readable, "readable": readable, "writable": writable},
        "model": {
            "provider": model.provider,
            "model_id": model.model_id,
            "configured": model.configured,
            "is_llm": model.is_llm,
            "note": "an Amazon Bedrock model" if model.is_llm else "built-in deterministic responder, not an LLM",
        },
        "auth": {"mode": state.auth.mode},
        # Answers still in this worker's memory: generating, or ended but not yet saved (the store refuses writes).
        "runs": state.runs.health(),
        # The earlier service's keys, kept for existing dashboards and probes.
        "supabase_configured": bool(settings.supabase_url),
        "bedrock_model": settings.bedrock_model_id if model.is_llm else None,
    }
    return JSONResponse(body, status_code=200 if store_ok else 503)


async def metrics(request: Request) -> Response:
    """Prometheus text format: this worker's metrics merged with the others', for a scraper holding METRICS_TOKEN
    (``Authorization: Bearer``); 404 while it is unset."""
    token = str(request.state.settings.metrics_token)
    if not token:
        raise NotFound()
    supplied = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(supplied, f"Bearer {token}".encode()):
        raise Unauthorized("A valid metrics token is required.", code="INVALID_TOKEN")
    return Response(request.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


# The probe in flight per store. /health is public and not rate limited, so a flood of it must not become a flood of
# store reads and writes (on Supabase, Data API connections taken from users' requests): a call that arrives while a
# probe runs shares its answer. Nothing is kept once it ends, so every answer is from a probe begun after the call
# before it ended (a store that recovers shows healthy on the next call).
_probes: weakref.WeakKeyDictionary[Store, asyncio.Future[tuple[bool, bool | None]]] = weakref.WeakKeyDictionary()


async def _probe_shared(store: Store) -> tuple[bool, bool | None]:
    """(readable, writable) of ``store``, from the probe in flight or a new one."""
    running = _probes.get(store)
    if running is None:
        running = _probes[store] = asyncio.ensure_future(_probe(store))
        running.add_done_callback(lambda _: _probes.pop(store, None))
    # Shielded: a caller that leaves (its client disconnected) does not cancel the probe the others wait for.
    return await asyncio.shield(running)


async def _probe(store: Store) -> tuple[bool, bool | None]:
    readable = await _store_reachable(store)
    return readable, (await _store_writable(store) if readable else False)


async def _store_writable(store: Store) -> bool | None:
    with anyio.move_on_after(3):
        return await store.probe_write()
    return False


async def _store_reachable(store: Store) -> bool:
    with anyio.move_on_after(3):
        try:
            await store.ping()
        except AppError:
            return False
        return True
    return False
