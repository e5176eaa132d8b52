"""The baseline: a small app built the way the earlier FastAPI service streamed, for side-by-side numbers.

What: FastAPI with one shared boto3 ``bedrock-runtime`` client. ``POST /api/chat/stream`` runs ``converse_stream`` in
a worker thread of the default executor (``loop.run_in_executor(None, ...)``, as the earlier service ran its Strands
agent); the thread iterates ``response["stream"]`` and hands each text delta to the event loop with
``loop.call_soon_threadsafe(queue.put_nowait, ...)`` (how Strands' ``BedrockModel.stream`` does it). The response is
a ``StreamingResponse`` of the earlier six-key chunks, ``data: {json.dumps(chunk)}\\n\\n`` with default separators;
deltas already queued are joined into one event, at most 5 (the earlier ``TOKEN_BATCH_MAX_SIZE``), never waiting.
``GET /api/conversations`` and ``GET /api/conversations/{id}`` read the same SQLite tables as the service with
synchronous ``sqlite3`` calls inside ``async def`` routes and pydantic response models, as the earlier service called
the synchronous supabase-py client.

Left out, in the baseline's favour: auth, rate limits and the chat turn's store writes. Bugs of the earlier service
(blocking ``queue.get`` on the loop, os.environ identity) are not reproduced: this measures its architecture, one
thread per open stream, not its defects.

Runs only in its own virtual environment (bench/.venv-baseline, bench/requirements-baseline.txt); the service never
imports it. Started by ``bench/run.py`` as ``.venv-baseline/bin/python bench/baseline_app.py --port N ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import threading
from collections.abc import AsyncIterator
from typing import Any

import boto3
import uvicorn
from botocore.config import Config
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

TOKEN_BATCH_MAX_SIZE = 5
MODEL_ID = "amazon.nova-lite-v1:0"


class ChatRequest(BaseModel):
    message: str
    conversation_id: str
    user_id: str
    history: list[dict[str, Any]] = []


class ConversationResponse(BaseModel):
    id: str
    user_id: str
    title: str | None = None
    created_at: str
    updated_at: str
    last_message_at: str | None = None
    message_count: int = 0
    metadata: dict[str, Any] = {}


class MessageResponse(BaseModel):
    id: str
    role: str
    content: str
    agent_type: str | None = None
    timestamp: str
    metadata: dict[str, Any] = {}


class ConversationWithMessages(ConversationResponse):
    messages: list[MessageResponse] = []


class ConversationList(BaseModel):
    conversations: list[ConversationResponse]
    total: int
    limit: int
    offset: int
    has_more: bool


def chunk(kind: str, content: str | None = None, error: str | None = None) -> str:
    body = {"type": kind, "content": content, "tool_name": None, "tool_call": None, "error": error,
            "agent_type": "supervisor"}
    return f"data: {json.dumps(body)}\n\n"


def build_app(endpoint: str, db_path: str) -> FastAPI:
    app = FastAPI(title="Canvalo Multi-Agent Chat API (baseline)")
    client = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=endpoint,
        config=Config(read_timeout=120, retries={"total_max_attempts": 1}),
    )
    local = threading.local()

    def db() -> sqlite3.Connection:
        connection = getattr(local, "db", None)
        if connection is None:
            connection = local.db = sqlite3.connect(db_path, check_same_thread=False)
            connection.row_factory = sqlite3.Row
        return connection

    def converse(message: str, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[tuple[str, str]]) -> None:
        """Runs in a default-executor thread for the whole answer, as the earlier service's agent did."""
        try:
            response = client.converse_stream(
                modelId=MODEL_ID,
                messages=[{"role": "user", "content": [{"text": message}]}],
                inferenceConfig={"maxTokens": 2048, "temperature": 0.3},
            )
            for event in response["stream"]:
                text = event.get("contentBlockDelta", {}).get("delta", {}).get("text")
                if text:
                    loop.call_soon_threadsafe(queue.put_nowait, ("token", text))
            loop.call_soon_threadsafe(queue.put_nowait, ("done", ""))
        except Exception as exc:  # noqa: BLE001 - the earlier service turned every failure into an error chunk
            loop.call_soon_threadsafe(queue.put_nowait, ("error", type(exc).__name__))

    async def events(message: str) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        loop.run_in_executor(None, converse, message, loop, queue)
        while True:
            kind, text = await queue.get()
            parts = [text] if kind == "token" else []
            while kind == "token" and len(parts) < TOKEN_BATCH_MAX_SIZE and not queue.empty():
                kind, more = queue.get_nowait()
                if kind == "token":
                    parts.append(more)
            if parts:
                yield chunk("token", "".join(parts))
            if kind == "done":
                yield chunk("complete")
                return
            if kind == "error":
                yield chunk("error", error=text)
                return

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/chat/stream")
    async def chat_stream(request: ChatRequest) -> StreamingResponse:
        return StreamingResponse(events(request.message), media_type="text/event-stream")

    @app.get("/api/conversations", response_model=ConversationList)
    async def list_conversations(user_id: str, limit: int = 50, offset: int = 0) -> ConversationList:
        rows = db().execute(
            "SELECT * FROM agent_conversations WHERE user_id = ? ORDER BY updated_at DESC LIMIT ? OFFSET ?",
            (user_id, limit, offset),
        ).fetchall()
        total = db().execute("SELECT count(*) FROM agent_conversations WHERE user_id = ?", (user_id,)).fetchone()[0]
        conversations = [_conversation(row) for row in rows]
        return ConversationList(conversations=conversations, total=total, limit=limit, offset=offset,
                                has_more=offset + len(conversations) < total)

    @app.get("/api/conversations/{conversation_id}", response_model=ConversationWithMessages)
    async def get_conversation(conversation_id: str, user_id: str, message_limit: int = 100,
                               message_offset: int = 0) -> ConversationWithMessages:
        row = db().execute(
            "SELECT * FROM agent_conversations WHERE id = ? AND user_id = ?", (conversation_id, user_id)
        ).fetchone()
        if row is None:
            raise HTTPException(status_code=404, detail=f"Conversation {conversation_id} not found")
        messages = db().execute(
            "SELECT * FROM agent_messages WHERE conversation_id = ? ORDER BY created_at ASC LIMIT ? OFFSET ?",
            (conversation_id, min(message_limit, 500), message_offset),
        ).fetchall()
        return ConversationWithMessages(**_conversation(row).model_dump(), messages=[_message(m) for m in messages])

    return app


def _conversation(row: sqlite3.Row) -> ConversationResponse:
    return ConversationResponse(**{**dict(row), "metadata": json.loads(row["metadata"] or "{}")})


def _message(row: sqlite3.Row) -> MessageResponse:
    return MessageResponse(id=row["id"], role=row["role"], content=row["content"], agent_type=row["agent_type"],
                           timestamp=row["created_at"], metadata=json.loads(row["metadata"] or "{}"))


def main() -> None:
    parser = argparse.ArgumentParser(description="The benchmark's baseline app (earlier design).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--endpoint", required=True, help="the fake Bedrock's URL")
    parser.add_argument("--db", required=True, help="SQLite file with the service's schema")
    args = parser.parse_args()
    uvicorn.run(build_app(args.endpoint, args.db), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
