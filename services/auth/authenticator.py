"""Who is calling: turns a request's credentials and claimed ``user_id`` into a ``Caller``.

Four modes, picked from settings by ``build_authenticator``:

* ``none``: no auth configured (development only; production refuses to start). The claimed ``user_id`` is trusted,
  and every store call is still scoped to it.
* ``jwt``: Supabase access tokens signed with the project's legacy HS256 secret (``SUPABASE_JWT_SECRET``) are
  verified here, with the standard library and a constant-time compare. No network round trip.
* ``jwks``: for projects on asymmetric signing keys (ES256/RS256), the signature is verified here with the project's
  published public keys (``services/auth/jwks.py``), fetched once and kept: no token costs a network call, and an Auth
  outage stops no one whose key is held. The default whenever ``SUPABASE_URL`` is set.
* ``supabase-auth``: only with ``AUTH_VERIFY=remote``, asymmetric tokens are instead checked by Supabase Auth
  (``GET {SUPABASE_URL}/auth/v1/user``), which also refuses a session logged out before its token expired, and the
  answer cached, bounded in size, never past the token's ``exp``. Forged tokens must not turn into load on Supabase
  Auth: its refusals are cached too (briefly), one call at a time is made per token (concurrent requests share it),
  a 429 from it is never retried, and the worker's calls are bounded overall (``LookupBudget``:
  ``AUTH_LOOKUPS_PER_MINUTE`` per window and ``AUTH_LOOKUP_CONCURRENCY`` at once), whatever the number of tokens or
  client addresses (the per-address limit is ``app.py``'s ``before_remote``).

With a secret configured too, HS256 tokens are still verified locally (``jwt+jwks``, ``jwt+supabase-auth``).

Every token is checked the same way before anything else: three parts in unpadded base64url (RFC 7515 section 2:
that alphabet only, no padding, canonical, so a token has one spelling), a JSON object header with a string ``alg``
on a fixed allow-list (never ``none``; ``HS256`` only when verified with the secret) and string ``typ``/``kid`` if
present, a JSON object of claims, ``exp``/``nbf``/``iat`` finite numbers with at most 30 s leeway, ``aud``
containing ``authenticated``, ``iss`` equal to ``{SUPABASE_URL}/auth/v1`` when the URL is known, ``role``
``authenticated`` (required) and a string UUID ``sub``. The claimed ``user_id`` must then equal ``sub``. Failures are
``Unauthorized``/``Forbidden`` with the codes ``MISSING_TOKEN``, ``MALFORMED_TOKEN``, ``INVALID_TOKEN``,
``EXPIRED_TOKEN`` and ``USER_ID_MISMATCH``; messages never echo the token or its claims, and tokens are never logged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import anyio
import httpx

from errors import AppError, Forbidden, Unauthorized, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from services.http_pool import PoolBusy, Slots, limits
from services.auth.jwks import SigningKeys
from services.retry import RetryPolicy, with_retry
from services.store import Caller, is_canonical_uuid
from settings import ConfigError, Settings

logger = logging.getLogger(__name__)

LEEWAY_SECONDS = 30  # PostgREST's own clock-skew allowance; the most the issue allows
AUDIENCE = "authenticated"
REMOTE_ALGORITHMS = frozenset({"ES256", "RS256", "HS256"})  # what Supabase Auth signs with; never "none"
CACHE_SIZE = 1024
LOOKUP_CONNECTIONS = 20  # to Supabase Auth, per worker (its calls are bounded by AUTH_LOOKUP_CONCURRENCY too)
CACHE_MAX_SECONDS = 60.0  # a revoked session is noticed within a minute even if its token lives an hour
NEGATIVE_CACHE_SECONDS = 60.0  # a refused token is refused again without asking Supabase Auth, for this long
MAX_TIME = 2**53  # a NumericDate past this is no real time (and float() of a huge int raises OverflowError)

_B64URL = re.compile(r"[A-Za-z0-9_-]*")  # fullmatch only


class Authenticator(Protocol):
    mode: str

    async def verify(self, authorization: str | None, before_remote: Callable[[], None] | None = None) -> Caller | None:
        """The caller the bearer token proves, or None when authentication is off; ``Unauthorized`` otherwise.
        Needs no request body, so it runs before one is read. ``before_remote`` runs (and may raise) just before a
        call to Supabase Auth, never when the token is checked locally or from the cache."""
        ...

    async def aclose(self) -> None:
        ...


class TrustClaimedUser:
    """Development without auth: the request's ``user_id`` is taken at its word."""

    mode = "none"

    async def verify(self, authorization: str | None, before_remote: Callable[[], None] | None = None) -> Caller | None:
        return None

    async def aclose(self) -> None:
        return None


# -- errors --------------------------------------------------------------------------------------------------------


def missing_token() -> Unauthorized:
    return Unauthorized(
        "An Authorization: Bearer token is required.",
        code="MISSING_TOKEN",
        user_message="Authentication required. Please log in.",
    )


def malformed_token() -> Unauthorized:
    return Unauthorized(
        "The Authorization header is not a well-formed Bearer JWT.",
        code="MALFORMED_TOKEN",
        user_message="Invalid authentication format. Please log in again.",
    )


def invalid_token() -> Unauthorized:
    return Unauthorized("The access token is not valid.", code="INVALID_TOKEN")


def expired_token() -> Unauthorized:
    return Unauthorized(
        "The access token has expired.",
        code="EXPIRED_TOKEN",
        user_message="Your session has expired. Please log in again.",
    )


def user_id_mismatch() -> Forbidden:
    return Forbidden(
        "user_id does not match the access token.",
        code="USER_ID_MISMATCH",
        user_message="You are not authorized to access this user's data.",
    )


# -- token parsing and claim checks -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    raw: str
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def bearer_token(authorization: str | None) -> str:
    """The token of ``Authorization: Bearer <token>`` (scheme case-insensitive, RFC 7235)."""
    if authorization is None or not authorization.strip():
        raise missing_token()
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise malformed_token()
    return token


def parse_token(raw: str) -> Token:
    parts = raw.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise malformed_token()
    try:
        header = _json_object(_b64url(parts[0]))
        claims = _json_object(_b64url(parts[1]))
        signature = _b64url(parts[2])
    except (ValueError, binascii.Error, RecursionError):  # RecursionError: JSON nested past Python's limit
        raise malformed_token() from None
    if not isinstance(header.get("alg"), str) or any(
        name in header and not isinstance(header[name], str) for name in ("typ", "kid")
    ):
        raise malformed_token()  # a list or object here used to reach a set lookup: 500 "unhashable type"
    return Token(raw, header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def check_claims(claims: dict[str, Any], *, now: float, issuer: str | None) -> str:
    """Validate the registered and Supabase claims; return the user id (``sub``) in canonical form."""
    exp = claims.get("exp")
    if not _is_time(exp):
        raise invalid_token()
    if now > exp + LEEWAY_SECONDS:
        raise expired_token()
    for name in ("nbf", "iat"):
        if name in claims and (not _is_time(claims[name]) or claims[name] > now + LEEWAY_SECONDS):
            raise invalid_token()
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if AUDIENCE not in audiences:
        raise invalid_token()
    if issuer is not None and claims.get("iss") != issuer:
        raise invalid_token()
    if claims.get("role") != AUDIENCE:
        raise invalid_token()  # required: README promises it, and PostgREST acts as the role the token names
    subject = claims.get("sub")
    if not isinstance(subject, str) or not is_canonical_uuid(subject):
        raise invalid_token()
    return subject.lower()


def _b64url(part: str) -> bytes:
    """Unpadded base64url, strictly: Python's decoder skips stray characters and ignores padding and unused bits."""
    if not _B64URL.fullmatch(part) or len(part) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=") != part.encode("ascii"):
        raise ValueError("not the canonical spelling")  # nonzero unused bits in the last character
    return data


def _json_object(data: bytes) -> dict[str, Any]:
    """A JSON object in strict UTF-8, without NaN/Infinity or repeated names (which one would count is a guess)."""
    value = _STRICT_JSON.decode(data.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("repeated name")
    return result


# Made once: json.loads with options builds a decoder per call.
_STRICT_JSON = json.JSONDecoder(parse_constant=_refuse, object_pairs_hook=_unique_names)


def _is_time(value: object) -> bool:
    """A JSON NumericDate we can compute with: an int or float (not a bool) within ``MAX_TIME``.

    The range check also refuses NaN (every comparison is false) and the infinity JSON's ``1e999`` decodes to.
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -MAX_TIME <= value <= MAX_TIME


def claimed_caller(verified: Caller | None, claimed_user_id: str) -> Caller:
    """The request's caller: the token's user, who must be the ``user_id`` the request names (``Forbidden``
    otherwise), or, with authentication off, the named user."""
    if verified is None:
        return Caller(user_id=claimed_user_id)
    if claimed_user_id.lower() != verified.user_id:
        raise user_id_mismatch()
    return verified


async def authenticate(
    auth: Authenticator, authorization: str | None, claimed_user_id: str, before_remote: Callable[[], None] | None = None
) -> Caller:
    """``verify`` then ``claimed_caller``: the whole check for a request whose claimed user is already known."""
    return claimed_caller(await auth.verify(authorization, before_remote), claimed_user_id)


# -- verifiers ----------------------------------------------------------------------------------------------------


class HS256Verifier:
    """The legacy shared secret: HMAC-SHA256 with the standard library, compared in constant time."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode("utf-8")

    def verify(self, token: Token) -> None:
        expected = hmac.new(self._key, token.signing_input, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, token.signature):
            raise invalid_token()


T = TypeVar("T")


class _ExpiringCache(Generic[T]):
    """A bounded map (least recently used out first) whose entries each lapse at their own time."""

    def __init__(self, size: int) -> None:
        self._entries: OrderedDict[str, tuple[T, float]] = OrderedDict()
        self._size = size

    def get(self, key: str, now: float) -> T | None:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            self._entries.pop(key, None)
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: str, value: T, expires_at: float) -> None:
        self._entries[key] = (value, expires_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


@dataclass
class _Lookup:
    """One call to Supabase Auth in flight; requests with the same token wait for it instead of calling too."""

    done: anyio.Event = field(default_factory=anyio.Event)
    user_id: str | None = None
    error: AppError | None = None


def _worth_retrying(error: AppError) -> bool:
    # A 429 means Supabase Auth wants fewer calls: retrying it would triple the load that caused it. An exhausted
    # budget stays exhausted until its window ends.
    return error.retryable and error.code not in ("AUTH_THROTTLED", "AUTH_BUSY")


def auth_busy(retry_after: float) -> UpstreamUnavailable:
    return UpstreamUnavailable(
        "This worker's calls to Supabase Auth are at their limit (AUTH_LOOKUPS_PER_MINUTE, AUTH_LOOKUP_CONCURRENCY).",
        code="AUTH_BUSY",
        retry_after=max(1.0, retry_after),
    )


class LookupBudget:
    """This worker's calls to Supabase Auth, bounded overall: at most ``per_window`` in each fixed window of
    ``window_seconds`` and ``concurrent`` at once (a call waits at most ``wait`` seconds for a free slot).

    The per-address limit stops one client; this stops many addresses, or one rotating tokens, from making the
    service call Supabase Auth without bound (it limits by our address: a flood would break sign-in for everyone).
    Past the budget a token not already cached is a 503 ``AUTH_BUSY`` with ``Retry-After``; cached tokens, tokens
    checked locally (HS256) and cached refusals cost nothing and are never refused by it.
    """

    def __init__(
        self, per_window: int, window_seconds: float, concurrent: int, wait: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._per_window = per_window
        self._window = window_seconds
        self._slots = anyio.Semaphore(concurrent)
        self._wait = wait
        self._clock = clock
        self._window_start = self._logged = -1.0
        self._spent = 0

    @contextlib.asynccontextmanager
    async def call(self) -> AsyncIterator[None]:
        """One call: a slot first (a caller that gives up waiting for one spends nothing), then one of the window's."""
        await self._take_slot()
        try:
            self._spend()
            yield
        finally:
            self._slots.release()

    async def _take_slot(self) -> None:
        with anyio.move_on_after(self._wait):
            await self._slots.acquire()
            return
        raise auth_busy(1.0)

    def _spend(self) -> None:
        now = self._clock()
        start = now - now % self._window
        if start != self._window_start:
            self._window_start, self._spent = start, 0
        if self._spent >= self._per_window:
            if self._logged != start:  # once per window: a flood must not become a flood of log lines
                self._logged = start
                logger.warning("Supabase Auth lookups reached AUTH_LOOKUPS_PER_MINUTE (%d) this window", self._per_window)
            raise auth_busy(start + self._window - now)
        self._spent += 1


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isascii() and value.isdigit() and len(value) <= 5 else None


class SupabaseUserLookup:
    """Asks Supabase Auth whether a token is good (``GET /auth/v1/user``); caches yes-answers, bounded, ≤ ``exp``.

    Supabase Auth verifies the signature with the project's current keys and also rejects logged-out sessions.
    Its 401/403 are the token's fault (``INVALID_TOKEN``), remembered for ``NEGATIVE_CACHE_SECONDS``; its 5xx or
    silence are ours (503/504, retried); its 429 is a 503 with its ``Retry-After``, not retried. Concurrent
    requests with one token share one call. Caches are keyed by a hash: they never hold a usable token.
    """

    def __init__(
        self,
        supabase_url: str,
        api_key: str,
        retry: RetryPolicy,
        *,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        cache_size: int = CACHE_SIZE,
        budget: LookupBudget | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=supabase_url.rstrip("/") + "/auth/v1/",
            headers={"apikey": api_key},
            timeout=httpx.Timeout(timeout, connect=min(5.0, timeout)),
            limits=limits(LOOKUP_CONNECTIONS),
            transport=transport,
        )
        # services/http_pool.py: a request whose client leaves mid-lookup must not cost the client a connection.
        self._slots = Slots(LOOKUP_CONNECTIONS, timeout)
        self._retry = retry
        self._clock = clock
        self._known: _ExpiringCache[str] = _ExpiringCache(cache_size)
        self._refused: _ExpiringCache[bool] = _ExpiringCache(cache_size)
        self._lookups: dict[str, _Lookup] = {}
        self._budget = budget or LookupBudget(
            Settings.auth_lookups_per_minute, 60, Settings.auth_lookup_concurrency, timeout, clock
        )

    async def user_id(self, token: Token, expires_at: float, before_remote: Callable[[], None] | None = None) -> str:
        key = hashlib.sha256(token.raw.encode("utf-8")).hexdigest()
        while True:
            now = self._clock()
            if self._refused.get(key, now):
                raise invalid_token()
            known = self._known.get(key, now)
            if known is not None:
                return known
            lookup = self._lookups.get(key)
            if lookup is None:
                if before_remote is not None:
                    before_remote()
                return await self._look_up(key, token.raw, min(expires_at, now + CACHE_MAX_SECONDS))
            await lookup.done.wait()
            if lookup.user_id is not None:
                return lookup.user_id
            if lookup.error is not None:
                raise lookup.error
            # The request that was asking was cancelled before an answer came: ask again (one of us will).

    async def _look_up(self, key: str, raw: str, keep_until: float) -> str:
        lookup = self._lookups[key] = _Lookup()
        try:
            user_id = await with_retry(
                lambda: self._fetch(raw), self._retry, what="Supabase Auth /user", retryable=_worth_retrying
            )
            self._known.put(key, user_id, keep_until)
            lookup.user_id = user_id
            return user_id
        except Unauthorized as exc:
            self._refused.put(key, True, self._clock() + NEGATIVE_CACHE_SECONDS)
            lookup.error = exc
            raise
        except AppError as exc:
            lookup.error = exc
            raise
        finally:
            # Also on cancellation: the waiters then find neither answer nor error and ask themselves.
            del self._lookups[key]
            lookup.done.set()

    async def aclose(self) -> None:
        await self._slots.aclose()
        await self._http.aclose()

    async def _fetch(self, raw: str) -> str:
        try:
            async with self._budget.call():  # every attempt counts, retries included
                response = await self._slots.run(
                    lambda: self._http.get("user", headers={"Authorization": f"Bearer {raw}"})
                )
        except PoolBusy as exc:
            raise auth_busy(1.0) from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("Supabase Auth did not answer in time.", code="AUTH_TIMEOUT") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailable("Supabase Auth is unreachable.", code="AUTH_UNAVAILABLE") from exc
        if response.status_code in (401, 403):
            logger.info("Supabase Auth rejected a token (%s)", response.status_code)
            raise invalid_token()
        if response.status_code == 429:
            logger.warning("Supabase Auth answered 429 (not retried)")
            raise UpstreamUnavailable(
                "Supabase Auth is rate limiting token checks.", code="AUTH_THROTTLED", retry_after=_retry_after(response)
            )
        if response.status_code >= 500:
            logger.warning("Supabase Auth answered %s", response.status_code)
            raise UpstreamUnavailable("Supabase Auth is unavailable.", code="AUTH_UNAVAILABLE")
        if response.status_code == 200:
            try:
                return str(uuid.UUID(str(response.json()["id"])))
            except (ValueError, KeyError, TypeError):
                pass
        logger.warning("Supabase Auth answered %s with an unexpected body", response.status_code)
        raise UpstreamError("Supabase Auth gave an unexpected answer.", code="AUTH_UPSTREAM_ERROR")


class SupabaseJWTAuth:
    """Bearer tokens from Supabase Auth: HS256 with the project's secret, and asymmetric ones with its published keys
    (``keys``) or, when configured so, by asking Supabase Auth (``remote``); all but the last verified here."""

    def __init__(
        self,
        *,
        hs256: HS256Verifier | None,
        issuer: str | None,
        keys: SigningKeys | None = None,
        remote: SupabaseUserLookup | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if hs256 is None and keys is None and remote is None:
            raise ConfigError("JWT authentication needs SUPABASE_JWT_SECRET or SUPABASE_URL")
        self._hs256 = hs256
        self._keys = keys
        self._remote = remote
        self._issuer = issuer
        self._clock = clock
        parts = (("jwt", hs256), ("jwks", keys), ("supabase-auth", remote))
        self.mode = "+".join(name for name, part in parts if part)

    async def verify(self, authorization: str | None, before_remote: Callable[[], None] | None = None) -> Caller:
        token = parse_token(bearer_token(authorization))
        algorithm = token.header.get("alg")
        if algorithm == "HS256" and self._hs256 is not None:
            self._hs256.verify(token)  # signature first: claims of an unsigned token mean nothing
            user_id = check_claims(token.claims, now=self._clock(), issuer=self._issuer)
        elif algorithm in ("ES256", "RS256") and self._keys is not None:
            await self._keys.verify(algorithm, token.header.get("kid"), token.signing_input, token.signature)
            user_id = check_claims(token.claims, now=self._clock(), issuer=self._issuer)
        elif algorithm in REMOTE_ALGORITHMS and self._remote is not None:
            # Cheap local checks first (they can only reject), then Supabase Auth for the signature.
            user_id = check_claims(token.claims, now=self._clock(), issuer=self._issuer)
            if await self._remote.user_id(token, float(token.claims["exp"]), before_remote) != user_id:
                raise invalid_token()
        else:
            raise invalid_token()  # "none", an unknown algorithm, or one we have no key for
        return Caller(user_id=user_id, access_token=token.raw)

    async def aclose(self) -> None:
        for part in (self._keys, self._remote):
            if part is not None:
                await part.aclose()


def build_authenticator(settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> Authenticator:
    """``none`` without auth settings; otherwise HS256 with the secret, and asymmetric tokens with the project's keys
    or (``AUTH_VERIFY=remote``) by Supabase Auth, as configured."""
    secret = str(settings.supabase_jwt_secret)
    url = settings.supabase_url.rstrip("/")
    if not secret and not url:
        return TrustClaimedUser()
    keys = remote = None
    if url and settings.auth_verify == "jwks":
        keys = SigningKeys(url, api_key=settings.publishable_key, timeout=settings.supabase_timeout, transport=transport)
    elif url:
        if not settings.publishable_key:
            raise ConfigError(
                "Verifying tokens with Supabase Auth (SUPABASE_URL) requires SUPABASE_PUBLISHABLE_KEY "
                "(or the legacy SUPABASE_ANON_KEY)"
            )
        remote = SupabaseUserLookup(
            url,
            settings.publishable_key,
            RetryPolicy.from_settings(settings),
            timeout=settings.supabase_timeout,
            transport=transport,
            budget=LookupBudget(
                settings.auth_lookups_per_minute,
                settings.rate_limit_window_seconds,
                settings.auth_lookup_concurrency,
                wait=settings.supabase_timeout,
            ),
        )
    return SupabaseJWTAuth(
        hs256=HS256Verifier(secret) if secret else None,
        keys=keys,
        remote=remote,
        issuer=f"{url}/auth/v1" if url else None,
    )

