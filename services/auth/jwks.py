"""A Supabase project's signing keys, kept here so its asymmetric access tokens (ES256, RS256) are verified locally.

``SigningKeys`` fetches the set Supabase Auth publishes (``/auth/v1/.well-known/jwks.json``) once and keeps it, so an
Auth outage stops no one whose key is held. It fetches again when a token names a key id it does not hold (a
rotation: Supabase publishes a new key before it signs with it) or the set is ``REFRESH_SECONDS`` old; never more
often than once per ``REFETCH_MIN_SECONDS``, however many tokens name unknown keys. A failed fetch keeps the keys held.

Signatures are checked by ``cryptography`` (ES256 on P-256, whose ``r || s`` signature it takes DER-encoded; RS256
with PKCS#1 v1.5 and at least 2048 bits). Only keys for signing with one of those two are taken from the set (a
symmetric ``oct`` key never is, so no token can be checked as HMAC with a public value), and a key that names its
algorithm is used for that one only, so a token cannot pick how its key is read.
"""

from __future__ import annotations

import binascii
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from errors import AppError, UpstreamUnavailable
from services.auth.lookup import AuthAPI
from services.auth.tokens import b64url, invalid_token

logger = logging.getLogger(__name__)

ALGORITHMS = frozenset({"ES256", "RS256"})
REFRESH_SECONDS = 600.0  # Supabase caches its own key set for 10 minutes; a removed key is dropped within this
REFETCH_MIN_SECONDS = 30.0  # unknown key ids, forged or not, fetch the set at most this often
MAX_KEYS = 32  # a project has a few (current, standby, previous); a set past this is not one we read
MAX_BODY_BYTES = 64 * 1024
MIN_RSA_BITS = 2048

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class SigningKeys:
    """The project's public signing keys by ``kid``, fetched from Supabase Auth and kept (see the module docstring)."""

    def __init__(
        self, supabase_url: str, *, api_key: str = "", timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # One connection: the set is fetched by one request at a time. The key set is public; the gateway may want
        # the API key.
        self._api = AuthAPI(supabase_url, api_key, 1, timeout, transport)
        self._clock = clock
        self._keys: dict[str, tuple[str | None, PublicKey]] = {}  # kid -> (the algorithm it names, the key)
        self._fetched_at: float | None = None  # the last successful fetch
        self._tried_at: float | None = None  # the last attempt, successful or not
        self._failed = False  # whether the last attempt failed
        self._fetching = anyio.Lock()

    async def verify(self, algorithm: str, kid: str | None, signing_input: bytes, signature: bytes) -> None:
        """Return if ``signature`` over ``signing_input`` is good under the key ``kid``; ``INVALID_TOKEN`` if not,
        ``AUTH_UNAVAILABLE`` when the key is not held and the set cannot be fetched to find it."""
        if algorithm not in ALGORITHMS or kid is None:
            raise invalid_token()  # Supabase names the key of every token it signs
        await self._refresh(wanted=kid)
        named, key = self._keys.get(kid, (None, None))
        if key is None or named not in (None, algorithm):
            raise invalid_token()
        try:
            _check(algorithm, key, signing_input, signature)
        except (InvalidSignature, ValueError):
            raise invalid_token() from None

    async def aclose(self) -> None:
        await self._api.aclose()

    # -- the key set ------------------------------------------------------------------------------------------------

    async def _refresh(self, wanted: str) -> None:
        """Fetch the set if it is stale or lacks ``wanted``, unless it was tried in the last REFETCH_MIN_SECONDS.
        A key id not held while a fetch is in flight waits for that fetch (at most its timeout): it may bring the key,
        and refusing the token meanwhile would sign out a user whose token is good (a cold worker, a rotation)."""
        if self._due(wanted) or (wanted not in self._keys and self._fetching.locked()):
            async with self._fetching:
                if self._due(wanted):  # not fetched by another request while this one waited
                    await self._fetch_keeping()
        if wanted not in self._keys and self._failed:
            # Perhaps a key published since the last fetch: that cannot be told until Supabase Auth answers.
            raise _keys_unavailable()

    async def _fetch_keeping(self) -> None:
        self._tried_at = self._clock()
        try:
            self._keys, self._fetched_at, self._failed = await self._fetch(), self._tried_at, False
        except AppError as exc:
            self._failed = True
            logger.warning("Could not fetch the Supabase signing keys (%s); keeping the %d held", exc.code,
                           len(self._keys))

    def _due(self, wanted: str) -> bool:
        now = self._clock()
        if self._tried_at is not None and now - self._tried_at < REFETCH_MIN_SECONDS:
            return False
        stale = self._fetched_at is None or now - self._fetched_at >= REFRESH_SECONDS
        return stale or wanted not in self._keys

    async def _fetch(self) -> dict[str, tuple[str | None, PublicKey]]:
        response = await self._api.get(".well-known/jwks.json", _keys_unavailable())
        if response.status_code != 200 or len(response.content) > MAX_BODY_BYTES:
            logger.warning("Supabase Auth answered %s for its signing keys", response.status_code)
            raise _keys_unavailable()
        try:
            listed = response.json()["keys"]
        except (ValueError, KeyError, TypeError):
            listed = None
        if not isinstance(listed, list) or len(listed) > MAX_KEYS:
            logger.warning("Supabase Auth's signing key set is not one this service reads")
            raise _keys_unavailable()
        return {kid: entry for kid, entry in (_read_key(jwk) for jwk in listed) if kid is not None}


def _keys_unavailable() -> UpstreamUnavailable:
    return UpstreamUnavailable("Supabase Auth's signing keys are unavailable.", code="AUTH_UNAVAILABLE")


def _read_key(jwk: Any) -> tuple[str | None, tuple[str | None, PublicKey]] | tuple[None, None]:
    """(kid, (its named algorithm, the public key)) of one JWK, or (None, None) for one this service does not use."""
    if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or jwk.get("use", "sig") != "sig":
        return None, None
    named = jwk.get("alg")
    if named is not None and named not in ALGORITHMS:
        return None, None
    with contextlib.suppress(KeyError, TypeError, ValueError, binascii.Error):
        if jwk.get("kty") == "EC" and jwk.get("crv") == "P-256" and named in (None, "ES256"):
            x, y = _coordinate(jwk["x"]), _coordinate(jwk["y"])
            return jwk["kid"], ("ES256", ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key())
        if jwk.get("kty") == "RSA" and named in (None, "RS256"):
            key = rsa.RSAPublicNumbers(_integer(jwk["e"]), _integer(jwk["n"])).public_key()
            if key.key_size >= MIN_RSA_BITS:
                return jwk["kid"], ("RS256", key)
    logger.info("Skipped a signing key this service does not use")
    return None, None


def _check(algorithm: str, key: PublicKey, signing_input: bytes, signature: bytes) -> None:
    if algorithm == "ES256" and isinstance(key, ec.EllipticCurvePublicKey):
        if len(signature) != 64:
            raise InvalidSignature()
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
    elif algorithm == "RS256" and isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise InvalidSignature()  # the token's algorithm is not its key's


def _integer(value: str) -> int:
    return int.from_bytes(b64url(value), "big")


def _coordinate(value: str) -> int:
    data = b64url(value)
    if len(data) != 32:
        raise ValueError("not a P-256 coordinate")
    return int.from_bytes(data, "big")

