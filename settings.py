"""Settings: one typed, immutable object read from the environment once, at startup.

Every field maps to the environment variable of the same name in upper case (``api_port`` is ``API_PORT``).
``Settings.from_environ`` parses and checks every value and raises ``ConfigError`` naming the variable, so a
misconfigured deployment stops at startup instead of failing on the first request. Secrets are held in
``starlette.datastructures.Secret`` so ``repr(settings)`` and tracebacks never show them.

README.md documents every field; ``tests/test_settings.py`` fails when one is missing there.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
import tempfile
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from starlette.datastructures import Secret

Environment = Literal["development", "production"]
LLMProvider = Literal["local", "bedrock"]
StoreKind = Literal["sqlite", "supabase"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
TokenCheck = Literal["jwks", "remote"]

DEFAULT_CORS_ORIGINS = (
    "http://localhost:3000",
    "http://localhost:5173",
    "http://127.0.0.1:3000",
    "http://127.0.0.1:5173",
)


# scheme://host[:port][/path], nothing else (no spaces, query or fragment): what PostgREST and Auth URLs are built on.
_URL = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?")
# A browser origin as the Origin header spells it: scheme://host[:port], no path (not even "/"), which never matches.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")
# Every form Bedrock's ConversationalModelId pattern accepts (base model and profile ids, ARNs) uses only these.
_MODEL_ID = re.compile(r"[A-Za-z0-9._:/-]{1,2048}")
# Each fallback tried costs a round trip before the first token, and each is a label value on the model metrics.
MAX_FALLBACK_MODELS = 5
# The database refuses a shorter run secret (migrations/017_service_runs.sql): 32 characters of hex are 128 bits.
MIN_RUN_SECRET = 32
# The built-in responder's model id (services/model/local.py): what its calls are counted and priced under.
LOCAL_MODEL_ID = "canvalo-local-responder"


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens. A price without cache rates prices cache reads and writes at the input rate: more than
    any model charges for them, so a cost budget never undercounts (docs/operations.md, Usage and budgets)."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None

    def cost(
        self, input_tokens: int, output_tokens: int, cache_read_tokens: int = 0, cache_write_tokens: int = 0
    ) -> float:
        """USD for these tokens at this price."""
        cache_read = self.input if self.cache_read is None else self.cache_read
        cache_write = self.input if self.cache_write is None else self.cache_write
        return (input_tokens * self.input + output_tokens * self.output + cache_read_tokens * cache_read
                + cache_write_tokens * cache_write) / 1_000_000


# Shipped prices, USD per million tokens, for the models README and .env.example name: Nova Lite (the default model)
# and Nova Micro (the example fallback), each with its us./eu. inference profiles. The figures are as third-party
# listings (OpenRouter and others) gave them in 2026; the AWS pricing page could not be read when they were written:
# operators verify them against the Bedrock pricing page and override them with MODEL_PRICES. No cache rates are
# shipped (none were listed). The local responder is free, so the embedded default works with cost budgets.
_NOVA = {"nova-lite-v1:0": ModelPrice(input=0.06, output=0.24), "nova-micro-v1:0": ModelPrice(input=0.035, output=0.14)}
DEFAULT_MODEL_PRICES: dict[str, ModelPrice] = {
    LOCAL_MODEL_ID: ModelPrice(input=0.0, output=0.0, cache_read=0.0, cache_write=0.0),
    **{f"{profile}amazon.{model}": price for model, price in _NOVA.items() for profile in ("", "us.", "eu.")},
}
_PRICE_KEYS = {"input", "output", "cache_read", "cache_write"}


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable and never echoes a secret."""


def _secret(default: str = "") -> Secret:
    return field(default_factory=lambda: Secret(default))


@dataclass(frozen=True)
class Settings:
    # Service
    environment: Environment = "development"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    log_level: LogLevel = "INFO"
    cors_origins: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    max_request_bytes: int = 262_144
    shutdown_grace_seconds: float = 20.0
    body_read_timeout: float = 10.0  # a request body must arrive within this (408 otherwise)
    max_connections: int = 10_000  # uvicorn's limit on open connections (beyond it: 503); streams hold one each
    keep_alive_seconds: float = 75.0  # idle keep-alive; above nginx's upstream keepalive_timeout (60 s)
    header_read_timeout: float = 10.0  # a connection must send a whole request head within this (closed otherwise)
    max_connections_per_address: int = 100  # connections one client address may hold per worker; 0: no cap
    # The proxies whose X-Forwarded-For uvicorn trusts (it reads the variable itself too); exempt from the cap above.
    forwarded_allow_ips: str = "127.0.0.1"

    # Storage
    store: StoreKind = "sqlite"
    sqlite_path: str = "./data/canvalo.db"
    supabase_url: str = ""
    supabase_schema: str = "api"
    supabase_publishable_key: Secret = _secret()
    supabase_anon_key: Secret = _secret()
    supabase_jwt_secret: Secret = _secret()
    # Shown to the database with each begin, so only the service's workers begin runs that can be written
    # (migrations/017_service_runs.sql); the database keeps its SHA-256 only.
    supabase_run_secret: Secret = _secret()
    supabase_timeout: float = 10.0
    supabase_pool_size: int = 100  # concurrent Data API requests per worker, one keep-alive connection each
    # A request waits this long for one of them, then a 503 STORE_BUSY. Long enough for a burst to queue, not fail:
    # 500 new turns at once take seconds of database time to begin.
    supabase_pool_timeout: float = 15.0
    # ES256/RS256 tokens: "jwks" verifies them here with the project's published keys; "remote" asks Supabase Auth
    # for each new token (which also refuses a session logged out before its token expires).
    auth_verify: TokenCheck = "jwks"

    # Model
    llm_provider: LLMProvider = "local"
    local_token_delay: float = 0.02
    aws_region: str = "us-east-1"
    bedrock_model_id: str = "amazon.nova-lite-v1:0"
    # Tried in order before the first token when the model before is throttled or failing (services/model/bedrock.py)
    bedrock_fallback_model_ids: tuple[str, ...] = ()
    bedrock_endpoint_url: str = ""
    bedrock_max_tokens: int = 2048
    bedrock_temperature: float = 0.3
    bedrock_connect_timeout: float = 5.0
    bedrock_first_event_timeout: float = 30.0
    bedrock_idle_timeout: float = 30.0
    # USD per million tokens by model id or inference profile: MODEL_PRICES (JSON) merged over DEFAULT_MODEL_PRICES
    model_prices: dict[str, ModelPrice] = field(default_factory=lambda: dict(DEFAULT_MODEL_PRICES))

    # Usage budgets per user (services/limits/budgets.py): per UTC day and month, in tokens and in USD; 0 is off
    budget_day_tokens: int = 0
    budget_month_tokens: int = 0
    budget_day_cost: float = 0.0
    budget_month_cost: float = 0.0

    # Chat turn
    history_max_messages: int = 50
    history_token_budget: int = 12_000
    heartbeat_seconds: float = 15.0

    # Chat runs (services/runs/manager.py)
    run_max_seconds: float = 300.0  # a run still generating after this ends with RUN_TIMEOUT
    run_stale_seconds: float = 30.0  # a running run without a heartbeat for this long is dead (its worker died)
    run_events_ttl: float = 3600.0  # a finished run's events are kept this long for resumes, then deleted
    action_ttl_seconds: float = 600.0  # a change waiting for the user's confirmation expires after this
    playground: bool = False  # serve /playground outside development too

    # Retry (the seed's "exponential backoff, 3 attempts")
    max_retry_attempts: int = 3
    retry_base_delay: float = 0.5
    retry_max_delay: float = 4.0
    retry_max_total: float = 10.0

    # Production limits and metrics (services/limits/rates.py, services/metrics.py)
    rate_limit_chat_per_minute: int = 10
    rate_limit_api_per_minute: int = 120
    rate_limit_window_seconds: int = 60  # the *_PER_MINUTE limits apply per window; tests shorten it
    max_streams_per_user: int = 3
    auth_lookups_per_minute: int = 600  # calls to Supabase Auth per worker per window, for tokens not in its cache
    auth_lookup_concurrency: int = 10  # calls to Supabase Auth one worker has in flight at once
    metrics_token: Secret = _secret()  # GET /metrics is off (404) until this is set
    metrics_dir: str = ""  # per-worker snapshots merged at scrape; required with several workers

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping; tests pass a plain dict instead of patching os.environ."""
        hints = typing.get_type_hints(cls)
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.name.upper())
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse(f.name.upper(), raw.strip(), hints[f.name])
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        """Cross-field checks; each problem is named so an operator can fix all of them in one pass."""
        checks = (self._range_checks() + self._store_checks() + self._model_checks() + self._limit_checks()
                  + self._budget_checks() + self._production_checks())
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError("Invalid configuration: " + "; ".join(problems))

    def _range_checks(self) -> list[tuple[bool, str]]:
        return [
            (1 <= self.api_port <= 65535, "API_PORT must be between 1 and 65535"),
            (self.max_request_bytes >= 16_384, "MAX_REQUEST_BYTES must be at least 16384"),
            (self.max_retry_attempts >= 1, "MAX_RETRY_ATTEMPTS must be at least 1"),
            (self.retry_base_delay >= 0, "RETRY_BASE_DELAY must not be negative"),
            (self.retry_max_delay >= self.retry_base_delay, "RETRY_MAX_DELAY must be at least RETRY_BASE_DELAY"),
            (self.retry_max_total >= 0, "RETRY_MAX_TOTAL must not be negative"),
            (0 < self.heartbeat_seconds <= 60, "HEARTBEAT_SECONDS must be in (0, 60]"),
            (1 <= self.run_max_seconds <= 3600, "RUN_MAX_SECONDS must be between 1 and 3600"),
            (2 <= self.run_stale_seconds <= 600, "RUN_STALE_SECONDS must be between 2 and 600"),
            (0 <= self.run_events_ttl <= 2_592_000, "RUN_EVENTS_TTL must be between 0 and 2592000 (30 days)"),
            (0 < self.action_ttl_seconds <= 86_400, "ACTION_TTL_SECONDS must be in (0, 86400]"),
            (self.history_max_messages >= 1, "HISTORY_MAX_MESSAGES must be at least 1"),
            (self.history_token_budget >= 500, "HISTORY_TOKEN_BUDGET must be at least 500"),
            (self.local_token_delay >= 0, "LOCAL_TOKEN_DELAY must not be negative"),
            (0 <= self.shutdown_grace_seconds <= 3600, "SHUTDOWN_GRACE_SECONDS must be between 0 and 3600"),
            (0 < self.body_read_timeout <= 300, "BODY_READ_TIMEOUT must be in (0, 300]"),
            (self.max_connections >= 10, "MAX_CONNECTIONS must be at least 10"),
            (0 < self.keep_alive_seconds <= 600, "KEEP_ALIVE_SECONDS must be in (0, 600]"),
            (0 < self.header_read_timeout <= 300, "HEADER_READ_TIMEOUT must be in (0, 300]"),
            (
                0 <= self.max_connections_per_address < self.max_connections,
                "MAX_CONNECTIONS_PER_ADDRESS must be 0 (no cap) or more, and below MAX_CONNECTIONS",
            ),
            (self.bedrock_max_tokens >= 1, "BEDROCK_MAX_TOKENS must be at least 1"),
            (0 < self.supabase_timeout <= 120, "SUPABASE_TIMEOUT must be in (0, 120]"),
            (0 < self.bedrock_connect_timeout <= 60, "BEDROCK_CONNECT_TIMEOUT must be in (0, 60]"),
            (0 < self.bedrock_first_event_timeout <= 300, "BEDROCK_FIRST_EVENT_TIMEOUT must be in (0, 300]"),
            (0 < self.bedrock_idle_timeout <= 300, "BEDROCK_IDLE_TIMEOUT must be in (0, 300]"),
            (1 <= self.supabase_pool_size <= 1000, "SUPABASE_POOL_SIZE must be between 1 and 1000"),
            (0 < self.supabase_pool_timeout <= 60, "SUPABASE_POOL_TIMEOUT must be in (0, 60]"),
            (0 <= self.bedrock_temperature <= 1, "BEDROCK_TEMPERATURE must be in [0, 1]"),
            ("*" not in self.cors_origins or len(self.cors_origins) == 1, "CORS_ORIGINS cannot mix * with origins"),
            (
                all(origin == "*" or _ORIGIN.fullmatch(origin) for origin in self.cors_origins),
                "CORS_ORIGINS must be * or origins such as https://app.example.com (scheme://host[:port], no path)",
            ),
        ]

    def _store_checks(self) -> list[tuple[bool, str]]:
        """In every environment: a store the service cannot reach is a setting to fix, not a retry loop. Production
        runs on Supabase only, so what that store needs is named with the rest, whatever STORE says yet."""
        needed_by = "STORE=supabase" if self.store == "supabase" else "ENVIRONMENT=production"
        supabase = self.store == "supabase" or self.environment == "production"
        key = "SUPABASE_PUBLISHABLE_KEY" if str(self.supabase_publishable_key) else "SUPABASE_ANON_KEY"
        return [
            (not supabase or bool(self.supabase_url), f"{needed_by} requires SUPABASE_URL"),
            (
                not supabase or bool(self.publishable_key),
                f"{needed_by} requires SUPABASE_PUBLISHABLE_KEY (or the legacy SUPABASE_ANON_KEY)",
            ),
            (
                not supabase or len(str(self.supabase_run_secret)) >= MIN_RUN_SECRET,
                f"{needed_by} requires SUPABASE_RUN_SECRET, at least {MIN_RUN_SECRET} characters: the run secret the "
                "database was given (docs/production.md, The run secret)",
            ),
            (
                not self.supabase_url or bool(_URL.fullmatch(self.supabase_url)),
                "SUPABASE_URL must be an http(s) URL such as https://<project>.supabase.co",
            ),
            (
                not is_privileged_key(self.publishable_key),
                f"{key} holds a secret or service-role key; user data is only read with the publishable (or legacy "
                "anon) key and the user's own token",
            ),
        ]

    def _model_checks(self) -> list[tuple[bool, str]]:
        fallbacks = self.bedrock_fallback_model_ids
        name = "BEDROCK_FALLBACK_MODEL_IDS"
        return [
            (all(map(_MODEL_ID.fullmatch, fallbacks)), f"{name} must be model ids, profiles or ARNs, comma-separated"),
            (len(set(fallbacks)) == len(fallbacks), f"{name} must not repeat a model"),
            (self.bedrock_model_id not in fallbacks, f"{name} must not include BEDROCK_MODEL_ID"),
            (len(fallbacks) <= MAX_FALLBACK_MODELS, f"{name} takes at most {MAX_FALLBACK_MODELS} models"),
        ]

    def _limit_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.rate_limit_chat_per_minute >= 1, "RATE_LIMIT_CHAT_PER_MINUTE must be at least 1"),
            (self.rate_limit_api_per_minute >= 1, "RATE_LIMIT_API_PER_MINUTE must be at least 1"),
            (1 <= self.rate_limit_window_seconds <= 3600, "RATE_LIMIT_WINDOW_SECONDS must be between 1 and 3600"),
            (self.max_streams_per_user >= 1, "MAX_STREAMS_PER_USER must be at least 1"),
            (self.auth_lookups_per_minute >= 1, "AUTH_LOOKUPS_PER_MINUTE must be at least 1"),
            (self.auth_lookup_concurrency >= 1, "AUTH_LOOKUP_CONCURRENCY must be at least 1"),
            (str(self.metrics_token) == "" or len(str(self.metrics_token)) >= 16,
             "METRICS_TOKEN must be at least 16 characters"),
        ]

    def _budget_checks(self) -> list[tuple[bool, str]]:
        """Budgets must not be negative, and a cost budget needs a price for every model a turn may use: a call of an
        unpriced model would cost nothing against it."""
        amounts = {"BUDGET_DAY_TOKENS": self.budget_day_tokens, "BUDGET_MONTH_TOKENS": self.budget_month_tokens,
                   "BUDGET_DAY_COST": self.budget_day_cost, "BUDGET_MONTH_COST": self.budget_month_cost}
        checks = [(value >= 0, f"{name} must not be negative (0 turns it off)") for name, value in amounts.items()]
        unpriced = [m for m in self.models_in_use if m not in self.model_prices]
        cost_budget = self.budget_day_cost > 0 or self.budget_month_cost > 0
        checks.append((not (cost_budget and unpriced), f"a cost budget (BUDGET_DAY_COST, BUDGET_MONTH_COST) needs a "
                       f"price for every model in use: add {', '.join(unpriced)} to MODEL_PRICES"))
        return checks

    @property
    def models_in_use(self) -> tuple[str, ...]:
        """The models a turn may call: the local responder, or BEDROCK_MODEL_ID and its fallbacks."""
        if self.llm_provider == "local":
            return (LOCAL_MODEL_ID,)
        return (self.bedrock_model_id, *self.bedrock_fallback_model_ids)

    def _production_checks(self) -> list[tuple[bool, str]]:
        """What a real deployment needs: auth, the browser origins, the real model and a shared store."""
        if self.environment != "production":
            return []
        local = ("*", "localhost", "127.0.0.1", "[::1]")
        real_origins = bool(self.cors_origins) and not any(at in origin for origin in self.cors_origins for at in local)
        requires = "ENVIRONMENT=production requires"
        return [
            (self.auth_enabled, f"{requires} authentication: set SUPABASE_JWT_SECRET or SUPABASE_URL"),
            (real_origins, f"{requires} CORS_ORIGINS set to the frontend's origins (not * or localhost)"),
            (self.llm_provider == "bedrock", f"{requires} LLM_PROVIDER=bedrock (local is a rule-based stand-in)"),
            (self.store == "supabase", f"{requires} STORE=supabase (SQLite cannot be shared across machines)"),
        ]

    def check_sqlite_path(self) -> None:
        """At startup, refuse a SQLITE_PATH the SQLite store could not open, naming it (not a lifespan traceback).

        Not part of ``validate``: building ``Settings`` (as every test does) must not touch the disk. Nothing is
        created: the nearest existing directory is probed with an unnamed temporary file, because ``os.access``
        answers yes to root almost anywhere (``/proc`` included), where a real write would fail.
        """
        if self.store != "sqlite":
            return
        path = os.path.abspath(self.sqlite_path)
        problem = _sqlite_file_problem(path) if os.path.lexists(path) else _directory_problem(os.path.dirname(path))
        if problem:
            raise ConfigError(f"SQLITE_PATH {self.sqlite_path!r} {problem}")

    def check_metrics_dir(self) -> None:
        """At startup, refuse a METRICS_DIR the workers could not write their snapshots to, naming it; otherwise each
        worker would log a warning every second that names neither. Probed like SQLITE_PATH, creating nothing."""
        if not self.metrics_dir:
            return
        problem = _directory_problem(os.path.abspath(self.metrics_dir))
        if problem:
            raise ConfigError(f"METRICS_DIR {self.metrics_dir!r} {problem}")

    @property
    def auth_enabled(self) -> bool:
        return bool(str(self.supabase_jwt_secret)) or bool(self.supabase_url)

    @property
    def publishable_key(self) -> str:
        return str(self.supabase_publishable_key) or str(self.supabase_anon_key)


def is_privileged_key(key: str) -> bool:
    """``sb_secret_...`` or a legacy JWT key whose role is ``service_role``: both bypass row-level security."""
    if key.startswith("sb_secret_"):
        return True
    parts = key.split(".")
    if len(parts) != 3:
        return False
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("role") == "service_role"


def _sqlite_file_problem(path: str) -> str | None:
    if not os.path.isfile(path):
        return "is not a regular file"
    try:
        with open(path, "r+b"):
            return None
    except OSError as exc:
        return f"cannot be opened for writing ({exc.strerror})"


def _directory_problem(directory: str) -> str | None:
    """Why files could not be made in ``directory`` (created if missing), or None: its nearest existing ancestor must
    be a directory a file can be written in."""
    existing = directory
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot be used: {existing!r} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            return None
    except OSError as exc:
        return f"cannot be written: {existing!r} is not writable ({exc.strerror})"


def _parse(name: str, raw: str, kind: object) -> object:
    """Cast one raw environment value to the field's type, naming the variable (never the value) on failure."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        value = raw.upper() if all(c.isupper() for c in choices) else raw.lower()
        if value not in choices:
            raise ConfigError(f"{name} must be one of: {', '.join(choices)}")
        return value
    if origin is tuple:
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if origin is dict:
        return {**DEFAULT_MODEL_PRICES, **_prices(name, raw)}
    if kind is Secret:
        return Secret(raw)
    if kind is bool:
        if raw.lower() not in ("true", "1", "false", "0"):
            raise ConfigError(f"{name} must be true, false, 1 or 0")
        return raw.lower() in ("true", "1")
    if kind in (int, float):
        try:
            number = kind(raw)  # type: ignore[operator]
        except ValueError:
            raise ConfigError(f"{name} must be a number") from None
        if not math.isfinite(number):  # nan passes every range check, inf crashes what converts it to int
            raise ConfigError(f"{name} must be a finite number")
        return number
    return raw


def _prices(name: str, raw: str) -> dict[str, ModelPrice]:
    """MODEL_PRICES: a JSON object of model id -> {input, output[, cache_read, cache_write]}, USD per million tokens,
    each a number of at least 0; the problem is named, never the value."""
    try:
        given = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a JSON object of model id -> prices") from None
    if not isinstance(given, dict):
        raise ConfigError(f"{name} must be a JSON object of model id -> prices")
    prices = {}
    for model, price in given.items():
        if not _MODEL_ID.fullmatch(model):
            raise ConfigError(f"{name} keys must be model ids, profiles or ARNs")
        if not isinstance(price, dict) or not {"input", "output"} <= price.keys() <= _PRICE_KEYS or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e6 for v in price.values()):
            raise ConfigError(f"{name}[{model!r}] must be {{input, output[, cache_read, cache_write]}}: USD per "
                              "million tokens, each a number of at least 0")
        prices[model] = ModelPrice(**{k: float(v) for k, v in price.items()})
    return prices
