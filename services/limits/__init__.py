"""What a user may spend, decided when a turn is admitted: the ``limits`` package.

``rates.py`` holds the per-user rate limits and the cap on open streams; ``budgets.py`` the per-user usage budgets
(tokens and USD per UTC day and month) and the usage report. Both keep no count in process memory: a turn's limits
and budgets are checked in the store, inside ``Store.begin_run``'s transaction, so they hold across workers.

Imported by the composition root (``app.py``) and the web edge (``web/caller.py``); it imports the store, the
metrics, the model's token estimate, errors and settings, never the agents, the runs or the web edge.
"""
