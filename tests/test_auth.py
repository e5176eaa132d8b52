"""Authentication: the HS256 verifier, the Supabase-Auth-backed verifier and its cache, the mode picked from
settings, and the codes every /api route answers with (on both stores, through the shared fixtures)."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import httpx
import pytest
from starlette.testclient import TestClient

from errors import Forbidden, Unauthorized, UpstreamUnavailable
from services.auth.authenticator import Authenticator, SupabaseJWTAuth, TrustClaimedUser, build_authenticator, claimed_caller
from services.store import Caller
from services.auth.lookup import CACHE_MAX_SECONDS, NEGATIVE_CACHE_SECONDS, LookupBudget, SupabaseUserLookup
from services.auth.tokens import HS256Verifier
from services.retry import RetryPolicy
from settings import ConfigError, Settings
from tests.conftest import AuthHeaders
from tests.support import new_id
from tests.tokens import MISSING, TEST_JWT_SECRET, b64url, bearer, claims_for, encode, mint

pytestmark = pytest.mark.anyio

ISSUER = "https://project.supabase.co/auth/v1"
FAST = RetryPolicy(attempts=3, base_delay=0, max_delay=0, max_total=5)


async def authenticate(auth: Authenticator, authorization: str | None, claimed_user_id: str) -> Caller:
    """What a request does (web/caller.py): ``verify``, then ``claimed_caller``."""
    return claimed_caller(await auth.verify(authorization), claimed_user_id)


def local_auth(issuer: str | None = ISSUER) -> SupabaseJWTAuth:
    return SupabaseJWTAuth(hs256=HS256Verifier(TEST_JWT_SECRET), remote=None, issuer=issuer)


async def rejected(auth: Any, header: str | None, user: str) -> Unauthorized | Forbidden:
    with pytest.raises((Unauthorized, Forbidden)) as caught:
        await authenticate(auth, header, user)
    error = caught.value
    if header and " " in header.strip():
        token = header.split()[-1]
        assert token not in error.message and token not in error.user_message  # never echo the token
    return error  # type: ignore[return-value]


# -- local HS256 ----------------------------------------------------------------------------------------------------


async def test_a_valid_token_gives_the_caller_with_the_token_to_forward() -> None:
    user = new_id()
    token = mint(user, issuer=ISSUER)
    caller = await authenticate(local_auth(), f"Bearer {token}", user.upper())
    assert caller.user_id == user and caller.access_token == token
    assert token not in repr(caller)


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "MISSING_TOKEN"),
        ("", "MISSING_TOKEN"),
        ("Basic dXNlcjpwYXNz", "MALFORMED_TOKEN"),
        ("Bearer", "MALFORMED_TOKEN"),
        ("Bearer only.two", "MALFORMED_TOKEN"),
        ("Bearer a.b.c.d", "MALFORMED_TOKEN"),
        ("Bearer !!!.???.***", "MALFORMED_TOKEN"),
        (f"Bearer {b64url(b'[1]')}.{b64url(b'{}')}.x", "MALFORMED_TOKEN"),
    ],
)
async def test_missing_and_malformed_headers(header: str | None, code: str) -> None:
    error = await rejected(local_auth(), header, new_id())
    assert (error.status, error.code) == (401, code)


def _tampered(user: str, other: str) -> str:
    header, _, signature = mint(user, issuer=ISSUER).split(".")
    payload = b64url(json.dumps(claims_for(other, issuer=ISSUER)).encode())
    return f"{header}.{payload}.{signature}"


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda u: mint(u, "another-projects-secret-of-32-characters", issuer=ISSUER), "INVALID_TOKEN"),
        (lambda u: _tampered(new_id(), u), "INVALID_TOKEN"),
        (lambda u: encode(claims_for(u, issuer=ISSUER), alg="none"), "INVALID_TOKEN"),
        (lambda u: encode(claims_for(u, issuer=ISSUER), alg="HS512"), "INVALID_TOKEN"),
        (lambda u: encode(claims_for(u, issuer=ISSUER), alg="RS256"), "INVALID_TOKEN"),
        (lambda u: mint(u, issuer=ISSUER, exp=int(time.time()) - 31), "EXPIRED_TOKEN"),
        (lambda u: mint(u, issuer=ISSUER, exp=MISSING), "INVALID_TOKEN"),
        (lambda u: mint(u, issuer=ISSUER, nbf=int(time.time()) + 60), "INVALID_TOKEN"),
        (lambda u: mint(u, issuer=ISSUER, iat=int(time.time()) + 60), "INVALID_TOKEN"),
        (lambda u: mint(u, issuer=ISSUER, aud="anon"), "INVALID_TOKEN"),
        (lambda u: mint(u, issuer=ISSUER, aud=MISSING), "INVALID_TOKEN"),
        (lambda u: mint(u, issuer="https://other.supabase.co/auth/v1"), "INVALID_TOKEN"),
        (lambda u: mint(u, issuer=None), "INVALID_TOKEN"),
        (lambda u: mint(u, issuer=ISSUER, sub=MISSING), "INVALID_TOKEN"),
        (lambda u: mint(u, issuer=ISSUER, sub="not-a-uuid"), "INVALID_TOKEN"),
        (lambda u: mint(u, issuer=ISSUER, role="service_role"), "INVALID_TOKEN"),
        # The legacy anon key is an HS256 JWT from the same secret, with no sub or aud.
        (lambda u: encode({"iss": "supabase", "role": "anon", "exp": int(time.time()) + 99}), "INVALID_TOKEN"),
    ],
    ids=[
        "forged", "tampered", "alg-none", "alg-hs512", "alg-rs256-without-remote", "expired", "no-exp", "nbf-future",
        "iat-future", "other-audience", "no-audience", "other-issuer", "no-issuer", "no-sub", "sub-not-uuid",
        "service-role", "anon-key",
    ],
)
async def test_bad_tokens_are_rejected_with_their_code(make: Any, code: str) -> None:
    user = new_id()
    error = await rejected(local_auth(), f"Bearer {make(user)}", user)
    assert (error.status, error.code) == (401, code)


async def test_expiry_and_not_before_allow_30_seconds_of_clock_skew() -> None:
    user, now = new_id(), int(time.time())
    token = mint(user, issuer=ISSUER, exp=now - 20, nbf=now + 20, iat=now + 20)
    assert (await authenticate(local_auth(), f"Bearer {token}", user)).user_id == user


async def test_audience_may_be_a_list_and_issuer_is_optional_without_a_url() -> None:
    user = new_id()
    token = mint(user, aud=["authenticated", "other"])
    assert (await authenticate(local_auth(issuer=None), f"bearer {token}", user)).user_id == user


async def test_user_id_must_match_the_tokens_subject() -> None:
    error = await rejected(local_auth(), f"Bearer {mint(new_id(), issuer=ISSUER)}", new_id())
    assert (error.status, error.code) == (403, "USER_ID_MISMATCH")


async def test_trust_claimed_user_is_the_development_mode() -> None:
    caller = await authenticate(TrustClaimedUser(), None, "u")
    assert caller.user_id == "u" and caller.access_token is None


# -- Supabase Auth (asymmetric signing keys) ---------------------------------------------------------------------


class AuthServer:
    """``GET /auth/v1/user`` as Supabase Auth answers it, with a request counter."""

    def __init__(self, answers: list[httpx.Response] | None = None, user: str | None = None) -> None:
        self.answers = answers or []
        self.user = user
        self.calls: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        if self.answers:
            return self.answers.pop(0)
        return httpx.Response(200, json={"id": self.user, "aud": "authenticated", "role": "authenticated"})


def es256_token(user: str, **changes: Any) -> str:
    """Shaped like a token from Supabase's ES256 signing keys; only Supabase Auth could check its signature."""
    header = b64url(json.dumps({"alg": "ES256", "kid": "key-1", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims_for(user, issuer=ISSUER, **changes)).encode())
    return f"{header}.{payload}.{b64url(b'r' * 32 + b's' * 32)}"


def remote_auth(
    server: AuthServer, clock: Any = time.time, cache_size: int = 1024, budget: LookupBudget | None = None
) -> SupabaseJWTAuth:
    lookup = SupabaseUserLookup(
        "https://project.supabase.co", "sb_publishable_x", FAST,
        transport=httpx.MockTransport(server), clock=clock, cache_size=cache_size, budget=budget,
    )
    return SupabaseJWTAuth(hs256=None, remote=lookup, issuer=ISSUER, clock=clock)


async def test_asymmetric_tokens_are_checked_by_supabase_auth_with_the_publishable_key() -> None:
    user = new_id()
    server = AuthServer(user=user)
    auth = remote_auth(server)
    token = es256_token(user)
    caller = await authenticate(auth, f"Bearer {token}", user)
    assert caller.user_id == user and caller.access_token == token
    (call,) = server.calls
    assert call.url == "https://project.supabase.co/auth/v1/user"
    assert call.headers["apikey"] == "sb_publishable_x" and call.headers["authorization"] == f"Bearer {token}"
    await auth.aclose()


async def test_answers_are_cached_no_longer_than_the_cap_or_the_tokens_expiry() -> None:
    user, now = new_id(), [1_000_000.0]
    server = AuthServer(user=user)
    auth = remote_auth(server, clock=lambda: now[0])
    long_lived = es256_token(user, exp=int(now[0]) + 3600, iat=int(now[0]))
    for _ in range(3):
        await authenticate(auth, f"Bearer {long_lived}", user)
    assert len(server.calls) == 1
    now[0] += CACHE_MAX_SECONDS + 1
    await authenticate(auth, f"Bearer {long_lived}", user)
    assert len(server.calls) == 2

    short_lived = es256_token(user, exp=int(now[0]) + 5, iat=int(now[0]))
    await authenticate(auth, f"Bearer {short_lived}", user)
    now[0] += 10  # past exp (within the 30 s leeway): the cached yes has lapsed with the token
    await authenticate(auth, f"Bearer {short_lived}", user)
    assert len(server.calls) == 4
    await auth.aclose()


async def test_the_cache_is_bounded() -> None:
    user = new_id()
    server = AuthServer(user=user)
    auth = remote_auth(server, cache_size=2)
    tokens = [es256_token(user, session_id=str(i)) for i in range(3)]
    for token in tokens:
        await authenticate(auth, f"Bearer {token}", user)
    await authenticate(auth, f"Bearer {tokens[0]}", user)  # evicted by the third
    await authenticate(auth, f"Bearer {tokens[2]}", user)  # still cached
    assert len(server.calls) == 4
    await auth.aclose()


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (httpx.Response(403, json={"code": 403, "error_code": "bad_jwt", "msg": "invalid JWT"}), "INVALID_TOKEN"),
        (httpx.Response(403, json={"code": 403, "error_code": "session_not_found"}), "INVALID_TOKEN"),
        (httpx.Response(401, json={"code": 401, "error_code": "no_authorization"}), "INVALID_TOKEN"),
        (httpx.Response(200, json={"id": "00000000-0000-4000-8000-000000000001"}), "INVALID_TOKEN"),
    ],
)
async def test_supabase_auth_refusals_and_other_users_are_invalid(answer: httpx.Response, code: str) -> None:
    user = new_id()
    auth = remote_auth(AuthServer([answer]))
    error = await rejected(auth, f"Bearer {es256_token(user)}", user)
    assert (error.status, error.code) == (401, code)
    await auth.aclose()


async def test_supabase_auth_outages_are_503_after_retries_not_401() -> None:
    user = new_id()
    server = AuthServer([httpx.Response(500, text="oops")] * 3)
    auth = remote_auth(server)
    with pytest.raises(UpstreamUnavailable):
        await authenticate(auth, f"Bearer {es256_token(user)}", user)
    assert len(server.calls) == 3
    await auth.aclose()


async def test_local_claim_checks_run_before_any_network_call() -> None:
    user = new_id()
    server = AuthServer(user=user)
    auth = remote_auth(server)
    for token, code in [
        (es256_token(user, exp=int(time.time()) - 60), "EXPIRED_TOKEN"),
        (es256_token(user, aud="anon"), "INVALID_TOKEN"),
        (encode(claims_for(user, issuer=ISSUER), alg="none"), "INVALID_TOKEN"),
    ]:
        assert (await rejected(auth, f"Bearer {token}", user)).code == code
    assert server.calls == []
    await auth.aclose()


# -- choosing the mode ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "mode"),
    [
        ({}, "none"),
        ({"SUPABASE_JWT_SECRET": "s"}, "jwt"),
        ({"SUPABASE_URL": "https://p.supabase.co", "SUPABASE_PUBLISHABLE_KEY": "k"}, "jwks"),
        ({"SUPABASE_URL": "https://p.supabase.co", "SUPABASE_PUBLISHABLE_KEY": "k", "SUPABASE_JWT_SECRET": "s"},
         "jwt+jwks"),
        ({"SUPABASE_URL": "https://p.supabase.co", "SUPABASE_PUBLISHABLE_KEY": "k", "AUTH_VERIFY": "remote"},
         "supabase-auth"),
        ({"SUPABASE_URL": "https://p.supabase.co", "SUPABASE_ANON_KEY": "k", "AUTH_VERIFY": "remote"}, "supabase-auth"),
        ({"SUPABASE_URL": "https://p.supabase.co", "SUPABASE_PUBLISHABLE_KEY": "k", "SUPABASE_JWT_SECRET": "s",
          "AUTH_VERIFY": "remote"}, "jwt+supabase-auth"),
    ],
)
async def test_the_mode_follows_the_settings(environ: dict[str, str], mode: str) -> None:
    auth = build_authenticator(Settings.from_environ(environ))
    assert auth.mode == mode
    await auth.aclose()


def test_supabase_auth_without_a_key_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="SUPABASE_PUBLISHABLE_KEY"):
        build_authenticator(Settings.from_environ({"SUPABASE_URL": "https://p.supabase.co", "AUTH_VERIFY": "remote"}))


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"ENVIRONMENT": "production"}, "SUPABASE_JWT_SECRET"),
        ({"ENVIRONMENT": "production", "STORE": "supabase", "SUPABASE_JWT_SECRET": "s"}, "SUPABASE_URL"),
        ({"ENVIRONMENT": "production", "STORE": "supabase", "SUPABASE_URL": "https://p.supabase.co"},
         "SUPABASE_PUBLISHABLE_KEY"),
    ],
)
def test_production_refuses_to_start_without_auth_or_store_settings(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_environ(environ)


# -- over HTTP, on every store -------------------------------------------------------------------------------------


def _routes(user: str) -> list[tuple[str, str, dict[str, Any]]]:
    conversation = new_id()
    return [
        ("GET", "/api/conversations", {"params": {"user_id": user}}),
        ("POST", "/api/conversations", {"json": {"user_id": user, "title": "t"}}),
        ("GET", f"/api/conversations/{conversation}", {"params": {"user_id": user}}),
        ("DELETE", f"/api/conversations/{conversation}", {"params": {"user_id": user}}),
        ("POST", "/api/chat/stream", {"json": {"user_id": user, "conversation_id": conversation, "message": "hi"}}),
        ("POST", f"/api/actions/{new_id()}/confirm", {"json": {"user_id": user}}),
    ]


def test_every_api_route_requires_a_bearer_token(client: TestClient, user_id: str) -> None:
    for method, path, kwargs in _routes(user_id):
        response = client.request(method, path, **kwargs)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "MISSING_TOKEN"


def test_every_api_route_checks_the_user_id_against_the_token(
    client: TestClient, auth_headers: AuthHeaders, user_id: str
) -> None:
    intruder = auth_headers(new_id())
    for method, path, kwargs in _routes(user_id):
        response = client.request(method, path, headers=intruder, **kwargs)
        assert response.status_code == 403, (method, path)
        assert response.json()["error"]["code"] == "USER_ID_MISMATCH"


def test_health_stays_open_and_names_the_mode(client: TestClient) -> None:
    assert client.get("/health").json()["auth"]["mode"].startswith("jwt")


def test_bad_tokens_over_http_get_the_envelope_with_their_code(
    client: TestClient, settings: Settings, user_id: str
) -> None:
    issuer = f"{settings.supabase_url}/auth/v1" if settings.supabase_url else None
    cases = [
        (mint(user_id, "wrong-secret-wrong-secret-wrong-secret", issuer=issuer), "INVALID_TOKEN"),
        (mint(user_id, issuer=issuer, exp=int(time.time()) - 120), "EXPIRED_TOKEN"),
        (mint(user_id, issuer=issuer, aud="somebody-else"), "INVALID_TOKEN"),
        (encode(claims_for(user_id, issuer=issuer), alg="none"), "INVALID_TOKEN"),
        (mint(user_id, issuer=issuer, sub=MISSING), "INVALID_TOKEN"),
        ("not-a-jwt", "MALFORMED_TOKEN"),
    ]
    for token, code in cases:
        response = client.get("/api/conversations", params={"user_id": user_id}, headers=bearer(token))
        assert response.status_code == 401
        error = response.json()["error"]
        assert error["code"] == code and isinstance(error["userMessage"], str)
        assert token not in response.text


# -- hardening (issue 11): token shapes, strict base64url, role, and the cost of forged tokens ------------------------


def _segment(value: Any) -> str:
    return b64url(json.dumps(value).encode())


def _shaped(header: Any, claims: Any) -> str:
    return f"{_segment(header)}.{_segment(claims)}.{b64url(b's' * 32)}"


ODD_VALUES: list[Any] = [["HS256"], {"alg": "HS256"}, 256, None, True, 1.5]


def _malformed_shapes(user: str) -> list[str]:
    claims = claims_for(user, issuer=ISSUER)
    headers: list[Any] = [{"typ": "JWT"}, [], "HS256", 1, None]
    for name in ("alg", "typ", "kid"):
        for value in ODD_VALUES:
            headers.append({"alg": "ES256", "typ": "JWT", "kid": "key-1", name: value})
    tokens = [_shaped(header, claims) for header in headers]
    tokens += [_shaped({"alg": "ES256", "typ": "JWT"}, not_an_object) for not_an_object in ([], "x", 1, None, True)]
    deep = b64url(b'{"a":' * 5000 + b"1" + b"}" * 5000)  # past Python's recursion limit in json.loads
    tokens += [f"{deep}.{_segment(claims)}.{b64url(b's')}", f"{_segment({'alg': 'ES256'})}.{deep}.{b64url(b's')}"]
    return tokens


async def test_headers_and_claims_of_every_shape_are_malformed_never_a_crash() -> None:
    user = new_id()
    server = AuthServer(user=user)
    for auth in (local_auth(), remote_auth(server)):
        for token in _malformed_shapes(user):
            error = await rejected(auth, f"Bearer {token}", user)
            assert (error.status, error.code) == (401, "MALFORMED_TOKEN"), token
    assert server.calls == []


def _respelled(token: str) -> list[str]:
    """The same token spelled differently: each decodes to the same bytes under a lenient base64 decoder."""
    header, payload, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 32 signature bytes leave 2 unused bits in the last character; a lenient decoder ignores them.
    last = alphabet[alphabet.index(signature[-1]) + 1]
    return [
        f"{token}!!",
        f"{token}==",
        f"{header}=.{payload}.{signature}",
        f"{header}.{payload}==.{signature}",
        f"{header}.{payload}.{signature}=",
        f"{header}.{payload}.{signature[:-1]}{last}",
        f"{header}.{payload}.{signature[:10]}+{signature[11:]}",
        f"{header}.{payload}.{signature[:10]}/{signature[11:]}",
        f"{header}.{payload[:8]}\n{payload[8:]}.{signature}",
        f"{header}.{payload}.{signature}\x00",
        f"{header}.{payload}.{signature}ab",  # 4n+1 characters cannot be base64 at all
    ]


async def test_base64url_is_strict_one_token_one_spelling() -> None:
    user = new_id()
    token = mint(user, issuer=ISSUER)
    assert (await authenticate(local_auth(), f"Bearer {token}", user)).user_id == user
    for variant in _respelled(token):
        error = await rejected(local_auth(), f"Bearer {variant}", user)
        assert (error.status, error.code) == (401, "MALFORMED_TOKEN"), variant


@pytest.mark.parametrize("role", [MISSING, None, ["authenticated"], {"role": "authenticated"}, 1, "anon", ""])
async def test_the_role_claim_is_required_and_must_be_authenticated(role: Any) -> None:
    user = new_id()
    error = await rejected(local_auth(), f"Bearer {mint(user, issuer=ISSUER, role=role)}", user)
    assert (error.status, error.code) == (401, "INVALID_TOKEN")


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat", "aud", "iss", "sub", "role"])
async def test_claim_values_of_every_type_are_a_401_never_a_crash(claim: str) -> None:
    user = new_id()
    server = AuthServer(user=user)
    values: list[Any] = [*ODD_VALUES, "", 10**400, -(10**400), float("inf"), float("nan"), -1, "x" * 1000, 2**63]
    for value in values:
        for auth, token in ((local_auth(), mint(user, issuer=ISSUER, **{claim: value})),
                            (remote_auth(server), es256_token(user, **{claim: value}))):
            try:
                caller = await authenticate(auth, f"Bearer {token}", user)
            except (Unauthorized, Forbidden):
                continue
            # Only a time in the past where a past time is fine may pass; every other odd value is refused.
            past = claim in ("nbf", "iat") and type(value) in (int, float) and -(2**53) <= value <= 2**53
            assert past and caller.user_id == user, (claim, value)


@pytest.mark.parametrize("value", [10**400, float("inf"), float("nan"), "1e999"])
async def test_non_finite_or_huge_times_are_refused(value: Any) -> None:
    user = new_id()
    error = await rejected(remote_auth(AuthServer(user=user)), f"Bearer {es256_token(user, exp=value)}", user)
    assert error.status == 401


def test_a_list_as_alg_over_http_is_a_401(client: TestClient, user_id: str) -> None:
    token = _shaped({"alg": ["HS256"], "typ": "JWT"}, claims_for(user_id))
    response = client.get("/api/conversations", params={"user_id": user_id}, headers=bearer(token))
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "MALFORMED_TOKEN"


async def test_a_throttled_supabase_auth_is_never_retried() -> None:
    user = new_id()
    server = AuthServer([httpx.Response(429, headers={"Retry-After": "7"}, json={"msg": "slow down"})] * 3)
    auth = remote_auth(server)
    with pytest.raises(UpstreamUnavailable) as caught:
        await authenticate(auth, f"Bearer {es256_token(user)}", user)
    assert len(server.calls) == 1
    assert caught.value.retry_after == 7
    await auth.aclose()


async def test_150_forged_tokens_against_a_throttled_auth_cost_at_most_150_calls() -> None:
    user = new_id()
    server = AuthServer([httpx.Response(429)] * 1000)
    auth = remote_auth(server)
    for i in range(150):
        with pytest.raises(UpstreamUnavailable):
            await authenticate(auth, f"Bearer {es256_token(user, session_id=str(i))}", user)
    assert len(server.calls) <= 150
    await auth.aclose()


async def test_refusals_are_remembered_briefly_and_boundedly() -> None:
    user, now = new_id(), [1_000_000.0]
    refusal = httpx.Response(403, json={"code": 403, "error_code": "bad_jwt"})
    server = AuthServer([refusal] * 100)
    auth = remote_auth(server, clock=lambda: now[0], cache_size=2)
    forged = [es256_token(user, session_id=str(i), exp=int(now[0]) + 3600, iat=int(now[0])) for i in range(3)]
    for _ in range(3):
        assert (await rejected(auth, f"Bearer {forged[0]}", user)).code == "INVALID_TOKEN"
    assert len(server.calls) == 1
    now[0] += NEGATIVE_CACHE_SECONDS + 1  # a refusal is not remembered for ever
    await rejected(auth, f"Bearer {forged[0]}", user)
    assert len(server.calls) == 2
    for token in forged[1:]:
        await rejected(auth, f"Bearer {token}", user)
    await rejected(auth, f"Bearer {forged[0]}", user)  # evicted by the two after it: the cache is bounded
    assert len(server.calls) == 5
    await auth.aclose()


class GatedAuthServer(AuthServer):
    """Answers only when the test opens the gate, so concurrent requests overlap."""

    def __init__(self, answers: list[httpx.Response] | None = None, user: str | None = None) -> None:
        super().__init__(answers, user)
        self.gate = anyio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:  # type: ignore[override]
        response = super().__call__(request)
        await self.gate.wait()
        return response


@pytest.mark.parametrize("refused", [False, True])
async def test_concurrent_requests_with_one_token_share_one_call(refused: bool) -> None:
    user = new_id()
    answers = [httpx.Response(403, json={"error_code": "bad_jwt"})] if refused else []
    server = GatedAuthServer(answers, user=user)
    auth = remote_auth(server)
    token = es256_token(user)
    outcomes: list[str] = []

    async def one() -> None:
        try:
            outcomes.append((await authenticate(auth, f"Bearer {token}", user)).user_id)
        except Unauthorized as exc:
            outcomes.append(exc.code)

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(one)
        await anyio.sleep(0.05)
        server.gate.set()
    assert len(server.calls) == 1
    assert outcomes == ["INVALID_TOKEN" if refused else user] * 10
    await auth.aclose()


async def test_a_cancelled_first_request_does_not_strand_the_others() -> None:
    user = new_id()
    server = GatedAuthServer(user=user)
    auth = remote_auth(server)
    token = es256_token(user)
    results: list[str] = []

    async def first() -> None:
        with anyio.move_on_after(0.05):
            await authenticate(auth, f"Bearer {token}", user)

    async def second() -> None:
        await anyio.sleep(0.01)
        results.append((await authenticate(auth, f"Bearer {token}", user)).user_id)

    async with anyio.create_task_group() as group:
        group.start_soon(first)
        group.start_soon(second)
        await anyio.sleep(0.1)
        server.gate.set()
    assert results == [user]
    await auth.aclose()


# -- the worker's calls to Supabase Auth are bounded overall -------------------------------------------------------


async def test_rotating_tokens_cost_at_most_the_windows_budget_of_calls_and_cached_answers_still_work() -> None:
    user, now = new_id(), [999_980.0]  # 20 s into a 60 s window (999_960 = 16_666 * 60)
    server = AuthServer(user=user)
    budget = LookupBudget(per_window=10, window_seconds=60, concurrent=4, wait=1, clock=lambda: now[0])
    auth = remote_auth(server, clock=lambda: now[0], budget=budget)
    good = es256_token(user, exp=int(now[0]) + 3600, iat=int(now[0]))
    await authenticate(auth, f"Bearer {good}", user)  # cached: needs no call later
    server.answers = [httpx.Response(403, json={"error_code": "bad_jwt"})] * 1000
    codes = []
    for i in range(100):
        forged = es256_token(user, session_id=str(i), exp=int(now[0]) + 3600, iat=int(now[0]))
        with pytest.raises((Unauthorized, UpstreamUnavailable)) as caught:
            await authenticate(auth, f"Bearer {forged}", user)
        codes.append((caught.value.code, caught.value.retry_after))
    assert len(server.calls) == 10  # the good token's and 9 forged ones
    assert codes[:9] == [("INVALID_TOKEN", None)] * 9
    assert set(codes[9:]) == {("AUTH_BUSY", 40.0)}  # retryable 503, after the window's end
    assert (await authenticate(auth, f"Bearer {good}", user)).user_id == user  # the cache is not refused
    now[0] += 40  # the next window
    await rejected(auth, f"Bearer {es256_token(user, session_id='next', exp=int(now[0]) + 60, iat=int(now[0]))}", user)
    assert len(server.calls) == 11
    await auth.aclose()


class CountingGatedAuthServer(GatedAuthServer):
    """Also counts the calls it is answering at once."""

    def __init__(self, user: str) -> None:
        super().__init__(user=user)
        self.in_flight = self.most_in_flight = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:  # type: ignore[override]
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await super().__call__(request)
        finally:
            self.in_flight -= 1


async def test_concurrent_lookups_are_capped_and_a_caller_waits_for_a_slot_only_so_long() -> None:
    user = new_id()
    server = CountingGatedAuthServer(user)
    auth = remote_auth(server, budget=LookupBudget(per_window=100, window_seconds=60, concurrent=3, wait=0.5))
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            outcomes.append((await authenticate(auth, f"Bearer {es256_token(user, session_id=str(i))}", user)).user_id)
        except UpstreamUnavailable as exc:
            outcomes.append(exc.code)

    async with anyio.create_task_group() as group:
        for i in range(20):
            group.start_soon(one, i)
        await anyio.sleep(0.8)  # past the wait: those not in a slot by then give up
        server.gate.set()
    assert server.most_in_flight == 3 and len(server.calls) == 3
    assert sorted(outcomes) == sorted([user] * 3 + ["AUTH_BUSY"] * 17)
    await auth.aclose()


@pytest.mark.parametrize(("host", "auth", "warned"), [
    ("0.0.0.0", {}, True), ("192.168.1.5", {}, True), ("::", {}, True),
    ("127.0.0.1", {}, False), ("::1", {}, False), ("localhost", {}, False),
    ("0.0.0.0", {"SUPABASE_JWT_SECRET": TEST_JWT_SECRET}, False),
])
def test_authentication_off_on_a_reachable_address_is_warned_at_startup(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, host: str, auth: dict[str, str], warned: bool
) -> None:
    """Development trusts the user_id a request names: listening beyond this machine, anyone there can act as any
    user. Said once at startup (nothing binds here: the lifespan alone runs)."""
    from app import create_app
    from tests.support import make_settings

    with caplog.at_level("WARNING", logger="canvalo"), TestClient(create_app(make_settings(tmp_path, API_HOST=host,
                                                                                         **auth))):
        pass
    lines = [r.getMessage() for r in caplog.records if "Authentication is off" in r.getMessage()]
    assert len(lines) == (1 if warned else 0), lines
    if warned:
        assert host in lines[0] and "127.0.0.1" in lines[0]
