"""The Supabase store: the ``Store`` interface over PostgREST, acting as the signed-in user.

Every call forwards the caller's own access token (``client.py``), so the database knows who is asking: the user
reads their chat rows through the Data API under row-level security (``migrations/001``), and every write to them is
one of the checked functions of ``migrations/007_checked_writes.sql``, which name the caller (``auth.uid()``) in every
row they touch. The ``user_id`` filters added to reads here are defence in depth, not the guarantee. The tables are the
earlier service's ``agent_conversations`` and ``agent_messages`` in ``SUPABASE_SCHEMA``, so a project keeps its history.

Semantics match ``SQLiteStore`` exactly, as the ``Store`` contract says: row-level security hides someone else's row,
so it is missing from here too. The database's trigger keeps counters and timestamps. Rows, business records included
(``migrations/002_business_tables.sql``), are read back as SQLite's (``rows.py``).

Chat runs (``services/store/sqlite/runs.py`` is the reference) are the RPC functions of
``migrations/004_agent_runs.sql`` as 007 checks them, one request and one transaction per store call, writing the same
rows, frames and metadata as SQLite. A run is written only with its write key, which ``begin_run`` makes and this
store keeps until the run's end is answered: a client holding the user's own token cannot write the service's runs,
and ``flush_runs`` sends every user's runs by their keys alone (``migrations/009_keyed_flush.sql``). The database
registers a key only when the begin shows the run secret every worker holds (``SUPABASE_RUN_SECRET``,
``migrations/017_service_runs.sql``), so a user calling ``agent_run_begin`` directly gets no run at all. Acting only as users,
``maintain_runs`` without a caller does nothing: a dead run is ended when its user next touches it.

Pending actions are the RPC functions of ``migrations/010_confirm_every_change.sql``; rate limits, that of
``migrations/003_rate_limits.sql``, called as the user so they count against ``auth.uid()`` (``agent_run_begin``
counts a chat turn through it too). The usage ledger (``migrations/013_usage_ledger.sql``) rides ``agent_runs_flush``,
``agent_run_begin`` checks the budgets it is given, and ``agent_usage_report`` reads the caller's usage back.

The package: ``store.py`` (``PostgrestStore``), ``client.py`` (the requests: errors, retries, the pooled connections),
``params.py`` (their filters) and ``rows.py`` (the answers read back as the store's records, and the RPCs' arguments).
Imported by ``services/store/build.py`` (and the tests); the modules here import only ``services.store`` and what is
below it.
"""
