"""Sample business data for one user, so the assistant has something real to answer from.

    python -m services.store.sample_data USER_ID

loads a few records into every domain's table of the configured store (``SQLITE_PATH`` on the embedded default;
with ``STORE=supabase`` set ``ACCESS_TOKEN`` to that user's JWT, since rows are written as the user). Running it twice
adds nothing: record ids are derived from the user id, so inserts are idempotent. The playground's Load sample data
(``POST /api/dev/sample-data``, development only; ``web/pages.py``) calls ``load`` too.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from datetime import date, timedelta
from typing import Any

from errors import NotFound
from services.domains import BY_AGENT
from services.store import Caller, Store
from services.store.build import build_store
from settings import Settings

_TODAY = date.today()


def _day(offset: int) -> str:
    return (_TODAY + timedelta(days=offset)).isoformat()


SAMPLE: dict[str, list[dict[str, Any]]] = {
    "invoices": [
        {"invoice_number": "INV-1041", "client_name": "Maria Lopez", "due_date": _day(-20), "total_amount": 1850.0,
         "amount_paid": 1850.0, "status": "paid", "paid_date": _day(-22)},
        {"invoice_number": "INV-1042", "client_name": "Oakridge HOA", "due_date": _day(-5), "total_amount": 4200.0,
         "status": "overdue"},
        {"invoice_number": "INV-1043", "client_name": "Ben Carter", "due_date": _day(14), "total_amount": 960.5,
         "status": "sent"},
    ],
    "appointments": [
        {"client_name": "Ben Carter", "title": "Exterior estimate", "scheduled_date": _day(2),
         "scheduled_time": "09:30", "location": "12 Elm St"},
        {"client_name": "Maria Lopez", "title": "Touch-up walkthrough", "scheduled_date": _day(6),
         "scheduled_time": "14:00", "status": "confirmed"},
    ],
    "projects": [
        {"name": "Oakridge clubhouse repaint", "client_name": "Oakridge HOA", "budget": 12500.0,
         "start_date": _day(-10), "status": "in_progress"},
        {"name": "Carter kitchen cabinets", "client_name": "Ben Carter", "budget": 2400.0, "status": "planning"},
    ],
    "proposals": [
        {"title": "Deck staining", "client_name": "Priya Shah", "total_amount": 1750.0, "status": "sent",
         "valid_until": _day(21)},
    ],
    "contacts": [
        {"name": "Maria Lopez", "email": "maria@example.com", "phone": "555-0101", "contact_type": "client"},
        {"name": "Oakridge HOA", "email": "board@oakridge.example", "contact_type": "client"},
        {"name": "Summit Paint Supply", "phone": "555-0199", "contact_type": "supplier"},
    ],
    "reviews": [
        {"reviewer_name": "Maria Lopez", "rating": 5, "comment": "Clean, fast and friendly.", "source": "Google",
         "status": "published"},
    ],
    "campaigns": [
        {"name": "Spring exterior special", "campaign_type": "email", "status": "scheduled", "start_date": _day(10)},
    ],
    "tasks": [
        {"title": "Order primer for Oakridge", "priority": "high", "due_date": _day(1)},
        {"title": "Send Carter the cabinet colour samples", "due_date": _day(3)},
    ],
    "settings": [
        {"title": "Reach $150k revenue this year", "goal_type": "revenue", "target_value": 150000.0,
         "current_value": 61200.0, "progress": 41, "target_date": f"{_TODAY.year}-12-31", "status": "in_progress"},
    ],
}


async def load(store: Store, caller: Caller) -> tuple[int, int]:
    """Insert the sample records ``caller`` does not have yet; (how many were written, how many were already there,
    kept as they are). Ids derive from the user, so a second run finds the first run's records."""
    written = existing = 0
    for agent_type, rows in SAMPLE.items():
        domain = BY_AGENT[agent_type]
        for index, row in enumerate(rows):
            record_id = str(uuid.uuid5(uuid.UUID(caller.user_id), f"{domain.table}-{index}"))
            try:
                await store.get_record(caller, domain, record_id)
            except NotFound:
                defaults = {c.name: c.default for c in domain.columns if c.default is not None}
                await store.insert_record(caller, domain, {**defaults, **row, "id": record_id})
                written += 1
            else:
                existing += 1
    return written, existing


async def _main(user_id: str) -> None:
    settings = Settings.from_environ(os.environ)
    store = build_store(settings)
    await store.open()
    try:
        caller = Caller(user_id=user_id, access_token=os.environ.get("ACCESS_TOKEN") or None)
        written, existing = await load(store, caller)
    finally:
        await store.aclose()
    kept = f" ({existing} were already there)" if existing else ""
    print(f"Loaded {written} new sample records for user {user_id} into the {store.kind} store{kept}.")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m services.store.sample_data USER_ID")
    try:
        user = str(uuid.UUID(sys.argv[1]))
    except ValueError:
        sys.exit("USER_ID must be a UUID")
    asyncio.run(_main(user))
