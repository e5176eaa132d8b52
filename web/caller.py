"""Who is calling, counted: the per-request helpers every ``/api`` route uses before it calls a service.

A route names the user it acts for (``user_id``); ``caller_of`` checks that against the bearer token (verified once
per request, ``services/auth.py``) and counts the request against that user's API rate limit before any other input
is checked, so a request counts whatever its outcome and a caller over the limit gets the 429, not a 4xx about their
input. A request that fails before that (a body that cannot be read, a ``user_id`` missing, malformed or someone
else's) counts against the token's user, or, without one (a bad token; with authentication off, a body naming no
valid user), against the client address, so guessing credentials and sending garbage are limited too. A JSON body is
read only once the token is known to be good.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from errors import AppError
from services.auth.authenticator import claimed_caller
from services.limits.rates import RateLimiter
from services.store import Caller
from web.fields import Given
from web.inputs import json_body


async def caller_of(request: Request, given: Given, *, counted: bool = True) -> Caller:
    """Who is calling (``given``'s ``user_id``, the first input read), counted against their API rate limit unless
    ``counted`` is False: a chat send is counted by ``Store.begin_run`` when it starts a turn, and by the route when
    it starts none."""
    verified = await verified_user(request)
    try:
        caller = claimed_caller(verified, given["user_id"])
    except AppError:
        await count_failed(request)
        raise
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
    ``BODY_READ_TIMEOUT``; a body that cannot be read is counted as ``count_failed`` says."""
    await verified_user(request)
    try:
        return await json_body(request, request.state.settings.body_read_timeout)
    except AppError:
        await count_failed(request)
        raise


async def count_failed(request: Request) -> None:
    """Count a request that failed before its caller was known, against the token's user or, with none, the client
    address; over the limit this raises the 429 instead of the failure."""
    verified: Caller | None = request.state.verified  # set by verified_user, which every path here calls first
    limiter: RateLimiter = request.state.limiter
    if verified is not None:
        await limiter.admit(verified)
    else:
        await limiter.admit_unauthenticated(address(request))


def address(request: Request) -> str:
    return request.client.host if request.client else "unknown"
