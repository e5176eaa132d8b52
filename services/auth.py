"""Who is calling: turns a request's credentials and claimed ``user_id`` into a ``Caller``.

Without authentication configured (development only; production refuses to start), the claimed ``user_id`` is
trusted, and every store call is still scoped to it.
"""

from __future__ import annotations

from typing import Protocol

from services.store import Caller


class Authenticator(Protocol):
    mode: str

    async def authenticate(self, authorization: str | None, claimed_user_id: str) -> Caller:
        """Return the caller, or raise ``Unauthorized``/``Forbidden``."""
        ...

    async def aclose(self) -> None:
        ...


class TrustClaimedUser:
    """Development without auth: the request's ``user_id`` is taken at its word."""

    mode = "none"

    async def authenticate(self, authorization: str | None, claimed_user_id: str) -> Caller:
        return Caller(user_id=claimed_user_id)

    async def aclose(self) -> None:
        return None
