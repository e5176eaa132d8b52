"""ES256/RS256 access tokens verified locally with the project's published signing keys (services/auth/jwks.py), against
a stand-in of Supabase Auth on 127.0.0.1 that counts its calls: after the first fetch of the key set, no token costs
a network call, and an Auth outage stops no one whose key is held."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import create_app
from errors import Unauthorized, UpstreamUnavailable
from services.auth import jwks
from tests.support import LiveServer, make_settings, new_id, serve
from tests.tokens import claims_for

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(value: int, size: int | None = None) -> str:
    return _b64(value.to_bytes(size or (value.bit_length() + 7) // 8, "big"))


def public_jwk(kid: str, key: Key, **extra: Any) -> dict[str, Any]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = key.public_key().public_numbers()
        return {"kid": kid, "kty": "EC", "crv": "P-256", "x": _uint(numbers.x, 32), "y": _uint(numbers.y, 32),
                "alg": "ES256", "use": "sig", **extra}
    public = key.public_key().public_numbers()
    return {"kid": kid, "kty": "RSA", "n": _uint(public.n), "e": _uint(public.e), "alg": "RS256", "use": "sig", **extra}


def sign(key: Key, kid: str | None, claims: dict[str, Any], alg: str | None = None) -> str:
    """A JWS as Supabase Auth makes one: ES256 signatures as r || s, RS256 as PKCS#1 v1.5."""
    alg = alg or ("ES256" if isinstance(key, ec.EllipticCurvePrivateKey) else "RS256")
    header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid is not None else {})}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}".encode()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode()}.{_b64(signature)}"


@dataclass
class FakeAuth:
    """Supabase Auth's key set and /user, with call counts; ``down`` makes every call a 503."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    down: bool = False
    key_fetches: int = 0
    user_calls: int = 0

    def app(self) -> Starlette:
        async def key_set(request: Request) -> Response:
            self.key_fetches += 1
            return Response(status_code=503) if self.down else JSONResponse({"keys": self.keys})

        async def user(request: Request) -> Response:
            self.user_calls += 1
            return Response(status_code=503)

        return Starlette(routes=[Route("/auth/v1/.well-known/jwks.json", key_set), Route("/auth/v1/user", user)])


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def auth(ec_key: Key, rsa_key: Key) -> Iterator[tuple[FakeAuth, LiveServer]]:
    fake = FakeAuth(keys=[public_jwk("ec-1", ec_key), public_jwk("rsa-1", rsa_key)])
    with serve(fake.app()) as server:
        yield fake, server


@pytest.fixture
def service(auth: tuple[FakeAuth, LiveServer], tmp_path: Path) -> Iterator[LiveServer]:
    _, server = auth
    settings = make_settings(tmp_path, SUPABASE_URL=server.url, SUPABASE_PUBLISHABLE_KEY="sb_publishable_x")
    with serve(create_app(settings)) as live:
        yield live


def claims(server: LiveServer, user: str, **changes: Any) -> dict[str, Any]:
    return claims_for(user, issuer=f"{server.url}/auth/v1", **changes)


def listed(service: LiveServer, user: str, token: str) -> httpx.Response:
    return httpx.get(f"{service.url}/api/conversations", params={"user_id": user},
                     headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_a_hundred_new_users_cost_one_fetch_of_the_key_set_and_no_call_per_token(
    auth: tuple[FakeAuth, LiveServer], service: LiveServer, ec_key: Key, rsa_key: Key
) -> None:
    fake, server = auth
    health = httpx.get(f"{service.url}/health", timeout=10).json()
    assert health["auth"]["mode"] == "jwks"
    for i in range(100):
        user = new_id()
        key, kid = (ec_key, "ec-1") if i % 2 else (rsa_key, "rsa-1")
        assert listed(service, user, sign(key, kid, claims(server, user))).status_code == 200
    assert (fake.key_fetches, fake.user_calls) == (1, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def verify(keys: jwks.SigningKeys, token: str) -> None:
    header, payload, signature = token.split(".")
    named = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    await keys.verify(named.get("alg"), named.get("kid"), f"{header}.{payload}".encode(), raw)


def test_an_auth_outage_stops_no_one_whose_key_is_held(auth: tuple[FakeAuth, LiveServer], ec_key: Key) -> None:
    """With a clock of its own: while Supabase Auth is down, held keys verify; a key id never seen is refused as
    unknowable (503) once the set may be fetched again and cannot be."""
    fake, server = auth
    clock = Clock()
    token = sign(ec_key, "ec-1", claims(server, new_id()))
    stranger = sign(ec.generate_private_key(ec.SECP256R1()), "ec-2", claims(server, new_id()))

    async def scenario() -> None:
        keys = jwks.SigningKeys(server.url, clock=clock)
        try:
            await verify(keys, token)
            fake.down = True
            clock.now += jwks.REFRESH_SECONDS + 1  # stale: the refresh fails, and the held keys stay
            for _ in range(5):
                await verify(keys, token)
            with pytest.raises(UpstreamUnavailable) as unknown:
                await verify(keys, stranger)
            assert unknown.value.code == "AUTH_UNAVAILABLE"
        finally:
            await keys.aclose()

    asyncio.run(scenario())
    assert (fake.key_fetches, fake.user_calls) == (2, 0)  # the first fetch and one failed refresh, not one per token


def test_a_rotated_key_is_fetched_and_made_up_key_ids_fetch_at_most_once_per_interval(
    auth: tuple[FakeAuth, LiveServer], ec_key: Key
) -> None:
    fake, server = auth
    clock = Clock()
    rotated = ec.generate_private_key(ec.SECP256R1())

    async def scenario() -> None:
        keys = jwks.SigningKeys(server.url, clock=clock)
        try:
            await verify(keys, sign(ec_key, "ec-1", claims(server, new_id())))
            fake.keys.append(public_jwk("ec-2", rotated))
            clock.now += jwks.REFETCH_MIN_SECONDS
            await verify(keys, sign(rotated, "ec-2", claims(server, new_id())))  # unknown key id: fetched, found
            assert fake.key_fetches == 2
            for minute in range(3):  # 50 made-up key ids a minute for three minutes: all refused
                for i in range(50):
                    clock.now += 60 / 50
                    with pytest.raises(Unauthorized):
                        await verify(keys, sign(rotated, f"forged-{minute}-{i}", claims(server, new_id())))
        finally:
            await keys.aclose()

    asyncio.run(scenario())
    assert fake.key_fetches <= 2 + 3 * 60 / jwks.REFETCH_MIN_SECONDS  # two a minute at most, not one per token


def test_only_a_good_signature_under_the_named_key_and_its_algorithm_passes(
    auth: tuple[FakeAuth, LiveServer], service: LiveServer, ec_key: Key, rsa_key: Key
) -> None:
    fake, server = auth
    user = new_id()
    good = sign(ec_key, "ec-1", claims(server, user))
    header, payload, signature = good.split(".")
    other_user = _b64(json.dumps(claims(server, new_id())).encode())
    stranger = ec.generate_private_key(ec.SECP256R1())
    refused = {
        "another payload": f"{header}.{other_user}.{signature}",
        "a key not the project's": sign(stranger, "ec-1", claims(server, user)),
        "the EC key named for RS256": sign(rsa_key, "ec-1", claims(server, user), alg="RS256"),
        "the RSA key named for ES256": sign(ec_key, "rsa-1", claims(server, user), alg="ES256"),
        "no key id": sign(ec_key, None, claims(server, user)),
        "a short ES256 signature": f"{header}.{payload}.{_b64(b'x' * 63)}",
        "a DER ES256 signature": f"{header}.{payload}.{_b64(ec_key.sign(b'x', ec.ECDSA(hashes.SHA256())))}",
        "expired": sign(ec_key, "ec-1", claims(server, user, exp=1_000_000_000)),
        "another issuer": sign(ec_key, "ec-1", claims_for(user, issuer="https://elsewhere.example/auth/v1")),
    }
    for what, token in refused.items():
        response = listed(service, user, token)
        assert response.status_code == 401, what
    assert listed(service, user, good).status_code == 200
    assert fake.user_calls == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"kid": "oct", "kty": "oct", "k": _b64(b"secret" * 6), "alg": "HS256"},  # a shared secret is never a JWKS key
        {"kid": "small", "kty": "RSA", "n": _uint(2**1023 + 1), "e": _uint(65537)},  # under 2,048 bits
        {"kid": "p384", "kty": "EC", "crv": "P-384", "x": _uint(1, 48), "y": _uint(1, 48)},
        {"kid": "enc", "kty": "EC", "crv": "P-256", "x": _uint(1, 32), "y": _uint(2, 32), "use": "enc"},
        {"kid": "off-curve", "kty": "EC", "crv": "P-256", "x": _uint(1, 32), "y": _uint(1, 32)},
        {"kid": 7, "kty": "EC"},
        "not an object",
    ],
)
def test_keys_this_service_does_not_use_are_skipped_and_the_rest_still_work(bad: Any, ec_key: Key) -> None:
    assert jwks._read_key(bad) == (None, None)
    kid, (named, key) = jwks._read_key(public_jwk("ec-1", ec_key))  # type: ignore[misc]
    assert (kid, named) == ("ec-1", "ES256") and isinstance(key, ec.EllipticCurvePublicKey)


def test_remote_lookup_stays_an_explicit_option(auth: tuple[FakeAuth, LiveServer], tmp_path: Path, ec_key: Key) -> None:
    fake, server = auth
    settings = make_settings(tmp_path, SUPABASE_URL=server.url, SUPABASE_PUBLISHABLE_KEY="sb_publishable_x",
                             AUTH_VERIFY="remote")
    user = new_id()
    with serve(create_app(settings)) as live:
        assert httpx.get(f"{live.url}/health", timeout=10).json()["auth"]["mode"] == "supabase-auth"
        asked = listed(live, user, sign(ec_key, "ec-1", claims(server, user)))
    assert asked.status_code == 503 and fake.user_calls >= 1 and fake.key_fetches == 0


def test_requests_arriving_while_the_key_set_is_fetched_wait_for_it_rather_than_get_a_401(ec_key: Key) -> None:
    """A cold worker (or a rotation): while the first request fetches the set, the others, whose key id is not held
    yet, wait for that fetch instead of being refused as if their token were forged (a 401 signs a user out)."""
    fetches = 0
    asked, answer = threading.Event(), threading.Event()

    async def slow_key_set(request: Request) -> Response:
        nonlocal fetches
        fetches += 1
        asked.set()
        await anyio.to_thread.run_sync(answer.wait, 30)  # held until the others have come in
        return JSONResponse({"keys": [public_jwk("ec-1", ec_key)]})

    slow = Starlette(routes=[Route("/auth/v1/.well-known/jwks.json", slow_key_set)])
    with serve(slow) as server:
        tokens = [sign(ec_key, "ec-1", claims(server, new_id())) for _ in range(20)]

        async def scenario() -> list[BaseException | None]:
            keys = jwks.SigningKeys(server.url)
            try:
                first = asyncio.ensure_future(verify(keys, tokens[0]))
                for _ in range(3000):  # the first request's fetch is in flight
                    if asked.is_set():
                        break
                    await asyncio.sleep(0.01)
                others = asyncio.gather(*(verify(keys, token) for token in tokens[1:]), return_exceptions=True)
                await asyncio.sleep(0.2)  # with the fault, they are all refused by now; with the fix, all waiting
                answer.set()
                return [*(await asyncio.gather(first, return_exceptions=True)), *await others]
            finally:
                answer.set()
                await keys.aclose()

        outcomes = asyncio.run(scenario())
    assert outcomes == [None] * 20
    assert fetches == 1
