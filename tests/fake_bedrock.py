"""A fake Amazon Bedrock ConverseStream endpoint for tests and benchmarks: real frames, real SigV4 checks, real HTTP.

Two reusable parts:

- the event-stream **encoder** (``encode_message`` and the frame builders below it): the AWS framing from
  ``botocore/eventstream.py`` in reverse, byte-identical to smithy-aws-event-stream's encoder. botocore only
  decodes, so tests and benchmarks need this to speak the wire format. ``tests/test_bedrock.py`` proves its
  fidelity by decoding its frames with botocore's own ``EventStream`` and ``EventStreamJSONParser``.
- ``FakeBedrock``, a raw ASGI app serving ``POST /model/{modelId}/converse-stream`` (serve it with
  ``tests.support.serve``). Each request takes the next scripted ``Reply`` (the last one repeats): frames written
  one ``send`` each, pauses, gates the test opens, HTTP errors. ``by_model`` gives a model id a script of its own,
  counted over that model's requests only (for fallbacks). It checks the SigV4 ``Authorization`` header against
  the credentials it was given and answers 403 like AWS when it does not match. It records every request and
  whether the client closed the stream before the script finished.

Raw ASGI rather than a Starlette route: Starlette matches the percent-decoded path, so an ARN model id (``%2F``)
would split into two segments and 404; the raw path also lets tests assert the exact encoding that was sent.
"""

from __future__ import annotations

import hmac
import json
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

import anyio
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

# -- encoder ----------------------------------------------------------------------------------------------------------


def _string_header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    # u8 name length, name, type 7 (string), u16 value length, value
    return struct.pack("!B", len(raw_name)) + raw_name + b"\x07" + struct.pack("!H", len(raw_value)) + raw_value


def encode_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One frame: prelude (total length, headers length, CRC32), headers, payload, CRC32 of everything before it."""
    header_bytes = b"".join(_string_header(name, value) for name, value in headers.items())
    prelude = struct.pack("!II", 12 + len(header_bytes) + len(payload) + 4, len(header_bytes))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + header_bytes + payload
    return message + struct.pack("!I", zlib.crc32(message))


def event(event_type: str, body: Mapping[str, Any]) -> bytes:
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return encode_message(headers, json.dumps(body, separators=(",", ":")).encode())


def exception(exception_type: str, message: str) -> bytes:
    """A modeled in-stream exception, e.g. ``throttlingException`` (camelCase, as Bedrock names them in frames)."""
    headers = {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"}
    return encode_message(headers, json.dumps({"message": message}).encode())


def error(code: str, message: str) -> bytes:
    """An unmodeled error frame: the code and message travel in headers, the payload is empty."""
    return encode_message({":error-code": code, ":error-message": message, ":message-type": "error"}, b"")


# Real Bedrock pads messageStart and contentBlockDelta payloads with a random-length "p" field; clients must
# ignore it, so the fake sends it too.
PADDING = "abcdefghijklmnopqrstuvwxyzABCDEFGH"


def message_start() -> bytes:
    return event("messageStart", {"role": "assistant", "p": PADDING})


def text_delta(text: str, index: int = 0) -> bytes:
    return event("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": text}, "p": PADDING[:18]})


def block_stop(index: int = 0) -> bytes:
    return event("contentBlockStop", {"contentBlockIndex": index})


def message_stop(reason: str = "end_turn") -> bytes:
    return event("messageStop", {"stopReason": reason})


def metadata(input_tokens: int = 12, output_tokens: int = 7) -> bytes:
    usage = {"inputTokens": input_tokens, "outputTokens": output_tokens, "totalTokens": input_tokens + output_tokens}
    return event("metadata", {"usage": usage, "metrics": {"latencyMs": 42}})


def tool_use(index: int, tool_use_id: str, name: str, fragments: Iterable[str]) -> list[bytes]:
    """A toolUse block: start, its input JSON in fragments (as Bedrock streams it), stop."""
    start = {"toolUse": {"toolUseId": tool_use_id, "name": name}}
    first = event("contentBlockStart", {"contentBlockIndex": index, "start": start})
    deltas = [
        event("contentBlockDelta", {"contentBlockIndex": index, "delta": {"toolUse": {"input": fragment}}})
        for fragment in fragments
    ]
    return [first, *deltas, block_stop(index)]


def text_reply(*chunks: str, stop_reason: str = "end_turn", usage: tuple[int, int] = (12, 7)) -> list[bytes]:
    """A complete text answer, one frame per chunk, in Bedrock's event order."""
    deltas = [text_delta(chunk) for chunk in chunks]
    return [message_start(), *deltas, block_stop(), message_stop(stop_reason), metadata(*usage)]


# -- script -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Gate:
    """Hold the stream until the test sets ``event`` (so a test can prove text arrived before the rest was sent)."""

    event: threading.Event


Step = bytes | Pause | Gate


@dataclass(frozen=True)
class Reply:
    steps: tuple[Step, ...] = ()
    status: int = 200
    error_type: str = ""
    error_message: str = ""

    @classmethod
    def stream(cls, *steps: Step | list[bytes]) -> Reply:
        """Steps in order; a list of frames is sent as one write (so the client can read them in one chunk)."""
        flat = tuple(b"".join(s) if isinstance(s, list) else s for s in steps)
        return cls(steps=flat)

    @classmethod
    def http_error(cls, status: int, error_type: str, message: str = "") -> Reply:
        return cls(status=status, error_type=error_type, error_message=message or f"{error_type} from the fake")


@dataclass
class Recorded:
    model_id: str
    raw_path: str
    headers: dict[str, str]
    body: dict[str, Any]
    auth_error: str | None
    closed_early: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


# -- SigV4 check ------------------------------------------------------------------------------------------------------

_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})"
)


def sigv4_problem(
    url: str, headers: Mapping[str, str], body: bytes, credentials: Iterable[Credentials], region: str
) -> str | None:
    """None when the request's SigV4 signature is valid for one of ``credentials``, else AWS's error type.

    Recomputes the signature from the request as received (method, raw path, signed headers, body hash, the
    request's own X-Amz-Date) with the known secret, the way AWS does; it does not trust anything the client says.
    """
    match = _AUTHORIZATION.fullmatch(headers.get("authorization", ""))
    if match is None:
        missing = "authorization" not in headers
        return "MissingAuthenticationTokenException" if missing else "IncompleteSignatureException"
    known = {c.access_key: c for c in credentials}
    creds = known.get(match["key"])
    if creds is None or headers.get("x-amz-security-token") != creds.token:
        return "UnrecognizedClientException"
    stamp = headers.get("x-amz-date", "")
    if match["service"] != "bedrock" or match["region"] != region or not stamp.startswith(match["date"]):
        return "InvalidSignatureException"
    signed_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    if abs(time.time() - signed_at.timestamp()) > 300:  # AWS rejects requests signed more than 5 minutes away
        return "InvalidSignatureException"
    signed = {name: headers.get(name, "") for name in match["signed"].split(";")}
    request = AWSRequest(method="POST", url=url, data=body, headers=signed)
    request.context["timestamp"] = stamp
    signer = SigV4Auth(creds, "bedrock", region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    return None if hmac.compare_digest(expected, match["signature"]) else "InvalidSignatureException"


# -- the app ----------------------------------------------------------------------------------------------------------

_PATH = re.compile(r"/model/(?P<model_id>[^/]+)/converse-stream")


class FakeBedrock:
    def __init__(self, *replies: Reply, credentials: Iterable[Credentials] = (), region: str = "us-east-1") -> None:
        self.replies = list(replies) or [Reply.stream(text_reply("Hello from the fake."))]
        self.by_model: dict[str, list[Reply]] = {}
        self.credentials = list(credentials)
        self.region = region
        self.requests: list[Recorded] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        body = await _read_body(receive)
        raw_path = scope["raw_path"].decode()
        match = _PATH.fullmatch(raw_path)
        if scope["method"] != "POST" or match is None:
            await _json_error(send, 404, "UnknownOperationException", "Not a ConverseStream request.")
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        url = f"http://{headers.get('host', '')}{raw_path}"
        problem = sigv4_problem(url, headers, body, self.credentials, self.region)
        record = Recorded(unquote(match["model_id"]), raw_path, headers, json.loads(body or b"{}"), problem)
        self.requests.append(record)
        reply = self._next_reply(record.model_id)
        if problem is not None:
            await _json_error(send, 403, problem, "The request signature we calculated does not match.")
        elif reply.status != 200:
            await _json_error(send, reply.status, reply.error_type, reply.error_message)
        else:
            await _stream(reply, record, receive, send)
        record.finished.set()

    def _next_reply(self, model_id: str) -> Reply:
        script = self.by_model.get(model_id)
        if script is None:
            return self.replies[min(len(self.requests), len(self.replies)) - 1]
        count = sum(1 for r in self.requests if r.model_id == model_id)
        return script[min(count, len(script)) - 1]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.requests


async def _stream(reply: Reply, record: Recorded, receive: Any, send: Any) -> None:
    headers = [(b"content-type", b"application/vnd.amazon.eventstream"), (b"x-amzn-requestid", b"fake-request")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    async with anyio.create_task_group() as group:

        async def watch_disconnect() -> None:
            # uvicorn silently drops writes after a disconnect; receive() is where a closed stream shows.
            if (await receive())["type"] == "http.disconnect":
                record.closed_early.set()
                group.cancel_scope.cancel()

        group.start_soon(watch_disconnect)
        for step in reply.steps:
            if isinstance(step, Pause):
                await anyio.sleep(step.seconds)
            elif isinstance(step, Gate):
                while not step.event.is_set():
                    await anyio.sleep(0.005)
            else:
                await send({"type": "http.response.body", "body": step, "more_body": True})
        group.cancel_scope.cancel()  # the script is done: stop watching before the final write
    if not record.closed_early.is_set():
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _json_error(send: Any, status: int, error_type: str, message: str) -> None:
    # The shape of a real Bedrock error: JSON body, type in x-amzn-ErrorType with the coral namespace suffix.
    headers = [
        (b"content-type", b"application/json"),
        (b"x-amzn-errortype", f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/".encode()),
        (b"x-amzn-requestid", b"fake-request"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps({"message": message}).encode()})


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
