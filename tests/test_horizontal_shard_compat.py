"""ss.ShardedSession as a drop-in for sqlalchemy.ext.horizontal_shard.ShardedSession.

An application on SQLAlchemy's extension changes one import: its choosers,
``shards={...}``, ``set_shard_id``, ``Query.set_shard()``,
``bind_arguments={"shard_id": ...}`` and identity tokens behave as there. The
results are compared with SQLAlchemy's own class on the same engines
(differential), so a test states no expected rows of its own where the extension
defines them.

SQLite is used in this module ONLY to show that the extension's API works on
arbitrary engines, as SQLAlchemy's own test suite does (``test/ext/test_horizontal_shard.py``
also runs against it with this class: ``nox -s horizontal_shard``); every routing,
sharding and concurrency behaviour is tested on the real PostgreSQL shards, and
the concurrency of a fan-out is observed in ``pg_stat_activity``.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, exc, func, inspect, select, text
from sqlalchemy.ext import horizontal_shard
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster

SHARDS = ["east", "west"]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "hstest_items"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    region: Mapped[str]
    v: Mapped[int]


def shard_chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
    return str(instance.region) if instance is not None else "east"


def identity_chooser(mapper: Any, primary_key: Any, **kw: Any) -> list[str]:
    return list(SHARDS)


def execute_chooser(context: Any) -> list[str]:
    return list(SHARDS)


def _choosers() -> dict[str, Any]:
    return {
        "shard_chooser": shard_chooser,
        "identity_chooser": identity_chooser,
        "execute_chooser": execute_chooser,
    }


def _seed(engines: dict[str, Engine]) -> None:
    rows = {"east": [(1, 30), (3, 10)], "west": [(2, 20), (4, 40)]}
    for region, engine in engines.items():
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                Item.__table__.insert(),  # type: ignore[arg-type]
                [{"id": i, "region": region, "v": v} for i, v in rows[region]],
            )


@pytest.fixture
def sqlite_shards(tmp_path: Path) -> Iterator[dict[str, Engine]]:
    """Two SQLite file databases as shards (API compatibility only, see the module docstring)."""
    engines = {s: create_engine(f"sqlite:///{tmp_path / s}.db") for s in SHARDS}
    _seed(engines)
    yield engines
    for engine in engines.values():
        engine.dispose()


@pytest.fixture(params=["psycopg2", "psycopg"])
def pg_shards(
    request: pytest.FixtureRequest, scale_cluster: LocalCluster
) -> Iterator[dict[str, Engine]]:
    """Two PostgreSQL shard servers (each driver), seeded with the same rows."""
    engines = {
        s: create_engine(scale_cluster.shards[i].url(request.param)) for i, s in enumerate(SHARDS)
    }
    _seed(engines)
    yield engines
    for engine in engines.values():
        Base.metadata.drop_all(engine)
        engine.dispose()


def _both(engines: dict[str, Engine]) -> list[Session]:
    """SQLAlchemy's own ShardedSession and ours over the same engines and choosers."""
    return [
        horizontal_shard.ShardedSession(shards=engines, **_choosers()),
        ss.ShardedSession(shards=engines, **_choosers()),
    ]


def _answers(engines: dict[str, Engine], run: Callable[[Session], Any]) -> list[Any]:
    answers = []
    for session in _both(engines):
        with session:
            answers.append(run(session))
    return answers


STATEMENTS: dict[str, Callable[[Session], Any]] = {
    "rows": lambda s: [(i.id, inspect_token(i)) for i in s.scalars(select(Item))],
    "order_by_is_per_shard": lambda s: s.scalars(select(Item.id).order_by(Item.id)).all(),
    "limit_is_per_shard": lambda s: s.scalars(select(Item.id).order_by(Item.v).limit(1)).all(),
    "count_is_per_shard": lambda s: s.scalars(select(func.count(Item.id))).all(),
    "columns": lambda s: s.execute(select(Item.region, Item.v).where(Item.v > 15)).all(),
    "set_shard_id": lambda s: s.scalars(
        select(Item.id).options(horizontal_shard.set_shard_id("west"))
    ).all(),
    "query_set_shard": lambda s: [i.id for i in s.query(Item).set_shard("east")],
    "bind_arguments": lambda s: s.scalars(
        select(Item.id), bind_arguments={"shard_id": "west"}
    ).all(),
    "text_bind_arguments": lambda s: s.execute(
        text("SELECT id FROM hstest_items ORDER BY id"), bind_arguments={"shard_id": "east"}
    ).all(),
    "get_by_identity_token": lambda s: s.get(Item, 2, identity_token="west").v,  # type: ignore[union-attr]
    "get_any_shard": lambda s: inspect_token(s.get(Item, 4)),
}


def inspect_token(obj: Any) -> Any:
    return inspect(obj).identity_token


@pytest.mark.parametrize("name", list(STATEMENTS))
def test_same_answers_as_sqlalchemy_on_sqlite(sqlite_shards: dict[str, Engine], name: str) -> None:
    """Each statement shape returns what SQLAlchemy's own ShardedSession returns (SQLite)."""
    ours, theirs = _answers(sqlite_shards, STATEMENTS[name])[::-1]
    assert ours == theirs


@pytest.mark.parametrize("name", list(STATEMENTS))
def test_same_answers_as_sqlalchemy_on_postgresql(pg_shards: dict[str, Engine], name: str) -> None:
    """Each statement shape returns what SQLAlchemy's own ShardedSession returns (PostgreSQL,
    where the fan-out runs concurrently)."""
    ours, theirs = _answers(pg_shards, STATEMENTS[name])[::-1]
    assert ours == theirs


def test_writes_go_where_the_shard_chooser_says(pg_shards: dict[str, Engine]) -> None:
    """New objects land on the chooser's shard and carry it as identity token; commit works."""
    with ss.ShardedSession(shards=pg_shards, **_choosers()) as session:
        session.add_all([Item(id=10, region="west", v=1), Item(id=11, region="east", v=1)])
        session.commit()
        assert inspect_token(session.get(Item, 10)) == "west"
    for region, engine in pg_shards.items():
        with engine.connect() as conn:
            ids = set(conn.scalars(text("SELECT id FROM hstest_items WHERE v = 1")))
        assert ids == ({10} if region == "west" else {11})


def test_deprecated_choosers_warn_as_sqlalchemy_does(sqlite_shards: dict[str, Engine]) -> None:
    """id_chooser and query_chooser still work and raise SQLAlchemy's own deprecation warnings."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        session = ss.ShardedSession(
            shard_chooser=shard_chooser,
            id_chooser=lambda query, ident: list(SHARDS),
            query_chooser=lambda statement: list(SHARDS),
            shards=sqlite_shards,
        )
    messages = sorted(
        str(w.message) for w in seen if issubclass(w.category, exc.SADeprecationWarning)
    )
    assert [m.split(";")[0] for m in messages] == [
        "The ``id_chooser`` parameter is deprecated",
        "The ``query_chooser`` parameter is deprecated",
    ]
    with session:
        assert sorted(session.scalars(select(Item.id))) == [1, 2, 3, 4]
        assert inspect_token(session.get(Item, 3)) == "east"


def test_sessionmaker_class_and_argument_errors(sqlite_shards: dict[str, Engine]) -> None:
    """sessionmaker(class_=ss.ShardedSession, ...) works; shard_set with choosers, or neither,
    is refused at construction."""
    maker = sessionmaker(class_=ss.ShardedSession, shards=sqlite_shards, **_choosers())
    with maker() as session:
        assert session.scalars(select(Item.id).order_by(Item.id)).all() == [1, 3, 2, 4]
    shard_set = ss.ShardSet({"s0": "postgresql://u@127.0.0.1:1/a"}, strategy=ss.HashSharding())
    with pytest.raises(ss.ConfigurationError, match="shard_set= and execute_chooser"):
        ss.ShardedSession(shard_set=shard_set, execute_chooser=execute_chooser)
    with pytest.raises(ss.ConfigurationError, match="needs shard_set=ShardSet"):
        ss.ShardedSession()
    with pytest.raises(exc.ArgumentError, match="identity_chooser or id_chooser is required"):
        ss.ShardedSession(shard_chooser=shard_chooser, shards=sqlite_shards)
    shard_set.dispose()


def test_fan_out_runs_on_the_shards_concurrently(pg_shards: dict[str, Engine]) -> None:
    """A SELECT the execute_chooser sends to both shards is running on both servers at once:
    each waits on an advisory lock the test holds, seen in pg_stat_activity."""
    lock = 4343
    holders = {
        s: e.connect().execution_options(isolation_level="AUTOCOMMIT") for s, e in pg_shards.items()
    }
    for conn in holders.values():
        conn.execute(text(f"SELECT pg_advisory_lock({lock})"))
    result: list[Any] = []
    errors: list[BaseException] = []

    def query() -> None:
        try:
            with ss.ShardedSession(shards=pg_shards, **_choosers()) as session:
                gate = func.pg_advisory_xact_lock_shared(lock)
                result.extend(session.execute(select(Item.id, gate).order_by(Item.id)).all())
        except BaseException as error:  # re-raised below
            errors.append(error)

    worker = threading.Thread(target=query)
    worker.start()
    waiting: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 30
        for _ in range(600):  # bounded: at most 30 s
            for shard, conn in holders.items():
                waiting[shard] = int(
                    conn.scalar(
                        text(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND wait_event = 'advisory' AND pid <> pg_backend_pid()"
                        )
                    )
                    or 0
                )
            if all(waiting.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for conn in holders.values():
            conn.execute(text(f"SELECT pg_advisory_unlock({lock})"))
            conn.close()
        worker.join(timeout=60)
    assert not errors
    assert waiting == {"east": 1, "west": 1}
    assert [row[0] for row in result] == [1, 3, 2, 4]  # concatenated in chooser order


def test_commit_failing_on_the_second_shard_says_what_committed(
    pg_shards: dict[str, Engine],
) -> None:
    """A transaction on both shards whose COMMIT fails on the second (a deferred constraint
    trigger) raises PartialCommitError: east committed and holds the row, west holds nothing."""
    with pg_shards["west"].begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION hstest_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'hstest: refused at commit'; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE CONSTRAINT TRIGGER hstest_refuse AFTER INSERT ON hstest_items "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hstest_refuse()"
            )
        )
    try:
        with ss.ShardedSession(shards=pg_shards, **_choosers()) as session:
            session.add_all([Item(id=20, region="west", v=7), Item(id=21, region="east", v=7)])
            with pytest.raises(ss.PartialCommitError) as caught:
                session.commit()
            error = caught.value
            assert (error.committed, error.failed, error.unknown, error.rolled_back) == (
                ["east"],
                ["west"],
                [],
                [],
            )
            assert "hstest: refused at commit" in str(error.orig)
            session.rollback()
        held = {}
        for region, engine in pg_shards.items():
            with engine.connect() as conn:
                held[region] = list(conn.scalars(text("SELECT id FROM hstest_items WHERE v = 7")))
        assert held == {"east": [21], "west": []}
    finally:
        with pg_shards["west"].begin() as conn:
            conn.execute(text("DROP TABLE hstest_items"))
            conn.execute(text("DROP FUNCTION hstest_refuse()"))
