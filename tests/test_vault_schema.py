"""Schema migrations: idempotent, and a database newer than the code is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from backvault.vault.schema import CURRENT_VERSION, migrate, schema_version
from backvault.vault.store import make_engine


def test_migrations_run_once_and_refuse_a_newer_schema(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'v.db'}")
    assert migrate(engine) == 0
    assert migrate(engine) == CURRENT_VERSION
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
    assert {"records", "logins", "audit", "accounts", "vault_keys", "schema_version"} <= tables
    with engine.begin() as conn:
        conn.execute(schema_version.update().values(version=CURRENT_VERSION + 1))
    with pytest.raises(RuntimeError, match="newer than this vault"):
        migrate(engine)
