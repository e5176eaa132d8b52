"""The connections of services/http_pool.py, counted: a client of one connection is taken by each exchange under way,
and given back when it ends, whatever happened to the caller waiting for it. (Over real HTTP, with a hanging and
a resetting upstream: tests/test_postgrest_pool.py.)"""

from __future__ import annotations

import asyncio

import anyio
import httpx
import pytest

from services.http_pool import ONE_CONNECTION, Connections, PoolBusy

pytestmark = pytest.mark.anyio


def pool(size: int, wait: float) -> Connections:
    return Connections(size, wait, httpx.AsyncClient)


async def test_a_cancelled_caller_stops_waiting_while_its_exchange_ends_and_gives_the_slot_back() -> None:
    slots, answer = pool(1, wait=5), asyncio.Event()
    ended: list[str] = []

    async def exchange(_: httpx.AsyncClient) -> str:
        await answer.wait()
        ended.append("answered")
        return "response"

    with anyio.move_on_after(0.05):  # the caller's deadline, or its client leaving
        await slots.run(exchange)
    assert slots.in_use == 1 and not ended  # the exchange is not cancelled: it holds its slot until it ends
    answer.set()
    assert await slots.run(lambda _: asyncio.sleep(0, "next")) == "next"
    assert ended == ["answered"] and slots.in_use == 0


async def test_no_free_slot_within_the_wait_is_pool_busy_and_takes_nothing() -> None:
    slots, release = pool(1, wait=0.05), asyncio.Event()
    holder = asyncio.ensure_future(slots.run(lambda _: release.wait()))
    await asyncio.sleep(0)
    with pytest.raises(PoolBusy):
        await slots.run(lambda _: asyncio.sleep(0))
    waiter = asyncio.ensure_future(slots.run(lambda _: asyncio.sleep(0)))
    await asyncio.sleep(0)
    waiter.cancel()  # cancelled while waiting for a slot
    release.set()
    await holder
    assert slots.in_use == 0
    assert await slots.run(lambda _: asyncio.sleep(0, "served")) == "served"  # neither waiter kept the slot


async def test_failures_reach_the_caller_and_give_the_slot_back() -> None:
    slots = pool(1, wait=0.05)

    async def broken(_: httpx.AsyncClient) -> None:
        raise ConnectionResetError

    for _ in range(3):
        with pytest.raises(ConnectionResetError):
            await slots.run(broken)
    assert slots.in_use == 0


async def test_closing_cancels_the_exchanges_nobody_waits_for() -> None:
    slots = pool(2, wait=0.05)
    for _ in range(2):
        with anyio.move_on_after(0.01):
            await slots.run(lambda _: asyncio.sleep(60))
    assert slots.in_use == 2
    await slots.aclose()
    assert slots.in_use == 0


def test_each_client_keeps_its_one_connection_alive() -> None:
    assert ONE_CONNECTION.max_connections == ONE_CONNECTION.max_keepalive_connections == 1


async def test_connections_hand_out_one_client_each_and_take_it_back_whatever_the_caller_does() -> None:
    """A client of its own per exchange, the last one back first out
    (so one caller at a time keeps reusing one connection)."""
    made: list[httpx.AsyncClient] = []

    def make() -> httpx.AsyncClient:
        made.append(httpx.AsyncClient())
        return made[-1]

    connections, answer = Connections(2, wait=0.05, make=make), asyncio.Event()
    used: list[httpx.AsyncClient] = []

    async def exchange(client: httpx.AsyncClient) -> str:
        used.append(client)
        await answer.wait()
        return "response"

    with anyio.move_on_after(0.05):  # the caller leaves; its exchange keeps its client until it ends
        await connections.run(exchange)
    held = asyncio.ensure_future(connections.run(exchange))
    await asyncio.sleep(0.01)
    assert connections.in_use == 2 and used[0] is not used[1]
    with pytest.raises(PoolBusy):
        await connections.run(exchange)
    answer.set()
    assert await held == "response"
    for _ in range(3):  # one at a time: always the client that came back last
        await connections.run(lambda client: asyncio.sleep(0, used.append(client)))
    assert used[2] is used[3] is used[4] and connections.in_use == 0
    await connections.aclose()
    assert all(client.is_closed for client in made)
