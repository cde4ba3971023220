"""A scratch PostgreSQL database for tests and benchmarks: created fresh, dropped after.

    with fresh_database("postgresql://postgres@127.0.0.1:5432/test") as url:
        store = HubStore(url)      # an empty database named edgefleet_<random>
        ...

The server URL's own database is used only to CREATE / DROP the scratch one, so parallel runs
never see each other's tables. Needs the ``postgres`` extra (psycopg).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

__all__ = ["fresh_database"]


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@contextmanager
def fresh_database(server_url: str, prefix: str = "edgefleet") -> Iterator[str]:
    """Yield the URL of a new empty database on ``server_url``'s server; drop it afterwards."""
    import psycopg

    admin = server_url.replace("postgresql+psycopg://", "postgresql://", 1)
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(admin, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
