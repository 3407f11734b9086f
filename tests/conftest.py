from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Deterministic property tests: the same examples on every run, no flaky deadlines on a
# loaded 2-core CI machine.
settings.register_profile(
    "sealtrail",
    derandomize=True,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("sealtrail")

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT.parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(
            f"conformance vectors not found at {VECTORS} (../shared must sit beside the checkout)"
        )
    return VECTORS


# -- PostgreSQL (helpers in tests/pg.py) ----------------------------------------------------
# psycopg is imported only when a test asks for PostgreSQL, so the SQLite tests run without it.


@pytest.fixture(scope="session")
def pg_database():  # type: ignore[no-untyped-def]
    """A database for this test session (``pg.TestDatabase``), dropped at the end.

    Fails (never skips) when the server cannot be reached or started.
    """
    import psycopg

    import pg

    db = pg.TestDatabase()
    try:
        db.create()
    except (pg.ServerUnavailable, psycopg.Error) as exc:
        pytest.fail(f"PostgreSQL tests need the local server: {exc}", pytrace=False)
    yield db
    db.drop()


@pytest.fixture
def pg_url(pg_database) -> str:  # type: ignore[no-untyped-def]
    """A store URL on a fresh, empty schema of the session database."""
    url: str = pg_database.fresh_schema_url()
    return url
