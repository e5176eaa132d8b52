"""The service's one error hierarchy and the one JSON envelope every non-2xx response uses.

    AppError                      500 INTERNAL_ERROR
    ├── BadRequest                400 (malformed JSON, ...)
    ├── Unauthorized              401 (MISSING_TOKEN, MALFORMED_TOKEN, INVALID_TOKEN, EXPIRED_TOKEN)
    ├── Forbidden                 403 (USER_ID_MISMATCH)
    ├── NotFound                  404
    │   ├── ConversationNotFound  404 CONVERSATION_NOT_FOUND
    │   ├── RecordNotFound        404 RECORD_NOT_FOUND
    │   ├── RunNotFound           404 RUN_NOT_FOUND
    │   └── ActionNotFound        404 ACTION_NOT_FOUND
    ├── RequestTimeout            408 (the body did not arrive within BODY_READ_TIMEOUT)
    ├── MethodNotAllowed          405
    ├── PayloadTooLarge           413
    ├── UnsupportedMediaType      415
    ├── Conflict                  409
    │   ├── RunInProgress         409 RUN_IN_PROGRESS
    │   ├── IdempotencyConflict   409 IDEMPOTENCY_CONFLICT
    │   ├── ActionAlreadyUsed     409 ACTION_ALREADY_USED
    │   └── RecordChanged         409 RECORD_CHANGED
    ├── Gone                      410
    │   └── ActionExpired         410 ACTION_EXPIRED
    ├── ConversationDeleted       410 CONVERSATION_DELETED (a run's conversation, deleted while it generated)
    ├── ValidationFailed          422 (missing fields, bad ids, out-of-range values)
    ├── RateLimited               429 (RATE_LIMIT_EXCEEDED, carries retry_after)
    ├── BudgetExceeded            429 BUDGET_EXCEEDED (a usage budget is spent until its period resets; not retryable)
    ├── ClientClosedRequest       499 (the client left before its request was read; nobody sees the answer)
    ├── ShuttingDown              503 SERVER_SHUTTING_DOWN (a run or viewer still open when the server stops)
    ├── RunTimedOut               504 RUN_TIMEOUT (an answer past RUN_MAX_SECONDS)
    └── UpstreamError             502 (a dependency answered with something we cannot use)
        ├── RunNotSaved           502 RUN_NOT_SAVED (a run's answer the store refused to keep, as bad input)
        ├── UpstreamUnavailable   503 (connection refused, 5xx, throttled: worth retrying)
        └── UpstreamTimeout       504 (no answer in time: worth retrying)

Services raise only these. Foreign exceptions (httpx, botocore, sqlite3) are translated once, at the boundary
that calls the foreign library, with ``raise Ours(...) from exc``. ``message`` is a safe technical summary written
by us: exception text from libraries, SQL, file paths and stack traces never reach a client.
"""

from __future__ import annotations

from typing import Any


def whole_seconds(seconds: float) -> int:
    """A wait as ``retryAfter`` and ``Retry-After`` state it: whole seconds, at least one (a client told 0 would not
    wait at all)."""
    return max(1, round(seconds))


class AppError(Exception):
    """Base class: an error the service expected and knows how to explain. A subclass declares the constants it
    changes as class keywords, ``class NotFound(AppError, status=404, code="NOT_FOUND", ...)``."""

    status = 500
    code = "INTERNAL_ERROR"
    message = "An internal error occurred."
    user_message = "Something went wrong on our side. Please try again."
    suggested_actions: tuple[str, ...] = ("Try again", "Contact support if the problem persists")
    retryable = True
    # When a client is told to come back if the error does not say (``retry_after`` None): the retry rule wants every
    # retryable 503/504 to carry ``Retry-After``, and a refused or reset connection, or a request with no answer in
    # time, says nothing of when the dependency is back.
    default_retry_after: float | None = None

    def __init__(
        self, message: str | None = None, *, code: str | None = None, user_message: str | None = None,
        suggested_actions: tuple[str, ...] | None = None, retryable: bool | None = None,
        retry_after: float | None = None, details: dict[str, Any] | None = None
    ) -> None:
        # Instance values shadow the class defaults only where given, so subclasses stay declarative.
        given = {"message": message, "code": code, "user_message": user_message,
                 "suggested_actions": suggested_actions, "retryable": retryable}
        for name, value in given.items():
            if value is not None:
                setattr(self, name, value)
        self.retry_after = retry_after
        # Extra keys for the envelope's ``error`` object (camelCase, like the rest of it), e.g. ``runId``.
        self.details = details or {}
        super().__init__(self.message)

    def __init_subclass__(cls, **constants: Any) -> None:
        super().__init_subclass__()
        for name, value in constants.items():
            if not hasattr(AppError, name):  # a misspelt constant fails at import, not when the error is raised
                raise TypeError(f"{cls.__name__}: AppError has no constant {name!r}")
            setattr(cls, name, value)

    def body(self) -> dict[str, Any]:
        """The envelope: ``{"error": {code, message, userMessage, suggestedActions, retryable[, retryAfter]}}``.

        Callers may add keys inside ``error`` but must never remove these five; the frontend relies on them.
        """
        error: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "userMessage": self.user_message,
            "suggestedActions": list(self.suggested_actions),
            "retryable": self.retryable,
        }
        if (retry_after := self.advised_retry_after) is not None:
            error["retryAfter"] = whole_seconds(retry_after)
        error.update(self.details)
        return {"error": error}

    @property
    def advised_retry_after(self) -> float | None:
        """The seconds a client is told to wait: what the error says, else (when it is worth retrying) its class's
        default."""
        if self.retry_after is not None:
            return self.retry_after
        return self.default_retry_after if self.retryable else None

    def headers(self) -> dict[str, str]:
        """The response's headers: ``Retry-After`` when the error says when to come back."""
        retry_after = self.advised_retry_after
        return {} if retry_after is None else {"Retry-After": str(whole_seconds(retry_after))}


class BadRequest(AppError, status=400, code="BAD_REQUEST", message="The request could not be read.",
                 user_message="Your request could not be processed. Please try again.",
                 suggested_actions=("Check the request format",), retryable=False):
    """The request could not be read at all (malformed JSON, unreadable body)."""


class Unauthorized(AppError, status=401, code="INVALID_TOKEN", message="Authentication failed.",
                   user_message="Your session is invalid. Please log in again.", suggested_actions=("Log in again",),
                   retryable=False):
    """No usable credentials: missing, malformed, invalid or expired token."""


class Forbidden(AppError, status=403, code="FORBIDDEN", message="This request is not allowed.",
                user_message="You are not authorized to perform this action.",
                suggested_actions=("Log in with the right account",), retryable=False):
    """Credentials are valid but do not allow this request."""


class NotFound(AppError, status=404, code="NOT_FOUND", message="The requested resource was not found.",
               user_message="We couldn't find what you were looking for.",
               suggested_actions=("Check the link or refresh the list",), retryable=False):
    """The resource does not exist or belongs to someone else (the two are deliberately indistinguishable)."""


class MethodNotAllowed(AppError, status=405, code="METHOD_NOT_ALLOWED",
                       message="This method is not allowed on this route.",
                       user_message="This action is not supported.", suggested_actions=("Check the API documentation",),
                       retryable=False):
    """The route exists but not for this HTTP method."""


class PayloadTooLarge(AppError, status=413, code="PAYLOAD_TOO_LARGE", message="The request body is too large.",
                      user_message="Your request is too large. Please send something shorter.",
                      suggested_actions=("Try a shorter message",), retryable=False):
    """The request body is larger than MAX_REQUEST_BYTES."""


class UnsupportedMediaType(AppError, status=415, code="UNSUPPORTED_MEDIA_TYPE",
                           message="The request body must be application/json.",
                           user_message="Your request could not be processed. Please try again.",
                           suggested_actions=("Send the body as application/json",), retryable=False):
    """The request body is not JSON."""


class RequestTimeout(AppError, status=408, code="REQUEST_TIMEOUT", message="The request body did not arrive in time.",
                     user_message="Your request took too long to arrive. Please try again.",
                     suggested_actions=("Check your connection and try again",), retryable=True):
    """The client did not send its whole body in time."""


class Conflict(AppError, status=409, code="CONFLICT", message="The request conflicts with the current state.",
               user_message="This conflicts with something already in progress.",
               suggested_actions=("Wait for the current answer to finish, or stop it",), retryable=False):
    """The request clashes with the current state: an answer is already being generated, or an idempotency key
    was reused for a different message."""


class Gone(AppError, status=410, code="GONE", message="The resource is no longer available.",
           user_message="This is no longer available.", suggested_actions=("Start again",), retryable=False):
    """The resource existed but can no longer be used: a pending action whose time to be confirmed ran out."""


class ValidationFailed(AppError, status=422, code="VALIDATION_ERROR", message="The request is invalid.",
                       user_message="Some of the information sent was not valid. Please check it and try again.",
                       suggested_actions=("Check your input and try again",), retryable=False):
    """The request was readable but a field is missing, malformed or out of range."""


class RateLimited(AppError, status=429, code="RATE_LIMIT_EXCEEDED", message="Too many requests.",
                  user_message="You've made too many requests. Please wait a moment.",
                  suggested_actions=("Wait a moment before trying again", "Reduce the frequency of your requests"),
                  retryable=True):
    """The caller exceeded a per-user limit; ``retry_after`` says when to come back."""

    def __init__(self, message: str | None = None, *, limit: int | None = None, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.limit = limit  # the limit that was hit, for the RateLimit-* headers

    def headers(self) -> dict[str, str]:
        """``Retry-After`` and, when the limit is known, the IETF draft's ``RateLimit-Limit/Remaining/Reset``."""
        seconds = str(whole_seconds(self.retry_after or 1))
        headers = {"Retry-After": seconds}
        if self.limit is not None:
            headers.update({"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": "0", "RateLimit-Reset": seconds})
        return headers


class BudgetExceeded(AppError, status=429, code="BUDGET_EXCEEDED", message="The usage budget for this period is spent.",
                     user_message="You've reached your usage limit for now. It resets at the start of the next period.",
                     suggested_actions=("Wait until the budget resets",), retryable=False):
    """A chat turn would pass one of the caller's usage budgets (``services/limits/budgets.py``). Not a rate limit:
    waiting a moment does not help, so it is not retryable; ``Retry-After`` is the time until the period resets."""

    def headers(self) -> dict[str, str]:
        """``Retry-After``: seconds until the period resets; ``X-Budget-*``: the budget, as ``details`` gives it."""
        headers = {"Retry-After": str(whole_seconds(self.retry_after or 1))}
        names = {"period": "Period", "unit": "Unit", "budget": "Limit", "used": "Used", "resetsAt": "Reset"}
        headers.update({f"X-Budget-{header}": str(self.details[key]) for key, header in names.items()})
        return headers


class ClientClosedRequest(AppError, status=499, code="CLIENT_CLOSED_REQUEST",
                          message="The client closed the connection before the request was read.",
                          user_message="The request was interrupted. Please try again.",
                          suggested_actions=("Try again",), retryable=True):
    """The client closed the connection before sending the body it announced (nginx's 499): not a server error."""


class UpstreamError(AppError, status=502, code="UPSTREAM_ERROR", message="A service we depend on returned an error.",
                    user_message="The assistant couldn't complete your request. Please try again.", retryable=False):
    """A dependency (model or database) answered with something we cannot use; retrying will not help."""


class UpstreamUnavailable(UpstreamError, status=503, code="SERVICE_UNAVAILABLE",
                          message="A service we depend on is unavailable.",
                          user_message="The service is temporarily unavailable. Please try again in a moment.",
                          suggested_actions=("Try again in a moment", "Contact support if the problem persists"),
                          retryable=True, default_retry_after=1.0):
    """A dependency is down, overloaded or throttling: worth retrying after a pause."""


class UpstreamTimeout(UpstreamError, status=504, code="TIMEOUT",
                      message="A service we depend on did not answer in time.",
                      user_message="The request took too long. Please try again.",
                      suggested_actions=("Try again in a moment", "Try a shorter or simpler request"), retryable=True,
                      default_retry_after=1.0):
    """A dependency did not answer in time: worth retrying."""


# -- the store contract's refusals (services.store): both stores raise the same ones ----------------------------------


class ConversationNotFound(NotFound, code="CONVERSATION_NOT_FOUND", message="Conversation not found."):
    """A conversation that is missing or someone else's: the two look the same."""


class RecordNotFound(NotFound, code="RECORD_NOT_FOUND"):
    """A business record that is missing or someone else's; ``singular`` names its kind (``invoice``)."""

    def __init__(self, singular: str) -> None:
        super().__init__(f"No such {singular}.")


class MessageNotFound(NotFound, code="MESSAGE_NOT_FOUND", message="Message not found in this conversation."):
    """A message named as a branch point that is not in this conversation of the caller's (missing, in another
    conversation, or someone else's: all look the same)."""


class RunNotFound(NotFound, code="RUN_NOT_FOUND", message="Run not found."):
    """A chat run that is missing or someone else's."""


# -- refusals of POST /api/actions/{action_id}/confirm (services/agents/actions.py) -------------------------------


class ActionNotFound(NotFound, code="ACTION_NOT_FOUND", message="Action not found.",
                     user_message="We couldn't find that change to confirm.",
                     suggested_actions=("Ask the assistant again",)):
    """A pending action that is missing or someone else's: the two look the same, as for conversations and runs."""


class ActionAlreadyUsed(Conflict, code="ACTION_ALREADY_USED", message="The action was already confirmed.",
                        user_message="This change was already confirmed.",
                        suggested_actions=("Refresh to see your records as they are now",)):
    """The action ran already: each prepared change runs at most once."""


class ActionExpired(Gone, code="ACTION_EXPIRED", message="The action expired before it was confirmed.",
                    user_message="This confirmation has expired, so nothing was changed.",
                    suggested_actions=("Ask the assistant again",)):
    """The action's ACTION_TTL_SECONDS ran out before the user confirmed it."""


class RecordChanged(
    Conflict, code="RECORD_CHANGED", message="The record changed after the action was prepared.",
    user_message="This record has changed since the assistant prepared this change, so nothing was changed.",
    suggested_actions=("Ask the assistant again",),
):
    """The record no longer holds the values the user was shown: confirming would overwrite what they never saw."""


# -- refusals of POST /api/chat (services/runs/manager.py) ------------------------------------------------------------


class RunInProgress(Conflict, code="RUN_IN_PROGRESS",
                    message="An answer is still being generated in this conversation.",
                    user_message="An answer is still being written in this conversation. Wait for it, or stop it."):
    """One run per conversation: the error names the run still going (``runId``), to attach to or stop."""

    def __init__(self, run_id: str) -> None:
        super().__init__(details={"runId": run_id})


class IdempotencyConflict(Conflict, code="IDEMPOTENCY_CONFLICT",
                          message="client_message_id was already used for a different message.",
                          user_message="This message could not be sent. Please try again.",
                          suggested_actions=("Send a new client_message_id with each new message",)):
    """A ``client_message_id`` sent again with a different message or conversation: not a retry of the first."""


# -- how a chat run ends when it cannot complete (services/runs/) -------------------------------------------------


class RunTimedOut(AppError, status=504, code="RUN_TIMEOUT", message="The answer took longer than RUN_MAX_SECONDS.",
                  user_message="The answer took too long and was stopped. Please try a shorter or simpler request.",
                  retryable=False):
    """An answer still generating after RUN_MAX_SECONDS: not retryable, the same request would take as long."""


class ConversationDeleted(AppError, status=410, code="CONVERSATION_DELETED", message="The conversation was deleted.",
                          user_message="This conversation was deleted, so its answer was stopped and not kept.",
                          suggested_actions=("Start a new conversation",), retryable=False):
    """The run's conversation was deleted while it generated or was watched: its answer is gone with it."""


class RunNotSaved(UpstreamError, code="RUN_NOT_SAVED", message="The store refused to save the answer.",
                  user_message="This answer could not be saved. Please send your message again.",
                  suggested_actions=("Send your message again",), retryable=True):
    """The store refused a run's update as bad input, which it would refuse again: the run ends with what the store
    already holds (``services/runs/manager.py``)."""


class ShuttingDown(AppError, status=503, code="SERVER_SHUTTING_DOWN", message="The server is shutting down.",
                   user_message="The server is restarting. Please send your message again.", retryable=True):
    """A run or viewer still open when the server stops: the client sends again, to a worker that stays."""
