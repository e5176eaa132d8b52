"""The Supabase store: the ``Store`` interface over PostgREST, acting as the signed-in user.

Every call forwards the caller's own access token (``client.py``), so the database knows who is asking. The user reads
their chat rows through the Data API under row-level security (``migrations/001``); every write to them is one of the
checked functions of ``migrations/007_checked_writes.sql``, which name the caller (``auth.uid()``) in every row they
touch. The ``user_id`` filters added to reads here are defence in depth, not the guarantee. The tables are the earlier
service's ``agent_conversations`` and ``agent_messages`` in ``SUPABASE_SCHEMA``, so an existing project keeps its
history.

Semantics match ``SQLiteStore`` exactly:

* a conversation that is missing or someone else's is ``ConversationNotFound`` (RLS hides the
  row, so the two cases look the same from here too);
* ``create_conversation`` with an id already taken, even by someone else, writes nothing and says ``NotFound``;
* messages come oldest first, ties broken by the insertion sequence; lists by ``updated_at`` descending.

Counters and timestamps are kept by the database's trigger. Rows are read back as SQLite's (``rows.py``): timestamps
in the API's one format (``2026-11-24T01:49:20.911133Z``), whatever PostgREST renders.

Business records (``migrations/002_business_tables.sql``) follow ``services/store/sqlite/records.py``: equality filters,
the domain's order then ``id`` (NULLs sorted as SQLite sorts them), a missing or someone else's record is
``RecordNotFound``, inserts are idempotent by their client-generated id, and rows come back with
SQLite's keys, key order and value types (numbers as floats, times as ``HH:MM``, timestamps as above).

Chat runs (``services/store/sqlite/runs.py`` is the reference) are the RPC functions of
``migrations/004_agent_runs.sql`` as 007 checks them, one request and one transaction per store call. They write the
same rows, frames and metadata as SQLite; run times come back as Unix seconds. A run is written only with its write key,
which ``begin_run`` makes and this store keeps until the run ends: a client holding the user's own token cannot write
the service's runs. Two differences follow from acting only as users: ``flush_runs`` writes one transaction per user
(each with that user's token), and ``maintain_runs`` without a caller does nothing, so a dead run is ended when its user
next touches it.

Pending actions (``services/agents/actions.py``) are the RPC functions of ``migrations/010_confirm_every_change.sql``:
confirming claims the action, checks that the record still holds the action's ``before`` and runs its change in one
transaction, on the caller's record only. The result is decoded as ``update_record``'s is.

Rate limits (``services/ratelimit.py``) are the RPC function of ``migrations/003_rate_limits.sql``, called as the user
so they count against ``auth.uid()``; ``agent_run_begin`` counts a chat turn through the same function.

The package: ``store.py`` (``PostgrestStore``), ``client.py`` (the requests: errors, retries, the pooled
connections), ``params.py`` (their filters) and ``rows.py`` (the answers read back as the store's records). Imported
by ``services/store/build.py`` (and the tests); the modules here import only ``services.store`` and what is below it.
"""
