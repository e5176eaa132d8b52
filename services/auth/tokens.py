"""Bearer tokens, read and checked the same way whoever verifies their signature: the strict parse, the claim
checks, the HS256 signature, and the errors every failure is (see ``authenticator.py`` for the whole rule).

For the ``auth`` package only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

from errors import Forbidden, Unauthorized
from services.store import is_canonical_uuid

LEEWAY_SECONDS = 30  # PostgREST's own clock-skew allowance; the most the issue allows
AUDIENCE = "authenticated"
MAX_TIME = 2**53  # a NumericDate past this is no real time (and float() of a huge int raises OverflowError)

_B64URL = re.compile(r"[A-Za-z0-9_-]*")  # fullmatch only


# -- errors --------------------------------------------------------------------------------------------------------


def missing_token() -> Unauthorized:
    return Unauthorized("An Authorization: Bearer token is required.", code="MISSING_TOKEN",
                        user_message="Authentication required. Please log in.")


def malformed_token() -> Unauthorized:
    return Unauthorized("The Authorization header is not a well-formed Bearer JWT.", code="MALFORMED_TOKEN",
                        user_message="Invalid authentication format. Please log in again.")


def invalid_token() -> Unauthorized:
    return Unauthorized("The access token is not valid.", code="INVALID_TOKEN")


def expired_token() -> Unauthorized:
    return Unauthorized("The access token has expired.", code="EXPIRED_TOKEN",
                        user_message="Your session has expired. Please log in again.")


def user_id_mismatch() -> Forbidden:
    return Forbidden("user_id does not match the access token.", code="USER_ID_MISMATCH",
                     user_message="You are not authorized to access this user's data.")


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
        header = _json_object(b64url(parts[0]))
        claims = _json_object(b64url(parts[1]))
        signature = b64url(parts[2])
    except (ValueError, binascii.Error, RecursionError):  # RecursionError: JSON nested past Python's limit
        raise malformed_token() from None
    if not isinstance(header.get("alg"), str) or any(
        name in header and not isinstance(header[name], str) for name in ("typ", "kid")
    ):
        raise malformed_token()  # only strings reach the set lookups after this: a list or object is unhashable
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


def b64url(part: str) -> bytes:
    """Unpadded base64url, strictly (a token's parts, a signing key's numbers): Python's decoder skips stray
    characters and ignores padding and unused bits."""
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
    """A JSON NumericDate we can compute with. The range check also refuses NaN (every comparison is false) and the
    infinity JSON's ``1e999`` decodes to."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -MAX_TIME <= value <= MAX_TIME


class HS256Verifier:
    """The legacy shared secret: HMAC-SHA256 with the standard library, compared in constant time."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode("utf-8")

    def verify(self, token: Token) -> None:
        expected = hmac.new(self._key, token.signing_input, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, token.signature):
            raise invalid_token()
