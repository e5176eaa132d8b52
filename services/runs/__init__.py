"""Chat runs: a turn's generation lives in a task of its own, apart from any connection, with its events in the store.

``RunManager.begin`` admits and starts a turn in one store call (``Store.begin_run``); the answer is then generated
by ``_drive`` whatever happens to the request that asked for it. Viewers (the POST that started it, a resume after
a reload, a second tab) read the run through a feed: ``LiveFeed`` from this worker's memory while the run generates
here, ``StoredFeed`` from the store otherwise, so a run can be followed from any worker or machine.

What reaches the store, and when:

- One flush every ``FLUSH_SECONDS`` writes the new event frames of every run on this worker in one store call, one
  transaction (on PostgREST, up to 500 runs of any users a call, each under its run's write key): never a write per
  token. A run's end asks for a flush at once (at most one every ``FLUSH_GAP_SECONDS``, carrying every end since),
  and its terminal chunk reaches viewers only after that flush, so ``complete`` always points at a saved answer.
- Each model call the turn finished (or cut short, estimated) goes to the usage ledger with the next flush, in the
  same transaction as the events (``services/agents/usage.py``): no request of its own, and written once per (run,
  call index) however often a flush is sent again.
- The answer's text is saved in its message every ``TEXT_SAVE_SECONDS`` (the message shows ``status: streaming``,
  the ``run_id`` and ``seq``, the last event its text includes); a heartbeat every ``HEARTBEAT_SECONDS``.
- Each flush reads back the runs' controls: a stop asked on another worker, or a run gone (its conversation was
  deleted, or another worker declared it dead). So a stop from anywhere lands within one flush interval.
- A run whose heartbeat is older than ``RUN_STALE_SECONDS`` is dead: any worker that notices (at startup, every
  ``MAINTAIN_SECONDS``, or when its user touches it) ends it as ``interrupted`` with its last saved text. A SIGKILL
  therefore loses at most the last ``TEXT_SAVE_SECONDS`` of text, plus the flush interval. Its end's event id is past
  every id a viewer can hold: viewers see at most ``UNSAVED_EVENTS_MAX`` events past the last saved one.
- A store that refuses writes loses nothing a viewer saw: a run whose end cannot be saved ends its viewers with a
  retryable error after ``FINAL_SAVE_SECONDS`` but stays here, whole, and is saved by the first flush the store takes
  (for up to ``UNSAVED_KEEP_SECONDS``); a worker whose flushes fail ends no run as dead meanwhile.

The package: ``manager.py`` (``RunManager``, the package's entry), ``live.py`` (a run generating here), ``feeds.py``
(its viewers), ``turn.py`` (one turn's generation: the assistant's events as chunks), ``prompt.py`` (stored history
as the model's turns) and ``titles.py`` (a new conversation's title). Imported by the composition root (``app.py``)
only; it imports the agents, the model's token estimate, the store and the cross-cutting modules, never the web edge.
"""
