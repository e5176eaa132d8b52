"""uvicorn's HTTP protocol, with ``TCP_NODELAY`` on every connection and bounds on what one connection can hold.

Nagle's algorithm. asyncio turns it off only for sockets whose ``proto`` is ``IPPROTO_TCP``. When uvicorn binds the
listening socket itself for several workers (``--workers``, ``WEB_CONCURRENCY``) it creates it with ``proto`` 0, so
the connections it accepts keep Nagle on. A response is written in two segments (headers, then body), Nagle holds the
second until the first is acknowledged, and the client delays that acknowledgement by up to 40 ms: every keep-alive
response (nginx keeps upstream connections alive) and every stream's first token then waits about 40 ms. Measured
here: 43 ms per keep-alive request with Nagle on, under 1 ms with it off.

Request heads. uvicorn times a connection out only while it is idle after a response (``--timeout-keep-alive``): a
connection that never sends a request, or trickles its head a byte at a time, is held for ever, and enough of them
fill ``--limit-concurrency`` (``MAX_CONNECTIONS``), after which every request, ``/health`` included, is a 503. So a
connection must complete each request head within ``HEADER_READ_TIMEOUT``, counted as nginx counts its
``client_header_timeout``: from the accept for the first request, from the first byte of the head for a later one
(between requests the keep-alive timeout applies). It is closed otherwise. A body is bounded by the app
(``BODY_READ_TIMEOUT``).

Connections per address. One client address may hold at most ``MAX_CONNECTIONS_PER_ADDRESS`` connections to a
worker; one more is closed as soon as it is accepted, before it costs anything. Addresses uvicorn trusts to forward
for others (``FORWARDED_ALLOW_IPS``: nginx, a load balancer) are exempt, as they carry many clients; the proxy then
limits per client address itself (``deploy/nginx``).

The bounds come from the app's lifespan state (``ConnectionGuard`` under ``connections``), which uvicorn hands every
connection, so ``uvicorn app:app`` and ``python app.py`` read the same settings. Run uvicorn with
``--http web.tcp:NoDelayH11Protocol`` (the Dockerfile does; ``python app.py`` uses it too): uvicorn's own protocols
have neither bound. The service ships no other HTTP protocol (no httptools), so this one covers every way it runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from uvicorn.middleware.proxy_headers import _TrustedHosts
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.model.stream_client import set_nodelay
from settings import Settings

logger = logging.getLogger("canvalo.connections")

# Closed connections are logged at most this often, with how many there were: a client retrying in a loop (or a proxy
# missing from FORWARDED_ALLOW_IPS, whose clients all share its address) would otherwise write a line per attempt.
REFUSAL_LOG_SECONDS = 60.0


class ConnectionGuard:
    """One worker's bounds on connections: ``head_timeout`` seconds to send a request head, and at most
    ``per_address`` connections held by one client address (0: no cap)."""

    def __init__(self, head_timeout: float, per_address: int) -> None:
        self.head_timeout = head_timeout
        self._per_address = per_address
        self._held: dict[str, int] = {}
        self._refused = 0  # connections closed since the last log line
        self._logged_at = -REFUSAL_LOG_SECONDS

    def admit(self, address: str) -> bool:
        """Count one more connection of ``address``, unless it already holds its share."""
        held = self._held.get(address, 0)
        if self._per_address and held >= self._per_address:
            self._note_refusal(address)
            return False
        self._held[address] = held + 1
        return True

    def _note_refusal(self, address: str) -> None:
        """Log the closed connections, at most once per ``REFUSAL_LOG_SECONDS``, so an operator sees them happen."""
        self._refused += 1
        now = time.monotonic()
        if now - self._logged_at < REFUSAL_LOG_SECONDS:
            return
        logger.warning(
            "Closed %d connection(s) over MAX_CONNECTIONS_PER_ADDRESS=%d since the last such line, the latest from %s "
            "(a proxy missing from FORWARDED_ALLOW_IPS counts as one address for all its clients)",
            self._refused, self._per_address, address,
        )
        self._refused, self._logged_at = 0, now

    def release(self, address: str) -> None:
        held = self._held.pop(address) - 1
        if held:
            self._held[address] = held


class NoDelayH11Protocol(H11Protocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # An app without the service's lifespan (a test's bare app) still gets the head timeout, with no cap.
        self._guard: ConnectionGuard = self.app_state.get("connections") or ConnectionGuard(
            Settings.header_read_timeout, 0
        )
        self._counted: str | None = None  # the address this connection is counted against
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        set_nodelay(transport.get_extra_info("socket"))
        super().connection_made(transport)  # type: ignore[arg-type]
        address = self.client[0] if self.client else None
        if address is not None and address not in _trusted(_spelled(self.config.forwarded_allow_ips)):
            if not self._guard.admit(address):
                transport.close()  # no response: the client has sent nothing to answer yet
                return
            self._counted = address
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._between_requests():
            self._await_head()  # the first byte of a later request's head
        super().data_received(data)
        if not self._between_requests():
            self._stop_head_timer()  # the head is complete: the app bounds the body, the response is ours

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._counted is not None:
            self._guard.release(self._counted)
            self._counted = None
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _await_head(self) -> None:
        self._head_timer = self.loop.call_later(self._guard.head_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._between_requests() and not self.transport.is_closing():
            self.transport.close()  # as nginx does on client_header_timeout: nothing is owed to half a request


def _spelled(forwarded_allow_ips: list[str] | str) -> str:
    return forwarded_allow_ips if isinstance(forwarded_allow_ips, str) else ",".join(forwarded_allow_ips)


@functools.lru_cache(maxsize=8)
def _trusted(forwarded_allow_ips: str) -> _TrustedHosts:
    """The addresses uvicorn trusts to forward for others, parsed once (uvicorn's own parser, so both agree)."""
    return _TrustedHosts(forwarded_allow_ips)
