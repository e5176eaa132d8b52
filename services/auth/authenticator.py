"""Who is calling: turns a request's credentials and claimed ``user_id`` into a ``Caller``.

``build_authenticator`` picks the mode from settings; docs/production.md ("Authentication") states each mode and the
whole token rule. ``none`` (development only) trusts the claimed ``user_id``, and every store call is still scoped to
it. ``jwt`` verifies HS256 tokens here with ``SUPABASE_JWT_SECRET``; ``jwks`` verifies ES256/RS256 tokens here with
the project's published keys (``jwks.py``), so no token costs a network call; with ``AUTH_VERIFY=remote``,
``supabase-auth`` asks Supabase Auth instead (``lookup.py``), which also refuses a session logged out before its token
expired. A secret set beside ``SUPABASE_URL`` keeps HS256 local (``jwt+jwks``, ``jwt+supabase-auth``).

Every token is parsed and its claims checked the same way first (``tokens.py``); the claimed ``user_id`` must then
equal ``sub``. Messages never echo the token or its claims, and tokens are never logged.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Protocol

import httpx

from services.auth.jwks import SigningKeys
from services.auth.lookup import LookupBudget, SupabaseUserLookup
from services.auth.tokens import HS256Verifier, bearer_token, check_claims, invalid_token, parse_token, user_id_mismatch
from services.retry import RetryPolicy
from services.store import Caller
from settings import ConfigError, Settings

REMOTE_ALGORITHMS = frozenset({"ES256", "RS256", "HS256"})  # what Supabase Auth signs with; never "none"


class Authenticator(Protocol):
    mode: str

    async def verify(self, authorization: str | None, before_remote: Callable[[], None] | None = None) -> Caller | None:
        """The caller the bearer token proves, or None when authentication is off; ``Unauthorized`` otherwise.
        Needs no request body, so it runs before one is read. ``before_remote`` runs (and may raise) just before a
        call to Supabase Auth, never when the token is checked locally or from the cache."""

    async def aclose(self) -> None:
        ...


class TrustClaimedUser:
    """Development without auth: the request's ``user_id`` is taken at its word."""

    mode = "none"

    async def verify(self, authorization: str | None, before_remote: Callable[[], None] | None = None) -> Caller | None:
        return None

    async def aclose(self) -> None:
        return None


def claimed_caller(verified: Caller | None, claimed_user_id: str) -> Caller:
    """The token's user, who must be the ``user_id`` the request names, or, with authentication off, the named user."""
    if verified is None:
        return Caller(user_id=claimed_user_id)
    if claimed_user_id.lower() != verified.user_id:
        raise user_id_mismatch()
    return verified


class SupabaseJWTAuth:
    """Bearer tokens from Supabase Auth: HS256 with the project's secret, and asymmetric ones with its published keys
    (``keys``) or, when configured so, by asking Supabase Auth (``remote``); all but the last verified here."""

    def __init__(
        self, *, hs256: HS256Verifier | None, issuer: str | None, keys: SigningKeys | None = None,
        remote: SupabaseUserLookup | None = None, clock: Callable[[], float] = time.time
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


def open_to_anyone(auth: Authenticator, host: str) -> str | None:
    """Startup's warning when authentication is off and ``host`` (API_HOST) is reachable from other machines:
    development trusts the user_id a request names, so anyone there could read and write every user's conversations."""
    if auth.mode != "none" or _is_loopback(host):
        return None
    return (f"Authentication is off and API_HOST is {host}: anyone who can reach this port can act as any user_id. "
            "Keep it on 127.0.0.1 (in a container, publish it on 127.0.0.1 only), or turn authentication on "
            "(SUPABASE_JWT_SECRET or SUPABASE_URL).")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_authenticator(settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None) -> Authenticator:
    secret = str(settings.supabase_jwt_secret)
    url = settings.supabase_url.rstrip("/")
    if not secret and not url:
        return TrustClaimedUser()
    keys = remote = None
    if url and settings.auth_verify == "jwks":
        keys = SigningKeys(url, api_key=settings.publishable_key, timeout=settings.supabase_timeout,
                           transport=transport)
    elif url:
        if not settings.publishable_key:
            raise ConfigError(
                "Verifying tokens with Supabase Auth (SUPABASE_URL) requires SUPABASE_PUBLISHABLE_KEY "
                "(or the legacy SUPABASE_ANON_KEY)"
            )
        budget = LookupBudget(settings.auth_lookups_per_minute, settings.rate_limit_window_seconds,
                              settings.auth_lookup_concurrency, wait=settings.supabase_timeout)
        remote = SupabaseUserLookup(url, settings.publishable_key, RetryPolicy.from_settings(settings),
                                    timeout=settings.supabase_timeout, transport=transport, budget=budget)
    return SupabaseJWTAuth(hs256=HS256Verifier(secret) if secret else None, keys=keys, remote=remote,
                           issuer=f"{url}/auth/v1" if url else None)
