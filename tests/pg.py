"""The local PostgreSQL server for tests: one throwaway database per test session.

The maintenance connection is ``$SEALTRAIL_TEST_PG`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth). If the server is not
accepting connections, :func:`ensure_server` tries to start the local cluster; if it still
cannot be reached the PostgreSQL tests fail (they never skip: CI must notice). Deselect them
with ``-m "not postgres"`` on a machine without PostgreSQL.

Each session creates ``sealtrail_test_<pid>_<random>`` and drops it at the end; each test
gets a fresh schema in it (``?schema=`` in the store URL), which costs a few milliseconds.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

MAINTENANCE_URL = os.environ.get(
    "SEALTRAIL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
)
START_TIMEOUT = 30.0


class ServerUnavailable(RuntimeError):
    pass


def connect(url: str = MAINTENANCE_URL) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def _reachable() -> str | None:
    """None when the server answers, else why not."""
    try:
        with connect() as conn:
            conn.execute("SELECT 1")
        return None
    except psycopg.Error as exc:
        return " ".join(str(exc).split())


def _start_cluster() -> str:
    etc = Path("/etc/postgresql")
    versions = sorted(p.name for p in etc.iterdir()) if etc.is_dir() else []
    if not versions:
        return "no cluster under /etc/postgresql to start"
    try:
        done = subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"pg_ctlcluster failed: {exc}"
    return f"pg_ctlcluster exited {done.returncode}: {(done.stderr or done.stdout).strip()}"


def ensure_server() -> None:
    """Make sure the server accepts connections, starting the local cluster if needed."""
    why = _reachable()
    if why is None:
        return
    started = _start_cluster()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        why = _reachable()
        if why is None:
            return
        time.sleep(0.5)
    raise ServerUnavailable(
        f"PostgreSQL at {MAINTENANCE_URL} is not accepting connections ({why}); "
        f"tried to start it: {started}"
    )


def with_database(url: str, database: str, user: str | None = None) -> str:
    """``url`` pointing at another database (and optionally as another user)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}", query=""))


class TestDatabase:
    """A database created for this test session and dropped at its end."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.name = f"sealtrail_test_{os.getpid()}_{secrets.token_hex(4)}"
        self.url = with_database(MAINTENANCE_URL, self.name)

    def create(self) -> None:
        ensure_server()
        with connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))

    def drop(self) -> None:
        with connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )

    def fresh_schema_url(self, user: str | None = None) -> str:
        """A store URL on a schema no one has used yet (the store creates it)."""
        url = with_database(MAINTENANCE_URL, self.name, user)
        return f"{url}?schema=t_{secrets.token_hex(6)}"

    def schema_url(self, store_url: str, user: str | None = None) -> str:
        """``store_url``'s schema, connecting as ``user``."""
        query = urlsplit(store_url).query
        return f"{with_database(MAINTENANCE_URL, self.name, user)}?{query}"

    def raw(self, store_url: str) -> psycopg.Connection[tuple[object, ...]]:
        """A plain connection to a store's schema (for raw SQL in tests)."""
        schema = urlsplit(store_url).query.partition("schema=")[2]
        conn = connect(self.url)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return conn

    def create_role(self) -> str:
        """A new LOGIN role (roles are cluster-wide: :meth:`drop_role` it)."""
        role = f"sealtrail_test_role_{secrets.token_hex(4)}"
        with connect() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        return role

    def drop_role(self, role: str) -> None:
        with connect(self.url) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with connect() as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
