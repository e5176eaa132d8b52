"""Chat runs: a turn's generation lives in a task of its own, apart from any connection, with its events in the store.

``RunManager.begin`` admits and starts a turn in one store call (``Store.begin_run``); the answer is then generated
by ``_drive`` whatever happens to the request that asked for it. Viewers (the POST that started it, a resume after
a reload, a second tab) read the run through a feed: ``LiveFeed`` from this worker's memory while the run generates
here, ``StoredFeed`` from the store otherwise, so a run can be followed from any worker or machine.

What reaches the store, and when (docs/api.md, "Chat runs", gives the figures and what a client sees): one flush
every ``FLUSH_SECONDS`` writes the new events of every run on this worker, the calls they finished (the usage
ledger, ``services/agents/usage.py``) and their controls read back (a stop asked elsewhere, a run gone), in one store
call: never a write per token. A run's end asks for a flush at once, and its terminal chunk reaches viewers only after
that flush, so ``complete`` always points at a saved answer. The answer's text is saved every ``TEXT_SAVE_SECONDS``
and a heartbeat every ``HEARTBEAT_SECONDS`` (three per ``RUN_STALE_SECONDS`` when that is shorter); a run whose
heartbeat is older than ``RUN_STALE_SECONDS`` is ended as ``interrupted`` by whichever worker notices. A store that refuses writes loses nothing a viewer saw: the run stays
here, whole, until a flush goes through (for up to ``UNSAVED_KEEP_SECONDS``). A store that refuses one run's update as
bad input, which it would refuse again, writes the other runs of the flush all the same, and that run stops and ends
as an error (``RUN_NOT_SAVED``) with what the store already holds.

The package: ``manager.py`` (``RunManager``, the package's entry), ``live.py`` (a run generating here), ``feeds.py``
(its viewers), ``turn.py`` (one turn's generation: the assistant's events as chunks), ``prompt.py`` (stored history
as the model's turns) and ``titles.py`` (a new conversation's title). Imported by the composition root (``app.py``)
only; it imports the agents, the model's token estimate, the store and the cross-cutting modules, never the web edge.
"""
