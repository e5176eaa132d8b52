"""The configured store, built from settings: the one place that knows which backend ``STORE`` names.

Imported by the composition root (``app.py``) and by the command-line tools that open the store themselves
(``services/store/sample_data.py``); never by a backend, which would import every other backend with it.
"""

from __future__ import annotations

import os

from services.retry import RetryPolicy
from services.store import Store
from services.store.postgrest.client import PostgrestClient
from services.store.postgrest.store import PostgrestStore
from services.store.sqlite.store import SQLiteStore
from settings import Settings


def build_store(settings: Settings) -> Store:
    if settings.store == "supabase":
        client = PostgrestClient(
            settings.supabase_url,
            settings.supabase_schema,
            settings.publishable_key,
            retry=RetryPolicy.from_settings(settings),
            timeout=settings.supabase_timeout,
            pool_size=settings.supabase_pool_size,
            pool_timeout=settings.supabase_pool_timeout,
        )
        return PostgrestStore(client, str(settings.supabase_run_secret))
    return SQLiteStore(settings.sqlite_path)


def store_location(settings: Settings) -> str:
    """Where the data lives, for the startup log: a relative SQLITE_PATH depends on the directory the service was
    started from, and a new empty database there is otherwise a silent surprise."""
    if settings.store == "supabase":
        return settings.supabase_url
    return f"database {os.path.abspath(settings.sqlite_path)}"
