"""PostgREST request plumbing shared by every store that talks to Supabase's Data API (``/rest/v1``).

Our own pool of one-connection httpx clients (HTTP/1.1, explicit timeouts; ``services/http_pool.py``): ``pool_size``
keep-alive connections reused by every request, a bounded wait for one (then 503 ``STORE_BUSY``), and no cancellation
ever reaching httpx, where it can lose a slot for good. Every request carries ``apikey: <publishable or legacy anon
key>`` and ``Authorization: Bearer <the caller's own access token>``, so PostgREST runs as role ``authenticated`` and
PostgreSQL's row-level security decides what the caller may touch. A request without a user token is refused here
rather than sent as ``anon``, but for ``rpc_by_key``: a call to a function whose authority is a capability it checks
itself (a run's write key). A secret/service-role key is refused at construction: it would bypass row-level security.

What this layer owns, so the store (conversations, business records, rate limits) only says *what* to read or write:

* the schema's ``Accept-Profile``/``Content-Profile``, ``Prefer``, ``Content-Range`` totals, and RPC
  (``POST rpc/<function>`` with named arguments), whose result may be an array, an object or a bare scalar;
* error translation, once, from PostgREST's ``{code, message, details, hint}`` (both the pre-v13 and the v13+
  codes) and from httpx exceptions into ``errors.AppError`` subclasses; the upstream detail goes to the log, never to
  a client, and stays reachable as ``exc.__cause__`` (a ``PostgrestFailure``) for a store that needs to refine it;
* retries through ``services.retry.with_retry``, only for transient failures (503, 504, 520, connection errors) and
  only for idempotent requests: reads, deletes, updates and inserts (a client-generated ``id`` with
  ``resolution=ignore-duplicates``, so a replay inserts nothing); an RPC only when its caller says so.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from errors import AppError, Forbidden, NotFound, Unauthorized, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from services.http_pool import ONE_CONNECTION, Connections, PoolBusy
from services.retry import RetryPolicy, retry_after_seconds, with_retry
from services.store import Caller
from services.store.numbers import NumberText, json_integer, json_number
from settings import ConfigError, Settings, is_privileged_key

logger = logging.getLogger(__name__)

# Statuses worth another attempt: PostgREST's own 503 (PGRST000-002, 08*, 53*, 57P01) and 504 (PGRST003), and
# Cloudflare's 520 in front of Supabase. Everything else is an answer, and asking again gives the same answer.
TRANSIENT_STATUSES = frozenset({503, 504, 520})
# Statuses that refuse the request itself: PostgreSQL's data exceptions (22*, a NUL in text, say) and constraint
# violations (23*), a body too large. Asking again gets the same answer; asking without the part at fault may not.
REJECTED_STATUSES = frozenset({400, 409, 413, 422})

# Every answer's numbers as the store reads them (services/store/numbers.py): a float only when it is exactly the
# number the database sent, else its text (NaN, Infinity, more digits than a double keeps). Made once: json.loads
# with options builds a decoder per call.
_DECODER = json.JSONDecoder(parse_float=json_number, parse_int=json_integer, parse_constant=NumberText)

# PostgreSQL and PostgREST quote what they refuse: ``invalid input syntax for type uuid: "<the value>"`` (22P02, and
# 22007, 22008, 22003 alike), ``failed to parse filter (<the filter>)`` (PGRST100). What is quoted or bracketed is
# logged as its length only; the words around it, which name the problem, are kept.
_QUOTED = re.compile(r'"[^"]*"?|\'[^\']*\'?|\([^)]*\)?|\[[^\]]*\]?|\{[^}]*\}?')
_CODE = re.compile(r"[^A-Za-z0-9_]")  # a SQLSTATE or PGRST code; anything else in it is dropped

SCHEMA_CODES = frozenset({"PGRST200", "PGRST202", "PGRST204", "PGRST205", "PGRST106", "42P01", "42703", "42883"})


@dataclass(frozen=True, slots=True)
class Result:
    """A successful response: the rows (``[]`` for ``return=minimal``) and, when a count was asked for, the total."""

    rows: list[dict[str, Any]]
    total: int | None


class PostgrestFailure(Exception):
    """What PostgREST (or the gateway in front of it) said, kept as the ``__cause__`` of the error we raise.

    Never shown to clients, nor logged whole: ``message`` can quote SQL values, so it stays out of this exception's
    text too (a traceback prints that of every exception in a chain).
    """

    def __init__(self, status: int, code: str, message: str, *, transient: bool, rejected: bool = False) -> None:
        super().__init__(f"HTTP {status} {code}")
        self.status = status
        self.code = code
        self.message = message
        self.transient = transient
        self.rejected = rejected  # the request's own content was at fault (``REJECTED_STATUSES``, or unencodable)


def postgrest_failure(error: AppError) -> PostgrestFailure | None:
    """The upstream failure behind ``error``, for a store that refines the generic translation."""
    cause = error.__cause__
    return cause if isinstance(cause, PostgrestFailure) else None


def is_rejected(error: AppError) -> bool:
    """Whether ``error`` refused the request for what it held, which the same request would meet again."""
    failure = postgrest_failure(error)
    return failure is not None and failure.rejected


class PostgrestClient:
    def __init__(
        self, supabase_url: str, schema: str, api_key: str, *, retry: RetryPolicy, timeout: float = 10.0,
        pool_size: int = Settings.supabase_pool_size, pool_timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not supabase_url or not api_key:
            raise ConfigError("The Supabase store needs SUPABASE_URL and SUPABASE_PUBLISHABLE_KEY")
        if is_privileged_key(api_key):
            raise ConfigError(
                "SUPABASE_PUBLISHABLE_KEY holds a secret or service-role key; user data is only read with the "
                "publishable (or legacy anon) key and the user's own token"
            )
        if timeout <= 0:
            raise ConfigError("SUPABASE_TIMEOUT must be positive")
        if pool_size < 1 or pool_timeout <= 0:
            raise ConfigError("SUPABASE_POOL_SIZE must be at least 1 and SUPABASE_POOL_TIMEOUT positive")
        self._schema = schema
        self._api_key = api_key
        self._retry = retry
        ssl_context = httpx.create_ssl_context()  # one for every client: each would otherwise load the CA bundle

        def client() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=supabase_url.rstrip("/") + "/rest/v1/",
                http1=True,
                http2=False,
                timeout=httpx.Timeout(timeout, connect=min(5.0, timeout), pool=pool_timeout),
                limits=ONE_CONNECTION,
                transport=transport,
                verify=ssl_context,
                follow_redirects=False,
            )

        self._connections = Connections(pool_size, pool_timeout, client)
        # One more connection, for the worker's flushes alone (``rpc_by_key``): they carry every run's events, so a
        # burst of new turns holding the pool must not hold them up too. Flushes go one at a time.
        self._flush_connection = Connections(1, pool_timeout, client)

    async def aclose(self) -> None:
        await self._connections.aclose()
        await self._flush_connection.aclose()

    # -- verbs --------------------------------------------------------------------------------------------------

    async def select(self, caller: Caller, table: str, params: Mapping[str, str], *, count: bool = False) -> Result:
        prefer = ["count=exact"] if count else []
        return await self.request(caller, "GET", table, params=params, prefer=prefer)

    async def insert(self, caller: Caller, table: str, row: Mapping[str, Any], *, select: str) -> Result:
        """Insert one row and return it. A duplicate ``id`` (the client generates it) is skipped (``rows == []``),
        which makes the insert idempotent, so it is retried."""
        params = {"select": select, "on_conflict": "id"}
        prefer = ["return=representation", "resolution=ignore-duplicates"]
        return await self.request(caller, "POST", table, params=params, json_body=dict(row), prefer=prefer,
                                  idempotent=True)

    async def delete(self, caller: Caller, table: str, params: Mapping[str, str]) -> Result:
        """Delete the matching rows (always pass a primary-key filter); their ids, ``[]`` when none matched."""
        return await self.request(caller, "DELETE", table, params={**params, "select": "id"},
                                  prefer=["return=representation"])

    async def probe(self, table: str) -> None:
        """Is PostgREST up and does it know ``table``? Sent with the API key alone (role ``anon``).

        ``anon`` has no grant on our tables, so PostgREST answering 42501 proves the database answered and the table
        exists; a 2xx (a project that granted ``anon`` more) proves the same.
        """
        async def attempt() -> None:
            headers = self._headers(None, "GET", [])
            response = await self._send(self._connections, "GET", table, {"select": "id", "limit": "0"}, headers)
            if response.is_success:
                return
            failure = _failure(response)
            if failure.code == "42501":
                return
            raise _translate(failure) from failure

        await with_retry(attempt, self._retry, what="PostgREST probe", retryable=_is_transient)

    async def request(
        self, caller: Caller, method: str, path: str, *, params: Mapping[str, str] | None = None,
        json_body: Any = None, prefer: list[str] | None = None, idempotent: bool | None = None,
    ) -> Result:
        """One PostgREST call as ``caller``. ``idempotent`` defaults to true for every method but POST."""
        replayable = idempotent if idempotent is not None else method != "POST"
        response = await self._exchange(caller, method, path, params, json_body, prefer or [], replayable)
        return Result(_rows(response), parse_total(response.headers.get("content-range")))

    async def rpc(
        self, caller: Caller, function: str, args: Mapping[str, Any], *, idempotent: bool,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Call the function ``{schema}.{function}`` with named arguments as ``caller``; its decoded JSON result.

        PostgREST answers a table function with an array of objects, a scalar function with the bare JSON value and a
        ``void`` one with 204 (``None`` here). Only a caller that says the call is safe to repeat gets retries.
        ``headers`` go with the call, where SQL reads them (PostgREST's ``request.headers``).
        """
        response = await self._exchange(caller, "POST", f"rpc/{function}", None, dict(args), [], idempotent, headers)
        return _json(response)

    async def rpc_by_key(self, function: str, args: Mapping[str, Any], *, idempotent: bool) -> Any:
        """Call a function whose authority is a capability among its arguments (a run's write key), not a user: sent
        with no user token, so PostgREST runs it as ``anon``, and no user's expired token can stop it. Only such
        functions are granted to ``anon`` (``migrations/009_keyed_flush.sql``)."""
        return _json(await self._exchange(None, "POST", f"rpc/{function}", None, dict(args), [], idempotent))

    async def _exchange(
        self, caller: Caller | None, method: str, path: str, params: Mapping[str, str] | None, json_body: Any,
        prefer: list[str], replayable: bool, extra_headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send as ``caller`` (None: as no user, for ``rpc_by_key``), translate a failure once, and retry transient
        ones when the request is replayable."""
        if caller is not None and not caller.access_token:
            raise Unauthorized("No access token to act as the user.", code="MISSING_TOKEN")
        headers = self._headers(caller.access_token if caller is not None else None, method, prefer)
        headers.update(extra_headers or {})

        slots = self._connections if caller is not None else self._flush_connection

        async def attempt() -> httpx.Response:
            # No query at all rather than an empty one: httpx merges even an empty one into the URL (~35 us a call).
            response = await self._send(slots, method, path, dict(params) if params else None, headers, json_body)
            if not response.is_success:
                failure = _failure(response)
                raise _translate(failure, response.headers.get("retry-after")) from failure
            return response

        if not replayable:
            return await attempt()
        return await with_retry(attempt, self._retry, what=f"PostgREST {method} {path}", retryable=_is_transient)

    # -- plumbing -----------------------------------------------------------------------------------------------

    def _headers(self, token: str | None, method: str, prefer: list[str]) -> dict[str, str]:
        profile = "Accept-Profile" if method in ("GET", "HEAD") else "Content-Profile"
        headers = {"apikey": self._api_key, profile: self._schema, "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if prefer:
            headers["Prefer"] = ", ".join(prefer)
        return headers

    async def _send(
        self, slots: Connections, method: str, path: str, params: dict[str, str] | None, headers: dict[str, str],
        json_body: Any = None,
    ) -> httpx.Response:
        try:
            return await slots.run(
                lambda client: client.request(method, path, params=params, headers=headers, json=json_body)
            )
        except PoolBusy as exc:
            # Our own requests hold every connection: asking again at once would only wait again, so the caller is
            # told to come back (a retryable 503), and this worker takes no more than its pool from PostgREST.
            logger.warning("PostgREST request refused: %s", exc)
            raise UpstreamUnavailable(
                "Every connection to the database is in use.", code="STORE_BUSY", retry_after=1.0
            ) from exc
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached PostgREST: as safe to retry as a refused connection.
            raise _timeout() from _transport(exc, transient=True)
        except httpx.TimeoutException as exc:
            # Sent, but no answer in time: the statement may still be running, so it is not retried here.
            raise _timeout() from _transport(exc, transient=False)
        except httpx.TransportError as exc:
            # Refused, reset, or a kept-alive connection the server had closed (RemoteProtocolError).
            raise UpstreamUnavailable("The database is unreachable.", code="STORE_UNAVAILABLE") from _transport(
                exc, transient=True
            )
        except (ValueError, TypeError) as exc:
            # httpx could not write the body as JSON (a lone surrogate, which UTF-8 cannot encode; NaN): never sent,
            # and never sendable, as PostgREST refusing it would be. By type only: the error can quote the body.
            logger.warning("PostgREST request not sent: its body cannot be encoded (%s)", type(exc).__name__)
            failure = PostgrestFailure(0, type(exc).__name__, "unencodable body", transient=False, rejected=True)
            raise UpstreamError("The request could not be encoded.", code="STORE_ERROR") from failure


def parse_total(content_range: str | None) -> int | None:
    """The total of ``Content-Range: 0-24/3573458`` (``*/0``, ``*/*``, ...); ``None`` when absent or ``*``."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _json(response: httpx.Response) -> Any:
    """The decoded JSON body: rows, or an RPC's array (table function) or bare value (scalar); None when there is
    none (``void``, 204)."""
    if response.status_code == 204 or not response.content:
        return None
    try:
        return _DECODER.decode(response.text)
    except ValueError as exc:
        raise UpstreamError("The database returned an unreadable response.", code="STORE_BAD_RESPONSE") from exc


def _rows(response: httpx.Response) -> list[dict[str, Any]]:
    if response.status_code == 204 or not response.content:
        return []
    body = _json(response)
    if isinstance(body, dict):
        return [body]
    if not isinstance(body, list) or not all(isinstance(row, dict) for row in body):
        raise UpstreamError("The database returned an unexpected response.", code="STORE_BAD_RESPONSE")
    return body


def _failure(response: httpx.Response) -> PostgrestFailure:
    """PostgREST's error JSON, or a synthesized one for gateway/proxy bodies (HTML 520, plain-text 414, ...)."""
    # A gateway's page (HTML, plain text) may echo the request's URL, whose filters are user data: not kept.
    code, message = f"HTTP{response.status_code}", ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = _CODE.sub("", str(body.get("code") or body.get("error_code") or code))[:16] or code
        message = str(body.get("message") or body.get("msg") or "")
    status = response.status_code
    return PostgrestFailure(status, code, message, transient=status in TRANSIENT_STATUSES,
                            rejected=status in REJECTED_STATUSES)


def _translate(failure: PostgrestFailure, retry_after: str | None = None) -> AppError:
    """PostgREST/PostgreSQL error → ours. Log the detail here, once; clients get only our code and message."""
    status, code = failure.status, failure.code
    log = logger.warning if status < 500 else logger.error
    # Not PostgREST's message as it is: it quotes the values PostgreSQL refused (``_QUOTED``). `details` is never read.
    log("PostgREST answered %s %s: %s", status, code, redacted(failure.message))
    if status == 401 and code.startswith("PGRST3"):
        # The user's token, as PostgREST judged it. Pre-v13 said PGRST301 for every JWT problem, expiry included.
        if "expired" in failure.message.lower():
            return Unauthorized("The access token has expired.", code="EXPIRED_TOKEN",
                                user_message="Your session has expired. Please log in again.")
        return Unauthorized("The access token was rejected.", code="INVALID_TOKEN")
    if code == "28P01":
        # The database refused the run secret (migrations/017_service_runs.sql): a deployment fault, not the user's.
        return UpstreamError("The database refused the service's run secret; see SUPABASE_RUN_SECRET.",
                             code="STORE_MISCONFIGURED")
    if code == "42501":
        if "row-level security" in failure.message:
            return Forbidden("The database refused the write.", code="STORE_FORBIDDEN")
        return UpstreamError("The database denied access; check the migration's grants.",
                             code="STORE_PERMISSION_DENIED")
    if status == 401 or status == 403:
        # No PostgREST code: the API gateway rejected our apikey. A deployment fault, not the user's.
        return UpstreamError("The database rejected the service's API key.", code="STORE_MISCONFIGURED")
    if code in SCHEMA_CODES:
        return UpstreamError("The database schema is missing or not exposed; apply the migration.", code="STORE_SCHEMA")
    if code == "PGRST116":
        return NotFound("Not found.")
    if code == "57014" or status == 504:
        return _timeout()
    if status in TRANSIENT_STATUSES or code.startswith(("PGRST0", "08", "53")) or code == "57P01":
        return UpstreamUnavailable(
            "The database is unavailable.", code="STORE_UNAVAILABLE", retry_after=retry_after_seconds(retry_after)
        )
    return UpstreamError("The database rejected the request.", code="STORE_ERROR")


def redacted(message: str) -> str:
    """``message`` with each quoted or bracketed part replaced by its length: ``invalid input syntax for type uuid:
    "<7 chars>"``. At most 200 characters."""
    shown = _QUOTED.sub(_length_only, message)
    return shown if len(shown) <= 200 else shown[:200] + f"... ({len(message)} characters)"


def _length_only(quoted: re.Match[str]) -> str:
    text = quoted.group()
    closed = len(text) > 1 and text[-1] == _CLOSING[text[0]]  # a quote left open runs to the end of the message
    inner = len(text) - (2 if closed else 1)
    return f"{text[0]}<{inner} chars>{text[-1] if closed else ''}"


_CLOSING = {'"': '"', "'": "'", "(": ")", "[": "]", "{": "}"}


def _timeout() -> UpstreamTimeout:
    return UpstreamTimeout("The database did not answer in time.", code="STORE_TIMEOUT")


def _transport(exc: httpx.TransportError, *, transient: bool) -> PostgrestFailure:
    logger.warning("PostgREST request failed: %s", type(exc).__name__)
    failure = PostgrestFailure(0, type(exc).__name__, "transport error", transient=transient)
    failure.__cause__ = exc
    return failure


def _is_transient(error: AppError) -> bool:
    failure = postgrest_failure(error)
    return failure is not None and failure.transient
