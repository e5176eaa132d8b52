"""The Canvalo chat backend: routes, lifespan and error handling in one place.

A request enters through the middleware in ``web/`` (request id and access log, CORS, body limit), reaches one of
the route functions below, which read the inputs their route declares (``web/inputs.py``, the declaration
``/openapi.json`` documents too), identify the caller (``web/caller.py``) and call one service (``services/``).
Long-lived resources (the store, the model client) are created in ``lifespan`` and reach routes through
``request.state``. Every non-2xx response is the envelope from ``errors.AppError.body``.

Run it with ``python app.py``, ``uvicorn app:app`` or ``uvicorn app:serve --factory``.
"""

from __future__ import annotations

import importlib.util
import sys

# Checked before anything that needs them, so the answer is one line saying what to do, not a traceback.
if sys.version_info < (3, 11):
    sys.exit(f"canvalo: Python 3.11 or newer is required (starlette 1.x); this is Python {sys.version.split()[0]}.")
_MISSING = [name for name in ("anyio", "botocore", "httpx", "starlette", "uvicorn")
            if not importlib.util.find_spec(name)]
if _MISSING:
    sys.exit(
        f"canvalo: {', '.join(_MISSING)} not installed for {sys.executable}. Install the dependencies first "
        "(README, Quick start): python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
    )

import asyncio
import contextlib
import errno
import functools
import logging
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any, TypedDict

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from errors import AppError, MethodNotAllowed, NotFound
from services.agents import actions
from services.agents.assistant import Assistant
from services.auth.authenticator import Authenticator, build_authenticator, open_to_anyone
from services.limits.budgets import Budgets, period_bounds
from services.limits.rates import RateLimiter
from services.metrics import Metrics
from services.model import ChatModel
from services.model.build import build_model
from services.runs.manager import RunManager, shutdown_frame
from services.store import Store, utc_now
from services.store.build import build_store, store_location
from settings import ConfigError, Settings
from web import cursors, inputs, middleware, openapi, pages, status
from web.caller import caller_of, read_body
from web.deferred import Deferred
from web.gc_tuning import tune_gc
from web.sse import EventStreamResponse, Feed
from web.status import VERSION
from web.tcp import ConnectionGuard, NoDelayH11Protocol

logger = logging.getLogger("canvalo")


class State(TypedDict):
    settings: Settings
    store: Store
    model: ChatModel
    auth: Authenticator
    runs: RunManager
    metrics: Metrics
    limiter: RateLimiter
    budgets: Budgets
    connections: ConnectionGuard  # read by the HTTP protocol (web/tcp.py) for every connection, not by routes


# -- routes -------------------------------------------------------------------------------------------------------


async def chat_stream(request: Request) -> Response:
    """Start a chat run and follow it from its first event. A repeated ``client_message_id`` follows the run that
    id started instead, after ``Last-Event-ID`` if sent (fetch-event-source resends the same POST with it to
    resume), without starting another. Counted once: as a chat turn by ``begin_run``, or, when it starts none, as an
    API request."""
    chat = inputs.CHAT_STREAM.given(request, await read_body(request))
    caller = await caller_of(request, chat, counted=False)  # counted once: by begin_run as a turn, or here
    limiter: RateLimiter = request.state.limiter
    runs: RunManager = request.state.runs
    try:
        last_seen = chat["Last-Event-ID"]
        new = inputs.chat_turn(chat)
        budget = request.state.budgets.for_turn(new.text)  # None while budgets are off: begin then reads no usage
        limits = limiter.turn_limits(runs.stale_seconds, runs.events_ttl, budget)
        begun = await runs.begin(caller, new, limits, request.state.request_started)
    except AppError:
        # An invalid or refused send (422, 409, 404) is no chat turn, but it is a request: counted as one, so a
        # client cannot send them without bound (over the limit, the 429 is the answer).
        await limiter.admit(caller)
        raise
    if begun.outcome == "budget_exceeded":
        raise request.state.budgets.refused(begun)
    if begun.run is None:
        raise limiter.refused(begun)
    after = 0
    if begun.outcome == "existing":
        await limiter.admit(caller)  # a repeat attaches to its turn: a request, not a second turn
        # What the client holds of this run; a new run's events start at 1, so nothing a client holds is of it.
        after = last_seen or 0
    return _event_stream(request, await runs.feed(caller, begun.run.id), begun.run.id, after=after)


async def run_events(request: Request) -> Response:
    """Follow a run from after ``Last-Event-ID`` (or ``?after=N``): replay what was missed, then live to its end."""
    given = inputs.RUN_EVENTS.given(request)
    caller = await caller_of(request, given)
    run_id = given["run_id"]
    # What a browser's EventSource sends when it reconnects wins; else ?after=N; else the run's first event.
    after = given["Last-Event-ID"]
    if after is None:
        after = given["after"]
    return _event_stream(request, await request.state.runs.feed(caller, run_id), run_id, after=after)


async def stop_run(request: Request) -> Response:
    """Stop a run wherever it generates; the answer is saved cut to ``seen_chars`` and returned."""
    stop = inputs.STOP_RUN.given(request, await read_body(request))
    caller = await caller_of(request, stop)
    view = await request.state.runs.stop(caller, stop["run_id"], stop["seen_chars"])
    # 202: the stop is asked but the run has not ended yet (its worker is slow, or has just died and the run ends
    # stopped once its heartbeat lapses); the message is as saved so far. Never a 200 for a state not yet stored.
    return JSONResponse(view.message.to_json(), status_code=202 if view.run.status == "running" else 200)


def _event_stream(request: Request, feed: Feed, run_id: str, *, after: int) -> Response:
    return EventStreamResponse(  # type: ignore[return-value]
        feed,
        after=after,
        ping_interval=request.state.settings.heartbeat_seconds,
        shutdown_frame=shutdown_frame(),
        headers=[(b"x-run-id", run_id.encode())],
    )


async def list_conversations(request: Request) -> Response:
    """The caller's conversations by last activity, paged by offset or by cursor, optionally searched (``q``)."""
    given = inputs.LIST_CONVERSATIONS.given(request)
    caller = await caller_of(request, given)
    limit, offset = given["limit"], given["offset"]
    before, after = cursors.seek(given, "before", "after", "offset")
    search = given["q"]
    store: Store = request.state.store
    page = await store.list_conversations(caller, limit, offset, before=before, after=after, search=search)
    listed = page.conversations
    return JSONResponse(
        {
            "conversations": [c.to_json() for c in listed],
            "total": page.total,
            "limit": limit,
            "offset": offset,
            "has_more": page.has_more,
            # The page's oldest and newest: ?before= reads on past the one, ?after= back past the other.
            "before_cursor": cursors.conversation_cursor(listed[-1]) if listed else None,
            "after_cursor": cursors.conversation_cursor(listed[0]) if listed else None,
        }
    )


async def rename_conversation(request: Request) -> Response:
    rename = inputs.RENAME_CONVERSATION.given(request, await read_body(request))
    caller = await caller_of(request, rename)
    conversation = await request.state.store.rename_conversation(caller, rename["conversation_id"], rename["title"])
    return JSONResponse(conversation.to_json())


async def create_conversation(request: Request) -> Response:
    create = inputs.CREATE_CONVERSATION.given(request, await read_body(request))
    caller = await caller_of(request, create)
    conversation = await request.state.store.create_conversation(caller, create["title"])
    return JSONResponse(conversation.to_json(), status_code=201)


async def get_conversation(request: Request) -> Response:
    """The caller's conversation and a page of its messages: oldest first unless ``message_order=desc``, by offset or
    from a cursor (``message_before``/``message_after``)."""
    given = inputs.GET_CONVERSATION.given(request)
    caller = await caller_of(request, given)
    conversation_id = given["conversation_id"]
    limit, offset = given["message_limit"], given["message_offset"]
    newest_first = given["message_order"] == "desc"
    before, after = cursors.seek(given, "message_before", "message_after", "message_offset")
    leaf = given["leaf"]
    store: Store = request.state.store
    runs: RunManager = request.state.runs
    conversation = await store.get_conversation(caller, conversation_id)
    read = functools.partial(
        store.message_page, caller, conversation_id, limit, offset,
        newest_first=newest_first, before=before, after=after, leaf=leaf,
    )
    page, run = await asyncio.gather(read(), store.running_run(caller, conversation_id))
    if await runs.end_if_dead(caller, run):
        page, run = await read(), None
    shown = runs.overlay(page.messages, run)
    return JSONResponse(
        {
            **conversation.to_json(),
            "messages": [m.to_json() for m in shown],
            "message_has_more": page.has_more,
            "message_before_cursor": cursors.message_cursor(page.oldest) if page.oldest else None,
            "message_after_cursor": cursors.message_cursor(page.newest) if page.newest else None,
            "leaf_id": page.leaf_id,
        }
    )


async def set_active_leaf(request: Request) -> Response:
    """Switch the caller's conversation to the branch through ``message_id``, to its newest leaf."""
    switch = inputs.SET_ACTIVE_LEAF.given(request, await read_body(request))
    caller = await caller_of(request, switch)
    conversation = await request.state.store.set_active_leaf(caller, switch["conversation_id"], switch["message_id"])
    return JSONResponse(conversation.to_json())


async def delete_conversation(request: Request) -> Response:
    given = inputs.DELETE_CONVERSATION.given(request)
    caller = await caller_of(request, given)
    conversation_id = given["conversation_id"]
    await request.state.store.delete_conversation(caller, conversation_id)
    return JSONResponse({"status": "deleted", "conversation_id": conversation_id})


async def get_action(request: Request) -> Response:
    """A change the assistant prepared, as it was shown, and whether it still waits for the user's confirmation: what a
    reloaded page needs to offer Confirm again."""
    given = inputs.GET_ACTION.given(request)
    caller = await caller_of(request, given)
    action = await request.state.store.get_action(caller, given["action_id"])
    return JSONResponse(actions.kept_json(action, utc_now()))


async def confirm_action(request: Request) -> Response:
    """Carry out a change the assistant prepared (any update or delete), once, for the user it was prepared for,
    while the record still holds what the user was shown: the user's own confirmation, which nothing the model sends
    can stand in for."""
    confirm = inputs.CONFIRM_ACTION.given(request, await read_body(request))
    caller = await caller_of(request, confirm)
    done = await request.state.store.confirm_action(caller, confirm["action_id"])
    return JSONResponse(actions.confirmed_json(done))


async def get_usage(request: Request) -> Response:
    """The caller's own usage this UTC day or month: used, reserved by turns still going, each budget's limit and
    what remains, by model and by conversation."""
    given = inputs.GET_USAGE.given(request)
    caller = await caller_of(request, given)
    await request.state.runs.end_dead_runs(caller)  # a dead worker's run holds no reservation in the report
    period, now = given["period"], datetime.now(timezone.utc)  # one moment: the report and its period agree
    since, _ = period_bounds(period, now)
    report = await request.state.store.usage_report(caller, since.timestamp())
    return JSONResponse(request.state.budgets.usage_json(period, report, now))


async def openapi_json(request: Request) -> Response:
    """The OpenAPI 3.1 document (``web/openapi/``), in every environment: the API's shape is not a secret."""
    return JSONResponse(openapi.document(VERSION))


# -- errors -------------------------------------------------------------------------------------------------------


async def app_error(request: Request, exc: Exception) -> Response:
    """Every ``AppError``, in the envelope; the request was counted (``web/caller.py``) before its input was checked."""
    assert isinstance(exc, AppError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (unknown route) and 405 (wrong method), in our envelope; and the answer to OPTIONS."""
    assert isinstance(exc, HTTPException)
    error: AppError = MethodNotAllowed() if exc.status_code == 405 else NotFound()
    headers = exc.headers
    if exc.status_code == 405:
        # Starlette's Allow names the methods of the first route matching the path; one path has several routes here.
        headers = {"Allow": ", ".join(_allowed_methods(request))}
        if request.method == "OPTIONS":
            # Not a CORS preflight (EnvelopeCORS answers those before routing): a client asking which methods the
            # path has (RFC 9110 9.3.7). Allow lists OPTIONS, so OPTIONS is answered, not refused.
            return Response(status_code=204, headers=headers)
    elif exc.status_code != 404:
        error = AppError(f"HTTP {exc.status_code}.", code=f"HTTP_{exc.status_code}", retryable=False)
        error.status = exc.status_code
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    methods = {"OPTIONS"}
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods)


async def server_error(request: Request, exc: Exception) -> Response:
    """An unexpected exception: a generic 500, never the exception text (uvicorn logs the traceback)."""
    error = AppError()
    return JSONResponse(error.body(), status_code=500)


# Starlette tries routes in order, so the chat turn, the one hot path, comes first.
routes = [
    Route("/api/chat/stream", chat_stream, methods=["POST"]),
    Route("/", status.root, methods=["GET"]),
    Route("/health", status.health, methods=["GET"]),
    Route("/metrics", status.metrics, methods=["GET"]),
    Route("/playground", pages.playground, methods=["GET"]),
    Route("/openapi.json", openapi_json, methods=["GET"]),
    Route("/docs", pages.docs, methods=["GET"]),
    Route("/api/chat/runs/{run_id}/events", run_events, methods=["GET"]),
    Route("/api/chat/runs/{run_id}/stop", stop_run, methods=["POST"]),
    Route("/api/conversations", list_conversations, methods=["GET"]),
    Route("/api/conversations", create_conversation, methods=["POST"]),
    Route("/api/conversations/{conversation_id}", get_conversation, methods=["GET"]),
    Route("/api/conversations/{conversation_id}", rename_conversation, methods=["PATCH"]),
    Route("/api/conversations/{conversation_id}", delete_conversation, methods=["DELETE"]),
    Route("/api/conversations/{conversation_id}/active-leaf", set_active_leaf, methods=["PUT"]),
    Route("/api/actions/{action_id}", get_action, methods=["GET"]),
    Route("/api/actions/{action_id}/confirm", confirm_action, methods=["POST"]),
    Route("/api/usage", get_usage, methods=["GET"]),
    Route("/api/dev/sample-data", pages.load_sample_data, methods=["POST"]),
]
# Whole paths only: Starlette's patterns end in "$", which also matches before a final newline, so "/metrics%0A" was
# /metrics, past a proxy's exact rule for it. A path parameter still takes what it holds, to be refused as invalid.
for _route in routes:
    _route.path_regex = re.compile(_route.path_regex.pattern.removesuffix("$") + r"\Z")

exception_handlers: dict[Any, Any] = {AppError: app_error, HTTPException: http_error, Exception: server_error}


# -- wiring -------------------------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, *, model: ChatModel | None = None) -> Starlette:
    """Build the app. ``model`` replaces the configured provider (tests pass scripted models this way)."""
    settings = settings or Settings.from_environ(os.environ)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        store, auth = build_store(settings), build_authenticator(settings)
        chat_model = model or build_model(settings)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(store.aclose)
            stack.push_async_callback(chat_model.aclose)
            stack.push_async_callback(auth.aclose)
            await store.open()
            await chat_model.open()
            # Metrics are snapshotted to METRICS_DIR in the background; the rate limiter counts in the shared store.
            registry = await stack.enter_async_context(Metrics(settings.metrics_dir).snapshotting())
            store.set_query_observer(registry.store_call)
            limiter = RateLimiter(store, registry, settings)
            assistant = Assistant(chat_model, store, action_ttl=settings.action_ttl_seconds)
            runs = RunManager(store, assistant, registry, settings)
            await runs.open()
            # Runs still generating at shutdown end as interrupted and are saved before the store closes.
            stack.push_async_callback(runs.aclose)
            tune_gc()
            # Trusted proxies are named because a wrong value fails silently: every client shares the proxy's address.
            logger.info("Started: store=%s (%s) model=%s auth=%s environment=%s trusted_proxies=%s", store.kind,
                        store_location(settings), chat_model.provider, auth.mode, settings.environment,
                        settings.forwarded_allow_ips)
            if warning := open_to_anyone(auth, settings.api_host):
                logger.warning(warning)
            budgets = Budgets(settings, registry)
            for reason in budgets.below_one_turn():
                logger.warning("%s.", reason)
            yield {
                "settings": settings,
                "store": store,
                "model": chat_model,
                "auth": auth,
                "runs": runs,
                "metrics": registry,
                "limiter": limiter,
                "budgets": budgets,
                "connections": ConnectionGuard(settings.header_read_timeout, settings.max_connections_per_address),
            }

    app = Starlette(routes=routes, middleware=middleware.stack(settings), exception_handlers=exception_handlers,
                    lifespan=lifespan)
    # A path spelt with a trailing slash is an unknown route (404 in the envelope), not Starlette's 307 to the other
    # spelling: that answer has an empty body, and its Location is built from the Host header the client sent.
    app.router.redirect_slashes = False
    return app


def configure_logging(level: str) -> None:
    """Root logging at ``level``, with the loggers that would write request URLs or secrets held at WARNING.

    httpx logs every PostgREST request URL at INFO (its filters are user data, ``name=eq.Maria+Lopez``, and ids) and
    httpcore more at DEBUG; botocore's SigV4 signer logs each canonical request at DEBUG, the AWS session token
    (``x-amz-security-token``) and the signature in it; uvicorn's access log writes each request line with its query.
    ``RequestContext`` logs every request without its query instead. Set here, not only with uvicorn's
    ``access_log=False``, so ``uvicorn app:app`` (which configures uvicorn's loggers before it starts the app) is
    covered too.
    """
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    for name in ("httpx", "httpcore", "botocore", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _startup_settings() -> Settings:
    """The environment's settings, checked (or exit 2 naming the problem), with logging configured by them."""
    try:
        settings = Settings.from_environ(os.environ)
        settings.check_sqlite_path()  # here, not in Settings.validate: these touch the disk
        settings.check_metrics_dir()
    except ConfigError as exc:
        print(f"canvalo: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    return settings


def serve() -> Starlette:
    """The app the environment configures, with logging set up: ``uvicorn app:serve --factory``."""
    return create_app(_startup_settings())


# ``uvicorn app:app`` (README, Dockerfile): built by ``serve`` when uvicorn starts it, so importing this module (the
# tests do) reads no environment.
app = Deferred(serve)


def _listen(settings: Settings) -> socket.socket:
    """Bind API_HOST:API_PORT before anything else starts (migrations, model credentials), so a port in use is one
    line naming the setting, not an error after "Application startup complete"."""
    family = socket.AF_INET6 if ":" in settings.api_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.api_host, settings.api_port))
    except OSError as exc:
        sock.close()
        reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
        print(f"canvalo: API_PORT {settings.api_port} on API_HOST {settings.api_host} {reason}", file=sys.stderr)
        raise SystemExit(2) from None
    return sock


def _force_quit_on_second_ctrl_c(server: Any) -> None:
    """A second Ctrl-C during shutdown ("CTRL+C to force quit", uvicorn says) quits at once. uvicorn would skip the
    lifespan's shutdown and let asyncio cancel every task, and a run cancelled then waits FINAL_SAVE_SECONDS for a
    save whose flusher is gone: 30 s, then tracebacks. The runs left open end as interrupted at the next start, as a
    dead worker's do (the store is crash-safe)."""
    handle_exit = server.handle_exit

    def handle(sig: int, frame: Any) -> None:
        if server.should_exit and sig == signal.SIGINT:
            logger.warning("Second Ctrl-C: quitting now; runs still open end as interrupted at the next start")
            os._exit(128 + signal.SIGINT)
        handle_exit(sig, frame)

    server.handle_exit = handle


if __name__ == "__main__":
    import uvicorn

    settings = _startup_settings()
    if sys.argv[1:] == ["--check"]:
        # The Docker image runs this before uvicorn: a worker that exits 2 only makes uvicorn's parent report "Child
        # process failed to start" and exit 0, so the orchestrator would see a completed container, not a bad setting.
        raise SystemExit(0)
    listening = _listen(settings)
    config = uvicorn.Config(
        create_app(settings),
        log_level=settings.log_level.lower(),
        access_log=False,  # RequestContext logs each request without the query string (it holds user ids)
        http=NoDelayH11Protocol,  # TCP_NODELAY on every connection (web/tcp.py)
        forwarded_allow_ips=settings.forwarded_allow_ips,
        limit_concurrency=settings.max_connections,  # beyond it uvicorn answers 503 instead of running out of memory
        timeout_keep_alive=int(settings.keep_alive_seconds),
        # After this grace period uvicorn cancels open streams; each then ends with a retryable error chunk.
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )
    logger.info("Listening on http://%s:%d", settings.api_host, settings.api_port)
    try:
        server = uvicorn.Server(config)
        _force_quit_on_second_ctrl_c(server)
        server.run(sockets=[listening])
    except KeyboardInterrupt:
        # Ctrl-C: uvicorn has shut down cleanly and re-raised the signal; the status says so, no traceback needed.
        raise SystemExit(130) from None
