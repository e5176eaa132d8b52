"""Who is calling: a request's bearer token and claimed ``user_id`` made a ``Caller``.

``authenticator.py`` is the entry (``build_authenticator``, ``claimed_caller``; its docstring states the whole rule);
``tokens.py`` parses and checks every token and holds the HS256 verifier; ``jwks.py`` keeps the project's published
signing keys for ES256/RS256; ``lookup.py`` asks Supabase Auth when ``AUTH_VERIFY=remote``. Imported by the
composition root (``app.py``) only; it imports the store's ``Caller`` and the cross-cutting modules.
"""
