"""Who is calling, counted: the per-request helpers every ``/api`` route uses before it calls a service.

A route names the user it acts for (``user_id``); ``caller_of`` checks that against the bearer token (verified once
per request, ``services/auth.py``) and counts the request against that user's API rate limit. Whatever fails before
a trustworthy user is known (a bad token, a valid token naming someone else) is counted against the client address
instead, so guessing credentials is limited too. A JSON body is read only once the token is known to be good.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from errors import AppError
from services.auth.authenticator import claimed_caller
from services.limits.rates import RateLimiter
from services.store import Caller
from web.inputs import json_body


async def caller_of(request: Request, claimed_user_id: str, *, counted: bool = True) -> Caller:
    """Who is calling, counted against their API rate limit unless ``counted`` is False (chat turns are counted by
    ``Store.begin_run``)."""
    verified = await verified_user(request)
    try:
        caller = claimed_caller(verified, claimed_user_id)
    except AppError:
        await request.state.limiter.admit_unauthenticated(address(request))  # a valid token naming someone else
        raise
    request.state.authenticated = True
    if counted:
        await request.state.limiter.admit(caller)
    return caller


async def verified_user(request: Request) -> Caller | None:
    """The bearer token's user (None with authentication off), checked once per request and before any body is
    read, so a client without a valid token cannot make the service read, and hold, a large or slow body."""
    state = request.state
    if "verified" not in request.scope["state"]:  # not hasattr(state, ...): a miss there raises, and costs
        limiter: RateLimiter = state.limiter
        client = address(request)
        try:
            # An address refused too often is stopped in process before Supabase Auth is asked (a token checked
            # locally or from the cache is not stopped: a genuine user keeps their own allowance).
            state.verified = await state.auth.verify(
                request.headers.get("authorization"), lambda: limiter.check_address(client)
            )
        except AppError:
            # No trustworthy user to count against (a bad token, or Supabase Auth could not say): count the client
            # address, so guessing credentials is limited too.
            await limiter.admit_unauthenticated(client)
            raise
    verified: Caller | None = state.verified
    return verified


async def read_body(request: Request) -> dict[str, Any]:
    """The JSON body, read only once the token is known to be good (see ``verified_user``) and within
    ``BODY_READ_TIMEOUT``."""
    await verified_user(request)
    return await json_body(request, request.state.settings.body_read_timeout)


def address(request: Request) -> str:
    return request.client.host if request.client else "unknown"
