"""Minting Supabase-shaped access tokens for tests (HS256 with the standard library, or unsigned/forged variants)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

TEST_JWT_SECRET = "test-jwt-secret-with-at-least-32-characters"
TEST_PUBLISHABLE_KEY = "sb_publishable_test_key"
MISSING = object()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def claims_for(user_id: str, *, issuer: str | None = None, lifetime: int = 3600, **changes: Any) -> dict[str, Any]:
    """The claims Supabase Auth puts in an access token; ``changes`` override or (with ``MISSING``) remove them."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": "authenticated",
        "exp": now + lifetime,
        "iat": now,
        "sub": user_id,
        "role": "authenticated",
        "session_id": "00000000-0000-4000-8000-000000000000",
        "is_anonymous": False,
    }
    if issuer is not None:
        claims["iss"] = issuer
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not MISSING}


def encode(claims: dict[str, Any], secret: str = TEST_JWT_SECRET, *, alg: str = "HS256") -> str:
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    if alg == "none":
        return f"{header}.{payload}."
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def mint(user_id: str, secret: str = TEST_JWT_SECRET, *, issuer: str | None = None, **changes: Any) -> str:
    return encode(claims_for(user_id, issuer=issuer, **changes), secret)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
