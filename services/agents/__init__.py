"""The assistant and what it may do: ``assistant.py`` (a supervisor that answers or hands over to a specialist, and
the specialists' tool loop), ``tools.py`` (each domain's tools: schemas, argument checks, execution through the
store), ``actions.py`` (the updates and deletes that wait for the user's confirmation) and ``usage.py`` (what each
model call used, counted however the turn ends).

Imported by the runs (``services/runs/``) and the composition root (``app.py``: the confirm route's answer); it
imports the model interface, the store and the domains, never the runs or the web edge.
"""
