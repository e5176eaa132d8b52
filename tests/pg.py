"""A throwaway PostgreSQL cluster for the test session, with the few Supabase pieces our migration relies on.

``start_cluster`` runs Debian's ``initdb``/``pg_ctl`` (PostgreSQL 15 from ``/usr/lib/postgresql/15/bin``, or
``PG_BIN``) into a fresh temporary directory and listens on a unix socket only, so nothing clashes with another
server on the machine. PostgreSQL refuses to run as root and CI runs as root, so the server then runs as the
``postgres`` OS user that Debian's package creates. Missing binaries are an error, never a skip: ``.ci/run``
installs the package, and a suite that silently skipped its database tests would prove nothing.

``SUPABASE_BOOTSTRAP`` recreates, minimally, what a Supabase project already has and our migration uses: the
roles ``anon``, ``authenticated``, ``service_role`` and the login role ``authenticator`` that PostgREST connects as,
``auth.users``, and ``auth.uid()``/``auth.jwt()`` exactly as Supabase Auth defines them (reading the
``request.jwt.claims`` setting PostgREST sets per request).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# The service's run secret in every test database (migrations/017_service_runs.sql), and the headers that show it.
RUN_SECRET = "test-run-secret-0123456789abcdef0123456789abcdef"
SERVICE = {"x-canvalo-run-secret": RUN_SECRET}

SUPABASE_BOOTSTRAP = """
create role anon nologin noinherit;
create role authenticated nologin noinherit;
create role service_role nologin noinherit bypassrls;
create role authenticator login noinherit;
grant anon, authenticated, service_role to authenticator;

create schema auth;
grant usage on schema auth to anon, authenticated, service_role;
create table auth.users (
    id uuid primary key,
    email text,
    created_at timestamptz not null default now()
);

-- As defined by supabase/auth (migrations/20220224000811_update_auth_functions.up.sql).
create function auth.uid() returns uuid language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;
create function auth.role() returns text language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;
create function auth.jwt() returns jsonb language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;
grant execute on function auth.uid(), auth.role(), auth.jwt() to anon, authenticated, service_role;
"""


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries are missing or the cluster did not start: fail loudly, never skip."""


@dataclass(frozen=True)
class Cluster:
    socket_dir: str
    port: int

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"host={self.socket_dir} port={self.port} dbname={dbname} user={user}"

    def connect(self, dbname: str = "postgres", user: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname, user), autocommit=True, **kwargs)


def pg_bin() -> Path:
    configured = os.environ.get("PG_BIN")
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    candidates = [configured] if configured else ["/usr/lib/postgresql/15/bin", *installed]
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and PG_BIN). "
        "Install Debian's package: apt-get install -y postgresql (.ci/run does this)."
    )


def _server_user() -> str | None:
    """The OS user to run the server as: ``postgres`` when we are root, else ourselves (``None``)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("Running as root but there is no 'postgres' OS user to run the server") from None
    return "postgres"


def _run(args: list[str], user: str | None) -> None:
    result = subprocess.run(args, user=user, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise PostgresUnavailable(f"{Path(args[0]).name} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


@contextlib.contextmanager
def start_cluster(port: int = 54329) -> Iterator[Cluster]:
    """initdb + pg_ctl start into a temporary directory; stopped and removed on exit."""
    binaries, user = pg_bin(), _server_user()
    root = tempfile.mkdtemp(prefix="canvalo-pg-")
    data, sockets, log = os.path.join(root, "data"), os.path.join(root, "sock"), os.path.join(root, "server.log")
    os.makedirs(sockets)
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    try:
        _run([str(binaries / "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
              "--locale=C", "--no-sync"], user)
        options = (
            f"-c listen_addresses='' -k {sockets} -p {port} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c timezone=UTC -c max_connections=100"
        )
        try:
            _run([str(binaries / "pg_ctl"), "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start"], user)
        except PostgresUnavailable as exc:
            tail = Path(log).read_text(errors="replace")[-2000:] if os.path.exists(log) else ""
            raise PostgresUnavailable(f"{exc}\n{tail}") from None
        try:
            yield Cluster(sockets, port)
        finally:
            subprocess.run([str(binaries / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
                           user=user, capture_output=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def migration_sql() -> list[str]:
    return [path.read_text() for path in sorted(MIGRATIONS_DIR.glob("*.sql"))]


def create_supabase_database(cluster: Cluster, name: str, *, migrate: bool = True) -> None:
    """A fresh database with Supabase's roles, auth schema and (optionally) our migrations applied twice.

    Applying every migration twice is deliberate: the migration promises to be safe to run again.
    """
    with cluster.connect() as admin:
        admin.execute(f'create database "{name}"')
        # Roles are cluster-wide: the first database creates them.
        exists = admin.execute("select 1 from pg_roles where rolname = 'authenticator'").fetchone()
    bootstrap = SUPABASE_BOOTSTRAP
    if exists:
        bootstrap = "\n".join(line for line in bootstrap.splitlines() if not _is_role_statement(line))
    with cluster.connect(name) as db:
        db.execute(bootstrap)
        if migrate:
            apply_migrations(db, times=2)
            register_run_secret(db)


def register_run_secret(db: psycopg.Connection[Any], secret: str = RUN_SECRET) -> None:
    """What an operator does once (docs/production.md, The run secret): the database keeps the secret's SHA-256."""
    db.execute("insert into canvalo_private.run_secrets (hash) values (sha256(convert_to(%s, 'UTF8')))"
               " on conflict do nothing", (secret,))


def apply_migrations(db: psycopg.Connection[Any], times: int = 1) -> None:
    for _ in range(times):
        for script in migration_sql():
            db.execute(script)  # type: ignore[arg-type]


def act_as(
    db: psycopg.Connection[Any], user: str | None, *, local: bool = True, headers: dict[str, str] | None = None
) -> None:
    """Act as PostgREST does for a request: role ``authenticated`` with ``user`` as the token's subject, or ``anon``
    with no subject, and the request's ``headers`` (``SERVICE`` for the service's own begin); for the transaction
    (``local``, as PostgREST sets them) or for the rest of the session."""
    claims = {"sub": user, "role": "authenticated"} if user else {"role": "anon"}
    db.execute(f"set {'local ' if local else ''}role {claims['role']}")
    db.execute("select set_config('request.jwt.claims', %s, %s), set_config('request.headers', %s, %s)",
               (json.dumps(claims), local, json.dumps(headers or {}), local))


def _is_role_statement(line: str) -> bool:
    return line.startswith("create role") or line.startswith("grant anon, authenticated, service_role to")
