"""What the service does and what it talks to, below the web edge (``web/``) and the composition root (``app.py``).

Packages, each named for what it owns, from the bottom up (a package imports only those before it):

    errors.py, settings.py          (beside services/) the error hierarchy and the settings
    domains.py                      the specialist domains, declared as data (their tables, columns, agents)
    deadline.py, metrics.py         a per-stream deadline; Prometheus metrics merged across workers
    http_pool.py, retry.py          slots for a pooled httpx client; backoff with full jitter
    text.py                         text every encoder writes and both stores keep (the model's strings)
    store/                          the records, the Store protocol and its two backends (sqlite/, postgrest/)
    model/                          the ChatModel protocol, the local responder, Amazon Bedrock
    auth/                           who is calling: tokens, signing keys, Supabase Auth
    limits/                         per-user rate limits and usage budgets over the store
    agents/                         the assistant, its tools, and the pending actions the user confirms
    runs/                           chat runs: generation apart from connections, flushes, viewers, stops

Nothing here imports starlette, uvicorn, ``web/`` or ``app.py``.
"""
