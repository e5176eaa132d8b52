from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

# The service's modules live at the repository root (app.py, settings.py, services/, web/).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app import create_app  # noqa: E402
from settings import Settings  # noqa: E402
from tests.support import make_settings, new_id  # noqa: E402

AuthHeaders = Callable[[str], dict[str, str]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def service_env() -> dict[str, str]:
    """Extra environment for the service under test: the store and auth backends hook in here."""
    return {}


@pytest.fixture
def auth_headers() -> AuthHeaders:
    """Headers that authenticate as a user; none while auth is off."""
    return lambda user_id: {}


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
