"""The floor: a bare Starlette app that costs only what the framework and uvicorn cost.

What: ``POST /api/chat/stream`` answers with a plain ``StreamingResponse`` that sleeps ``--ttft`` seconds, then emits
``--tokens`` SSE token events ``--interval`` seconds apart (0 = unpaced) and one ``complete`` event: the same events,
the same six-key chunk shape and the same pace as the fake upstream gives the service, but no upstream, no store, no
auth and no middleware. ``GET /api/conversations`` and ``GET /api/conversations/{id}`` return a fixed JSON document of
the same shape and size as the service's (50 conversations; one conversation with 2 messages), serialized per request
by ``JSONResponse``.

Why: whatever the service spends beyond these numbers is its own cost (auth, store, upstream relay, middleware).
Run by ``bench/run.py`` as ``python bench/floor_app.py --port N ...``, pinned to the server core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from web.gc_tuning import tune_gc  # noqa: E402

TOKEN = " token"  # the text the fake upstream sends per delta
STAMP = "2026-11-24T01:49:20.911133Z"


def sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def chunk(kind: str, **fields: Any) -> dict[str, Any]:
    base = {"type": kind, "content": None, "tool_name": None, "tool_call": None, "error": None}
    return {**base, "agent_type": "supervisor", **fields}


TOKEN_EVENT = sse(chunk("token", content=TOKEN))


def conversation(conversation_id: str, user_id: str) -> dict[str, Any]:
    return {
        "id": conversation_id,
        "user_id": user_id,
        "title": "AI Chat",
        "created_at": STAMP,
        "updated_at": STAMP,
        "last_message_at": STAMP,
        "message_count": 2,
        "metadata": {},
    }


def message(role: str, content: str) -> dict[str, Any]:
    agent = "supervisor" if role == "assistant" else None
    return {"id": str(uuid.uuid4()), "role": role, "content": content, "agent_type": agent, "timestamp": STAMP,
            "metadata": {}}


def api_routes() -> list[Route]:
    """``GET /`` and the two conversation reads, each answering a fixed document; shared with the relay floor."""
    user_id = str(uuid.uuid4())
    page = {
        "conversations": [conversation(str(uuid.uuid4()), user_id) for _ in range(50)],
        "total": 10_000,
        "limit": 50,
        "offset": 0,
        "has_more": True,
    }
    messages = [message("user", "What invoices do I have?"), message("assistant", TOKEN * 20)]

    async def list_conversations(request: Request) -> Response:
        return JSONResponse(page)

    async def get_conversation(request: Request) -> Response:
        body = {**conversation(request.path_params["conversation_id"], user_id), "messages": messages}
        return JSONResponse(body)

    async def root(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return [
        Route("/", root),
        Route("/api/conversations", list_conversations),
        Route("/api/conversations/{conversation_id}", get_conversation),
    ]


def build_app(ttft: float, tokens: int, interval: float) -> Starlette:
    async def events() -> AsyncIterator[bytes]:
        if ttft > 0:
            await asyncio.sleep(ttft)
        for index in range(tokens):
            if index and interval > 0:
                await asyncio.sleep(interval)
            yield TOKEN_EVENT
        yield sse(chunk("complete", message_id=str(uuid.uuid4()), conversation_id=str(uuid.uuid4())))

    async def chat_stream(request: Request) -> Response:
        await request.body()
        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/api/chat/stream", chat_stream, methods=["POST"]), *api_routes()])


def main() -> None:
    parser = argparse.ArgumentParser(description="The benchmark's floor app.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft", type=float, default=0.2)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    app = build_app(args.ttft, args.tokens, args.interval)
    tune_gc()  # the service's collector settings, so the comparison measures the relay, not the collector
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
