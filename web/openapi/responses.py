"""The document's headers and responses: every error response (the ``errors.AppError.body`` envelope, with the
codes each status carries) and the success responses the operations share."""

from __future__ import annotations

from typing import Any

from web.openapi.shapes import BOOLEAN, STRING, UUID, Schema, closed, ref, schema


def error_schemas() -> dict[str, Schema]:
    """The envelope every non-2xx response is, and the error inside it."""
    error_codes = "Stable, upper case; clients branch on it. Known codes are listed on each response."
    return {
        "Error": {
            "type": "object",
            "required": ["code", "message", "userMessage", "suggestedActions", "retryable"],
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$", "description": error_codes},
                "message": {**STRING, "description": "A safe technical summary, for logs and developers."},
                "userMessage": {**STRING, "description": "Plain language, for the user."},
                "suggestedActions": {"type": "array", "items": STRING},
                "retryable": BOOLEAN,
                "retryAfter": {"type": "integer", "minimum": 1,
                               "description": "Seconds; with 429, and with every 503 and 504 of a dependency."},
                "runId": {**UUID, "description": "RUN_IN_PROGRESS: the run still generating; attach to it or stop it."},
                "limit": {"enum": ["chat", "api", "streams", "budget"],
                          "description": "429: which limit (budget: BUDGET_EXCEEDED)."},
                "period": {"enum": ["day", "month"], "description": "BUDGET_EXCEEDED: the UTC period of the budget."},
                "unit": {"enum": ["tokens", "cost"], "description": "BUDGET_EXCEEDED: tokens, or cost in USD."},
                "budget": {"type": "number", "minimum": 0, "description": "BUDGET_EXCEEDED: the budget's limit."},
                "used": {"type": "number", "minimum": 0, "description": "BUDGET_EXCEEDED: used this period, with "
                         "what the caller's turns still going hold reserved."},
                "resetsAt": {"type": "string", "format": "date-time", "description": "BUDGET_EXCEEDED: when the "
                             "period ends and the budget is whole again."},
            },
            "description": "The five keys are always there; some errors add keys (retryAfter, runId, limit, and a "
                           "budget's period, unit, budget, used and resetsAt).",
        },
        "ErrorEnvelope": closed({"error": schema("Error")}, description="Every non-2xx response."),
    }


def header_schemas() -> dict[str, Schema]:
    def header(description: str, schema: Schema | None = None) -> Schema:
        return {"description": description, "schema": schema or STRING}

    seconds = {"type": "integer", "minimum": 0}
    return {
        "X-Request-ID": {
            **header("The request's id (a sane X-Request-ID sent by the client or proxy is kept), as logged."),
            "required": True,
        },
        "X-Run-ID": header("The run's id, as in every chunk's run_id.", UUID),
        "Retry-After": header("Seconds to wait before trying again.", {"type": "integer", "minimum": 1}),
        "RateLimit-Limit": header("The limit that was hit, per window.", seconds),
        "RateLimit-Remaining": header("Requests left in the window (0 on a refusal).", seconds),
        "RateLimit-Reset": header("Seconds until the window ends.", seconds),
        "X-Budget-Period": header("BUDGET_EXCEEDED: day or month (UTC).", {"enum": ["day", "month"]}),
        "X-Budget-Unit": header("BUDGET_EXCEEDED: tokens, or cost in USD.", {"enum": ["tokens", "cost"]}),
        "X-Budget-Limit": header("BUDGET_EXCEEDED: the budget's limit.", {"type": "number", "minimum": 0}),
        "X-Budget-Used": header("BUDGET_EXCEEDED: used this period, reservations included.",
                                {"type": "number", "minimum": 0}),
        "X-Budget-Reset": header("BUDGET_EXCEEDED: when the period ends (ISO 8601 UTC).",
                                 {"type": "string", "format": "date-time"}),
        "Allow": header("Every method the path has."),
    }


def header_refs(*names: str, required: tuple[str, ...] = ()) -> dict[str, Schema]:
    headers = {name: ref("headers", name) for name in ("X-Request-ID", *names)}
    for name in required:
        # A $ref cannot carry siblings that change it; a required header is written out in full.
        headers[name] = {**header_schemas()[name], "required": True}
    return headers


def _error(description: str, codes: tuple[str, ...], *, retryable: bool | None = None, error: Schema | None = None,
           **headers: Any) -> Schema:
    """An error response: the envelope, the codes it may carry, and what its ``error`` always holds: ``retryable``,
    when the status fixes it, or ``error``, a schema of its own (one or the other)."""
    if retryable is not None:
        if error is not None:
            raise TypeError("_error takes retryable or error, not both")
        error = {"properties": {"retryable": {"const": retryable}}}
    envelope = schema("ErrorEnvelope") if error is None else {
        "allOf": [schema("ErrorEnvelope"), {"properties": {"error": error}}]}
    response: Schema = {
        "description": f"{description} Codes: {', '.join(codes)}.",
        "content": {"application/json": {"schema": envelope}},
        "x-error-codes": list(codes),
    }
    response.update(headers)
    return response


BODY_ERRORS = ("400", "408", "413", "415", "422", "499")
API_ERRORS = ("401", "403", "422", "429", "500", "502", "503", "504")


def responses() -> dict[str, Schema]:
    store_codes = ("STORE_UNAVAILABLE", "STORE_BUSY", "AUTH_UNAVAILABLE", "AUTH_THROTTLED", "AUTH_BUSY",
                   "SERVICE_UNAVAILABLE")
    return {
        "400": _error("The body could not be read: not UTF-8, not JSON (NaN and Infinity are not JSON), or nested "
                      "more than 32 levels.", ("MALFORMED_JSON", "BAD_REQUEST"), retryable=False),
        "401": _error("Authentication failed (auth on: a Bearer token is required on every /api route).",
                      ("MISSING_TOKEN", "MALFORMED_TOKEN", "INVALID_TOKEN", "EXPIRED_TOKEN"), retryable=False),
        "403": _error("The token is valid but user_id names someone else, or the database refused the caller.",
                      ("USER_ID_MISMATCH", "STORE_FORBIDDEN", "STORE_PERMISSION_DENIED"), retryable=False),
        "404": _error("Not found, or someone else's: the two are indistinguishable. Also any unknown path.",
                      ("NOT_FOUND", "CONVERSATION_NOT_FOUND", "MESSAGE_NOT_FOUND", "RUN_NOT_FOUND", "ACTION_NOT_FOUND",
                       "RECORD_NOT_FOUND"),
                      retryable=False),
        "405": _error("The path exists but not with this method; Allow lists its methods.", ("METHOD_NOT_ALLOWED",),
                      retryable=False, headers=header_refs(required=("Allow",))),
        "408": _error("The body did not arrive within BODY_READ_TIMEOUT.", ("REQUEST_TIMEOUT",), retryable=True),
        "409": _error("Conflicts with the current state. RUN_IN_PROGRESS carries runId; RECORD_CHANGED means the "
                      "record no longer holds the values the action showed as before, so nothing was changed.",
                      ("RUN_IN_PROGRESS", "IDEMPOTENCY_CONFLICT", "ACTION_ALREADY_USED", "RECORD_CHANGED"),
                      retryable=False),
        "410": _error("The pending action expired before it was confirmed; nothing was changed.",
                      ("ACTION_EXPIRED",), retryable=False),
        "413": _error("The body is larger than MAX_REQUEST_BYTES.", ("PAYLOAD_TOO_LARGE",), retryable=False),
        "415": _error("The body is not application/json.", ("UNSUPPORTED_MEDIA_TYPE",), retryable=False),
        "422": _error("A field, path id or query parameter is missing, malformed or out of range (message names it).",
                      ("VALIDATION_ERROR",), retryable=False),
        "429": _too_many(),
        "499": _error("The client closed the connection before sending the body it announced; nobody sees this "
                      "answer, it is logged.", ("CLIENT_CLOSED_REQUEST",), retryable=True),
        "500": _error("An unexpected error; never the exception's text.", ("INTERNAL_ERROR",)),
        "502": _error("A dependency (database, Supabase Auth) answered with something unusable.",
                      ("STORE_ERROR", "STORE_BAD_RESPONSE", "STORE_SCHEMA", "STORE_MISCONFIGURED",
                       "AUTH_UPSTREAM_ERROR", "UPSTREAM_ERROR"), retryable=False),
        "503": _error("A dependency is unavailable or throttling; try again after Retry-After (1 s unless the "
                      "dependency said otherwise). Beyond "
                      "MAX_CONNECTIONS uvicorn itself answers a plain-text 503.", store_codes,
                      retryable=True, headers=header_refs("Retry-After")),
        "504": _error("A dependency did not answer in time; try again after Retry-After.",
                      ("STORE_TIMEOUT", "AUTH_TIMEOUT", "TIMEOUT"), retryable=True, headers=header_refs("Retry-After")),
    }


def _too_many() -> Schema:
    """429: a rate limit (retryable: wait retryAfter) or, for a chat turn, a usage budget spent (not retryable: it
    comes back whole at resetsAt, which Retry-After also counts down to)."""
    rate = {"properties": {"code": {"const": "RATE_LIMIT_EXCEEDED"}, "retryable": {"const": True}}}
    budget = {"properties": {"code": {"const": "BUDGET_EXCEEDED"}, "retryable": {"const": False},
                             "limit": {"const": "budget"}},
              "required": ["period", "unit", "budget", "used", "resetsAt"]}
    return _error(
        "A rate limit was hit (error.limit: chat, api or streams; retryable): retryAfter and Retry-After say when to "
        "come back. Or, for a chat turn, a usage budget is spent (BUDGET_EXCEEDED, error.limit budget; not "
        "retryable): the period, the budget, what was used and resetsAt are in the error and the X-Budget-* "
        "headers, and Retry-After counts the seconds to resetsAt.", ("RATE_LIMIT_EXCEEDED", "BUDGET_EXCEEDED"),
        error={"required": ["retryAfter"], "oneOf": [rate, budget]},
        headers=header_refs("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "X-Budget-Period",
                            "X-Budget-Unit", "X-Budget-Limit", "X-Budget-Used", "X-Budget-Reset",
                            required=("Retry-After",)),
    )


def for_every_error(errors: dict[str, Schema]) -> dict[str, Schema]:
    """Error responses get the X-Request-ID header too (except 500, which Starlette answers outside the middleware)."""
    for status, response in errors.items():
        if status != "500":
            response["headers"] = {**header_refs(), **response.get("headers", {})}
    return errors


def json_ok(description: str, schema_name: str, status: str = "200") -> dict[str, Schema]:
    return {status: {"description": description, "headers": header_refs(),
                     "content": {"application/json": {"schema": schema(schema_name)}}}}


def sse_ok(description: str) -> dict[str, Schema]:
    return {
        "200": {
            "description": f"{description} Content-Type text/event-stream; charset=utf-8. Each event "
            "(StreamEvent) is an `id: <seq>` line, one `data: <StreamChunk JSON>` line and a blank line; `: ping` "
            "comments keep idle connections open. The shutdown notice has no id line.",
            "headers": {
                **header_refs(required=("X-Run-ID",)),
                "Cache-Control": {"description": "no-cache, no-store", "schema": STRING},
                "X-Accel-Buffering": {"description": "no: nginx must not buffer the stream.",
                                      "schema": {"const": "no"}},
            },
            "content": {
                "text/event-stream": {
                    "schema": schema("StreamEvent"),
                    "example": 'id: 1\ndata: {"type":"token","content":"Hello","tool_name":null,"tool_call":null,'
                    '"error":null,"agent_type":"supervisor","run_id":"0f8e7a52-3c47-4f6e-9a36-2f4c1f1d2b60"}\n\n',
                }
            },
        }
    }
