"""The embedded store: SQLite from the standard library (``SQLiteStore`` in ``store.py``).

``store.py`` runs every call on the store's own threads and reads with ``listing.py`` (pages and FTS5 search),
``branches.py`` (the message rows, as a tree), ``runs.py``, ``records.py``, ``actions.py``, ``limits.py`` and
``usage.py``, each a set of functions of a connection; ``writer.py`` is the one writer thread, which commits the
writes waiting together as one transaction. Imported by ``services/store/build.py`` (and the tests); the modules here
import only ``services.store`` and what is below it.
"""
