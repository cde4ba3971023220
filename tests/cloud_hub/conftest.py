"""Hub stores on real databases: a SQLite file per test, and a fresh PostgreSQL database per
test on the server of ``postgres_url`` (created with a random name, dropped afterwards, so
parallel runs never share tables)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from cloud_hub.store import HubStore


def _admin_url(url: str) -> str:
    """The same server's maintenance database (``postgres``), as a psycopg URL."""
    return sa.make_url(url).set(drivername="postgresql", database="postgres") \
        .render_as_string(hide_password=False)


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database; its URL (``postgresql://...``)."""
    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_url(postgres_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(postgres_url).set(drivername="postgresql", database=name) \
            .render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[HubStore]:
    with HubStore(path=tmp_path / "hub.db") as store:
        yield store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HubStore]:
    """The same test on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        s = HubStore(path=tmp_path / "hub.db")
    else:
        s = HubStore(request.getfixturevalue("pg_database"))
    with s:
        yield s
