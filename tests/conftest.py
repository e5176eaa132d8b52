from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

# The service's modules live at the repository root (app.py, settings.py, services/, web/).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app import create_app  # noqa: E402
from settings import Settings  # noqa: E402
from tests.support import make_settings, new_id  # noqa: E402


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Any) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def user_id() -> str:
    return new_id()
