"""Bedrock's failures as the service's errors: the table behind docs/production.md's "Amazon Bedrock" section.

Every Bedrock failure (an HTTP error, an exception frame in the stream, the network) becomes one of our ``AppError``s
through ``FAILURES``: a ``code``, a plain-language ``user_message``, ``suggested_actions``, ``retryable``, and whether
a fallback model may answer instead (``falls_back``). Bedrock's own error text is used only to tell "input too long"
and "model not enabled" apart; it never reaches a client or a log. For ``bedrock.py`` and ``converse.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from errors import AppError, UpstreamError, UpstreamTimeout, UpstreamUnavailable, ValidationFailed
from services.model.stream_client import ConnectTimeout, StreamClientError


@dataclass(frozen=True, slots=True)
class Failure:
    """One row of the error table: what the user sees, and whether a fallback model may be tried at once (the model
    is busy or failing; nothing about the request is wrong). Whether the call may be retried is ``kind``'s own
    ``retryable``: an unavailable or timed-out model yes, an error or a refused request no."""

    kind: type[AppError]
    code: str
    suggested_actions: tuple[str, ...]
    user_message: str
    falls_back: bool = False

    def error(self, message: str) -> AppError:
        return self.kind(message, code=self.code, user_message=self.user_message,
                         suggested_actions=self.suggested_actions)


_TRY_AGAIN = ("Try again in a moment", "Contact support if the problem persists")
_CONFIG_PROBLEM = "The assistant isn't available right now because of a configuration problem on our side."
_CONFIGURATION = ("MODEL_ACCESS_DENIED", "MODEL_NOT_ENABLED", "MODEL_NOT_FOUND", "MODEL_CREDENTIALS_MISSING",
                  "MODEL_CREDENTIALS_EXPIRED", "MODEL_CREDENTIALS_INVALID")

FAILURES: dict[str, Failure] = {
    f.code: f
    for f in (
        Failure(UpstreamUnavailable, "MODEL_THROTTLED", ("Wait a few seconds and try again",),
                "The assistant is handling a lot of requests right now. Please wait a moment and try again.",
                falls_back=True),
        Failure(UpstreamTimeout, "MODEL_TIMEOUT", ("Try again", "Try a shorter or simpler question"),
                "The assistant took too long to answer. Please try again."),
        Failure(UpstreamUnavailable, "MODEL_UNAVAILABLE", _TRY_AGAIN,
                "The assistant is temporarily unavailable. Please try again in a moment.", falls_back=True),
        Failure(UpstreamUnavailable, "MODEL_INTERNAL_ERROR", _TRY_AGAIN,
                "The AI service had a temporary problem. Please try again.", falls_back=True),
        Failure(UpstreamUnavailable, "MODEL_STREAM_ERROR", _TRY_AGAIN,
                "The answer was interrupted by a problem with the AI service. Please try again.", falls_back=True),
        Failure(UpstreamUnavailable, "MODEL_STREAM_INCOMPLETE", _TRY_AGAIN,
                "The answer was cut off before it finished. Please try again."),
        Failure(UpstreamUnavailable, "MODEL_NOT_READY", ("Try again in a minute",),
                "The AI model is starting up. Please try again in a minute.", falls_back=True),
        Failure(UpstreamUnavailable, "MODEL_NETWORK_ERROR", _TRY_AGAIN,
                "We couldn't reach the AI service. Please try again in a moment."),
        Failure(ValidationFailed, "MODEL_INPUT_TOO_LONG", ("Start a new conversation", "Send a shorter message"),
                "This conversation is too long for the assistant to read at once. Please start a new conversation "
                "or send a shorter message."),
        Failure(UpstreamError, "MODEL_REQUEST_REJECTED", ("Rephrase your message", "Start a new conversation"),
                "The assistant couldn't process this message. Please rephrase it and try again."),
        Failure(UpstreamError, "MODEL_ERROR", ("Rephrase your message", "Contact support if the problem persists"),
                "The AI model couldn't process this message. Please rephrase it and try again."),
        *(Failure(UpstreamError, code, ("Contact support",), _CONFIG_PROBLEM) for code in _CONFIGURATION),
    )
}

# Bedrock error types, lower-cased: HTTP errors name them in PascalCase (x-amzn-ErrorType), in-stream exception
# frames in camelCase (:exception-type), so one lower-case key serves both.
BEDROCK_ERRORS: dict[str, str] = {
    "throttlingexception": "MODEL_THROTTLED",
    "toomanyrequestsexception": "MODEL_THROTTLED",
    "servicequotaexceededexception": "MODEL_THROTTLED",
    "modeltimeoutexception": "MODEL_TIMEOUT",
    "serviceunavailableexception": "MODEL_UNAVAILABLE",
    "internalserverexception": "MODEL_INTERNAL_ERROR",
    "internalfailure": "MODEL_INTERNAL_ERROR",
    "modelstreamerrorexception": "MODEL_STREAM_ERROR",
    "modelnotreadyexception": "MODEL_NOT_READY",
    "modelerrorexception": "MODEL_ERROR",
    "validationexception": "MODEL_REQUEST_REJECTED",
    "accessdeniedexception": "MODEL_ACCESS_DENIED",
    "resourcenotfoundexception": "MODEL_NOT_FOUND",
    "expiredtokenexception": "MODEL_CREDENTIALS_EXPIRED",
    "unrecognizedclientexception": "MODEL_CREDENTIALS_INVALID",
    "invalidsignatureexception": "MODEL_CREDENTIALS_INVALID",
    "incompletesignatureexception": "MODEL_CREDENTIALS_INVALID",
    "missingauthenticationtokenexception": "MODEL_CREDENTIALS_INVALID",
}

# Bedrock reports both as a generic type; only the message says which ("Input is too long for requested model",
# "You don't have access to the model with the specified model ID", "Model use case details have not been submitted").
_TOO_LONG = re.compile(r"too long|context window|context length|too many input tokens", re.IGNORECASE)
_NOT_ENABLED = re.compile(r"access to the model|use case|not enabled|not subscribed|subscription", re.IGNORECASE)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def failure(code: str, message: str) -> AppError:
    return FAILURES[code].error(message)


def falls_back(error: AppError) -> bool:
    """Whether the next fallback model may answer instead (and at once) after ``error`` before any output."""
    row = FAILURES.get(error.code)
    return row is not None and row.falls_back


def bedrock_error(error_type: str, status: int | None, upstream_message: str = "") -> AppError:
    """Our error for a Bedrock error type (HTTP or in-stream), falling back on the HTTP status for unknown types."""
    name = _SAFE_NAME.sub("", error_type.split(":", 1)[0].split("#")[-1])[:64]
    code = BEDROCK_ERRORS.get(name.lower()) or _code_for_status(status)
    if code == "MODEL_REQUEST_REJECTED" and _TOO_LONG.search(upstream_message):
        code = "MODEL_INPUT_TOO_LONG"
    elif code in ("MODEL_ACCESS_DENIED", "MODEL_NOT_FOUND") and _NOT_ENABLED.search(upstream_message):
        code = "MODEL_NOT_ENABLED"
    where = f"HTTP {status}" if status is not None else "in the stream"
    # Only a type of AWS's own list is named: the rest is foreign text (an unmodeled frame's :error-code, a proxy's
    # header), and this message is logged.
    shown = name if name.lower() in BEDROCK_ERRORS else f"an unknown error type of {len(name)} characters"
    return failure(code, f"Bedrock returned {shown} ({where}).")


# Bedrock's HTTP statuses, for an error type it did not name or that is not in ``BEDROCK_ERRORS``.
_STATUS_CODES = {429: "MODEL_THROTTLED", 408: "MODEL_TIMEOUT", 504: "MODEL_TIMEOUT", 503: "MODEL_UNAVAILABLE",
                 401: "MODEL_ACCESS_DENIED", 403: "MODEL_ACCESS_DENIED", 404: "MODEL_NOT_FOUND"}


def _code_for_status(status: int | None) -> str:
    if status is None:
        return "MODEL_STREAM_ERROR"
    return _STATUS_CODES.get(status) or ("MODEL_INTERNAL_ERROR" if status >= 500 else "MODEL_REQUEST_REJECTED")


def transport_error(exc: StreamClientError) -> AppError:
    # The client's message says what broke (refused, reset, malformed response) and holds nothing from the request.
    if isinstance(exc, ConnectTimeout):
        return failure("MODEL_TIMEOUT", "Connecting to Bedrock timed out (BEDROCK_CONNECT_TIMEOUT).")
    return failure("MODEL_NETWORK_ERROR", f"Could not talk to Bedrock: {exc}.")
