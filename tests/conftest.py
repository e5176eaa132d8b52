"""Shared fixtures. The API suites run once per store: ``sqlite`` and ``supabase`` (the fake PostgREST over a real
PostgreSQL with the real migration and real row-level security), both with authentication on (HS256 tokens).

``service_env`` is the extra environment of the service under test and ``auth_headers(user_id)`` the headers that
authenticate as ``user_id``; API tests only use those, so they run unchanged on every variant.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

# The service's modules live at the repository root (app.py, settings.py, services/, web/).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app import create_app  # noqa: E402
from services.store import Caller  # noqa: E402
from settings import Settings  # noqa: E402
from tests.pg import RUN_SECRET  # noqa: E402
from tests.support import LiveServer, make_settings, new_id, serve  # noqa: E402
from tests.tokens import TEST_JWT_SECRET, TEST_PUBLISHABLE_KEY, bearer, mint  # noqa: E402

AuthHeaders = Callable[[str], dict[str, str]]

STORES = ("sqlite", "supabase")
DATABASE = "canvalo_test"

# Suites that exercise store methods the Supabase store does not have yet run on SQLite only, by name here rather
# than by a silent skip (module name -> reason). Empty: every store method now exists on both stores. A module can
# also choose its stores itself with a module-level ``STORES = ("sqlite",)``.
SUPABASE_PENDING: dict[str, str] = {}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- PostgreSQL and the fake PostgREST (session-wide; started only when a test needs them) --------------------------


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    from tests.pg import create_supabase_database, start_cluster

    with start_cluster() as cluster:
        create_supabase_database(cluster, DATABASE)
        yield cluster


@pytest.fixture(scope="session")
def postgrest_server(pg_cluster: Any) -> Iterator[tuple[Any, LiveServer]]:
    from tests.fake_postgrest import FakePostgrest

    fake = FakePostgrest(pg_cluster, DATABASE, jwt_secret=TEST_JWT_SECRET, publishable_key=TEST_PUBLISHABLE_KEY)
    with serve(fake.app()) as live:
        yield fake, live


@pytest.fixture
def fake_postgrest(postgrest_server: tuple[Any, LiveServer]) -> Iterator[Any]:
    """The fake, with its request log and fault queue cleared around each test."""
    fake, _ = postgrest_server
    fake.reset()
    yield fake
    fake.reset()


@pytest.fixture
def supabase_url(postgrest_server: tuple[Any, LiveServer]) -> str:
    return postgrest_server[1].url


@pytest.fixture(scope="session")
def register_user(pg_cluster: Any) -> Callable[[str], None]:
    """Create ``auth.users`` rows (Supabase Auth's job) so conversations can reference their owner."""
    seen: set[str] = set()

    def register(user_id: str) -> None:
        try:
            canonical = str(uuid.UUID(user_id))
        except ValueError:
            return  # tests send malformed ids on purpose; the service rejects them before any database call
        if canonical not in seen:
            with pg_cluster.connect(DATABASE) as db:
                db.execute("insert into auth.users (id) values (%s) on conflict do nothing", (canonical,))
            seen.add(canonical)

    return register


# -- either store, for store-level tests (the ``store``/``new_caller`` a module does not define itself) ------------


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Any]:
    """A store of each kind, opened: SQLite in a fresh file, or Supabase through the fake PostgREST."""
    from services.store.postgrest.store import PostgrestStore
    from services.store.postgrest.client import PostgrestClient
    from services.retry import RetryPolicy
    from services.store.sqlite.store import SQLiteStore

    made: Any
    if request.param == "sqlite":
        made = SQLiteStore(str(tmp_path / "store.db"))
    else:
        request.getfixturevalue("fake_postgrest")
        url = request.getfixturevalue("supabase_url")
        retry = RetryPolicy(attempts=3, base_delay=0, max_delay=0, max_total=5)
        made = PostgrestStore(PostgrestClient(url, "api", TEST_PUBLISHABLE_KEY, retry=retry, timeout=10), RUN_SECRET)
    await made.open()
    yield made
    await made.aclose()


@pytest.fixture
def new_caller(store: Any, request: pytest.FixtureRequest) -> Callable[[], Caller]:
    """A fresh user; on Supabase registered in auth.users and carrying their own access token."""
    register = request.getfixturevalue("register_user") if store.kind == "supabase" else None

    def make() -> Caller:
        user = new_id()
        if register is None:
            return Caller(user)
        register(user)
        return Caller(user, mint(user))

    return make


# -- the service under test ------------------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs PostgreSQL ``system`` (README: ``-m "not system"`` leaves them out): those using the
    cluster, and every Supabase variant of a test run once per store (its fixtures start the cluster on demand)."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "pg_cluster" in getattr(item, "fixturenames", ()) or "supabase" in params.values():
            item.add_marker(pytest.mark.system)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that uses the service (through ``service_env``) once per store."""
    if "store_kind" not in metafunc.fixturenames:
        return
    stores = getattr(metafunc.module, "STORES", STORES)
    if metafunc.module.__name__.rsplit(".", 1)[-1] in SUPABASE_PENDING:
        stores = tuple(s for s in stores if s != "supabase")
    metafunc.parametrize("store_kind", stores, indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def service_env(store_kind: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """Extra environment for the service under test: the store and auth backends hook in here."""
    if store_kind == "sqlite":
        return {"SUPABASE_JWT_SECRET": TEST_JWT_SECRET}
    request.getfixturevalue("fake_postgrest")
    return {
        "STORE": "supabase",
        "SUPABASE_URL": request.getfixturevalue("supabase_url"),
        "SUPABASE_PUBLISHABLE_KEY": TEST_PUBLISHABLE_KEY,
        "SUPABASE_JWT_SECRET": TEST_JWT_SECRET,
        "SUPABASE_RUN_SECRET": RUN_SECRET,
        # Fast retries: the fake injects transient failures in some tests.
        "RETRY_BASE_DELAY": "0.01",
        "RETRY_MAX_DELAY": "0.05",
    }


@pytest.fixture
def auth_headers(service_env: dict[str, str], request: pytest.FixtureRequest) -> AuthHeaders:
    """Headers that authenticate as a user: a fresh HS256 access token whenever auth is on; none while it is off."""
    if not service_env.get("SUPABASE_JWT_SECRET"):
        return lambda user_id: {}
    url = service_env.get("SUPABASE_URL")
    issuer = f"{url.rstrip('/')}/auth/v1" if url else None
    register = request.getfixturevalue("register_user") if service_env.get("STORE") == "supabase" else None

    def headers(user_id: str) -> dict[str, str]:
        if register is not None:
            register(user_id)
        return bearer(mint(user_id, service_env["SUPABASE_JWT_SECRET"], issuer=issuer))

    return headers


@pytest.fixture
def settings(tmp_path: Any, service_env: dict[str, str]) -> Settings:
    return make_settings(tmp_path, **service_env)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def user_id() -> str:
    return new_id()
