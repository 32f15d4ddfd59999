"""The SQLAlchemy 2.0 / 2.1 differences in sqlalchemy_scale._sa (the 2.0/2.1 functions), on the installed version.

CI runs the suite on the newest 2.0 and the newest 2.1, so each test here runs
against both; none needs a server.
"""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import pytest
import sqlalchemy
from packaging.requirements import Requirement
from packaging.version import Version
from sqlalchemy import column, select, table, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import MissingGreenlet
from sqlalchemy.util.concurrency import greenlet_spawn

from sqlalchemy_scale._sa import (
    SQLALCHEMY_VERSION,
    await_,
    on_conflict_set_keys,
    select_distinct_on,
    select_syntax_extensions,
    update_set_keys,
)
from sqlalchemy_scale.sharding._scopes import select_parts

T = table("t", column("id"), column("k"), column("v"))


def test_installed_version_is_a_supported_minor() -> None:
    """The installed SQLAlchemy is one of the minor versions the package supports."""
    assert SQLALCHEMY_VERSION in {(2, 0), (2, 1)}
    assert sqlalchemy.__version__.startswith(f"{SQLALCHEMY_VERSION[0]}.{SQLALCHEMY_VERSION[1]}.")


def test_on_conflict_set_keys_lists_every_assigned_column() -> None:
    """ON CONFLICT DO UPDATE SET keys come back in order, given by name or by column."""
    stmt = pg_insert(T).values(id=1, k=2, v=3)
    upsert = stmt.on_conflict_do_update(index_elements=["id"], set_={"v": 4, T.c.k: 5})
    keys = on_conflict_set_keys(upsert)
    assert [getattr(k, "name", k) for k in keys] == ["v", "k"]


def test_on_conflict_set_keys_is_empty_without_do_update() -> None:
    """A plain INSERT and ON CONFLICT DO NOTHING assign nothing on conflict."""
    stmt = pg_insert(T).values(id=1, k=2)
    assert on_conflict_set_keys(stmt) == []
    assert on_conflict_set_keys(stmt.on_conflict_do_nothing()) == []


def test_update_set_keys_reads_values_and_ordered_values() -> None:
    """UPDATE keys come back from values() and from ordered_values() alike, empty when unset."""
    by_values = update(T).values(k=1, v=2)
    assert sorted(getattr(k, "name", k) for k in update_set_keys(by_values)) == ["k", "v"]
    ordered = update(T).ordered_values((T.c.v, 1), (T.c.k, 2))
    assert [k.name for k in update_set_keys(ordered)] == ["v", "k"]
    assert update_set_keys(update(T)) == []


def test_select_distinct_on_renders_and_is_seen_by_the_planner() -> None:
    """select_distinct_on() compiles to DISTINCT ON and the planner's reading of the SELECT sees it."""
    stmt = select_distinct_on(select(T.c.k, T.c.v), T.c.k).order_by(T.c.k, T.c.v)
    sql = str(stmt.compile(dialect=postgresql.psycopg2.dialect()))
    assert sql.startswith("SELECT DISTINCT ON (t.k) t.k, t.v")
    parts = select_parts(stmt)
    assert parts.distinct and parts.distinct_on
    assert not select_parts(select(T.c.k).distinct()).distinct_on


def test_select_syntax_extensions_are_four_empty_slots_on_a_plain_select() -> None:
    """A SELECT without syntax extensions has four unused slots on either version."""
    assert select_syntax_extensions(select(T.c.k)) == (None, None, None, None)
    with_prefix = select(T.c.k).prefix_with("/* x */")
    assert select_syntax_extensions(with_prefix) == (None, None, None, None)


def test_await_runs_a_coroutine_from_sqlalchemys_greenlet() -> None:
    """await_ hands a coroutine to the loop from sync code under greenlet_spawn, and refuses outside it."""

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    def sync_code() -> int:
        return await_(answer())

    assert asyncio.run(greenlet_spawn(sync_code)) == 42
    coroutine = answer()
    with pytest.raises(MissingGreenlet):
        await_(coroutine)


def test_declared_sqlalchemy_range_admits_the_installed_version() -> None:
    """pyproject's SQLAlchemy requirement admits the version under test (so CI tests what it declares)."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    specs = [Requirement(r) for r in deps if Requirement(r).name.lower() == "sqlalchemy"]
    assert len(specs) == 1
    assert Version(sqlalchemy.__version__) in specs[0].specifier
