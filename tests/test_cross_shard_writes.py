"""ShardSet(cross_shard_writes=...): refuse, two-phase commit or best effort, on real shards.

Rows are counted on each shard through engines separate from the ShardSet. The
failure in the middle of a best-effort commit is a deferred constraint trigger on
one shard that raises at COMMIT (after the flush succeeded there), so the
exception and what each shard holds afterwards are what PostgreSQL decided.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster

SHARD_IDS = ["s0", "s1", "s2"]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "xstest_items"
    __shard_key__ = "k"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    k: Mapped[int]


# k 0-9 on s0, 10-19 on s1, 20-29 on s2.
def _strategy() -> ss.RangeSharding:
    return ss.RangeSharding([0, 10, 20, 30])


@pytest.fixture
def primaries(scale_cluster: LocalCluster) -> Iterator[dict[str, Engine]]:
    """One engine per shard primary, separate from any ShardSet, with a fresh table."""
    engines = {s: create_engine(scale_cluster.shards[i].url()) for i, s in enumerate(SHARD_IDS)}
    for engine in engines.values():
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
    yield engines
    for engine in engines.values():
        Base.metadata.drop_all(engine)
        with engine.begin() as conn:
            conn.execute(text("DROP FUNCTION IF EXISTS xstest_refuse()"))
        engine.dispose()


@pytest.fixture(params=["psycopg2", "psycopg"])
def make_shards(
    request: pytest.FixtureRequest, scale_cluster: LocalCluster
) -> Iterator[Callable[..., ss.ShardSet]]:
    """Build ShardSets over three shard servers with the given keyword arguments (each driver)."""
    made: list[ss.ShardSet] = []

    def factory(**kw: Any) -> ss.ShardSet:
        urls = {s: scale_cluster.shards[i].url(request.param) for i, s in enumerate(SHARD_IDS)}
        shard_set = ss.ShardSet(urls, strategy=_strategy(), **kw)
        made.append(shard_set)
        return shard_set

    yield factory
    for shard_set in made:
        shard_set.dispose()


def _held(primaries: dict[str, Engine]) -> dict[str, list[int]]:
    held = {}
    for shard_id, engine in primaries.items():
        with engine.connect() as conn:
            held[shard_id] = list(conn.scalars(text("SELECT id FROM xstest_items ORDER BY id")))
    return held


def _refuse_commits_on(engine: Engine) -> None:
    """A deferred constraint trigger: inserts succeed, the COMMIT of a transaction that
    inserted raises."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE FUNCTION xstest_refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'xstest: refused at commit'; END $$"
            )
        )
        conn.execute(
            text(
                "CREATE CONSTRAINT TRIGGER xstest_refuse AFTER INSERT ON xstest_items "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION xstest_refuse()"
            )
        )


def test_refuse_is_the_default(
    make_shards: Callable[..., ss.ShardSet], primaries: dict[str, Engine]
) -> None:
    """By default the flush that writes a second shard raises CrossShardWriteError and no
    shard keeps anything."""
    shards = make_shards()
    assert shards.cross_shard_writes == "refuse"
    with ss.sharded_sessionmaker(shards)() as session:
        session.add_all([Item(id=1, k=1), Item(id=2, k=11)])
        with pytest.raises(ss.CrossShardWriteError, match="cross_shard_writes='two_phase'"):
            session.commit()
        session.rollback()
    assert _held(primaries) == {"s0": [], "s1": [], "s2": []}


def test_best_effort_commits_every_shard_without_prepare(
    make_shards: Callable[..., ss.ShardSet], primaries: dict[str, Engine]
) -> None:
    """With best_effort a transaction on three shards commits on each, with no prepared
    transaction left anywhere."""
    shards = make_shards(cross_shard_writes="best_effort")
    with ss.sharded_sessionmaker(shards)() as session:
        session.add_all([Item(id=1, k=1), Item(id=2, k=11), Item(id=3, k=21)])
        session.commit()
        # The session goes on normally: a second transaction on two shards.
        session.add_all([Item(id=4, k=2), Item(id=5, k=12)])
        session.commit()
    assert _held(primaries) == {"s0": [1, 4], "s1": [2, 5], "s2": [3]}
    for engine in primaries.values():
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM pg_prepared_xacts")) == 0


def test_best_effort_failure_in_the_middle_reports_each_shard(
    make_shards: Callable[..., ss.ShardSet], primaries: dict[str, Engine]
) -> None:
    """When the second shard's COMMIT fails, PartialCommitError says s0 committed, s1 failed
    and s2 was rolled back, and the shards hold exactly that."""
    _refuse_commits_on(primaries["s1"])
    shards = make_shards(cross_shard_writes="best_effort")
    with ss.sharded_sessionmaker(shards)() as session:
        session.add_all([Item(id=1, k=1), Item(id=2, k=11), Item(id=3, k=21)])
        session.flush()  # the trigger is deferred: every shard accepts the rows
        assert session.written_shards == SHARD_IDS
        with pytest.raises(ss.PartialCommitError) as caught:
            session.commit()
        error = caught.value
        assert (error.committed, error.failed, error.unknown, error.rolled_back) == (
            ["s0"],
            ["s1"],
            [],
            ["s2"],
        )
        assert "xstest: refused at commit" in str(error.orig)
        assert "['s0'] committed" in str(error) and "shard 's1' refused its COMMIT" in str(error)
        assert not isinstance(error, ss.CrossShardWriteError)  # that one means nothing committed
        # Committing the same transaction again cannot pretend to succeed.
        with pytest.raises(ss.CrossShardWriteError, match="roll it back"):
            session.commit()
        session.rollback()
        assert _held(primaries) == {"s0": [1], "s1": [], "s2": []}
        # After the rollback the session works again, on one shard.
        session.add(Item(id=4, k=22))
        session.commit()
    assert _held(primaries) == {"s0": [1], "s1": [], "s2": [4]}


def test_two_phase_mode_commits_through_prepare(
    make_shards: Callable[..., ss.ShardSet], primaries: dict[str, Engine]
) -> None:
    """cross_shard_writes='two_phase' is the former two_phase=True: a shard whose COMMIT
    would fail makes the whole transaction fail, and no shard keeps anything."""
    _refuse_commits_on(primaries["s1"])
    shards = make_shards(cross_shard_writes="two_phase")
    assert shards.two_phase
    with ss.sharded_sessionmaker(shards)() as session:
        session.add_all([Item(id=1, k=1), Item(id=2, k=11)])
        with pytest.raises(Exception, match="xstest: refused at commit"):
            session.commit()  # PREPARE TRANSACTION runs the deferred trigger on s1
        session.rollback()
    assert _held(primaries) == {"s0": [], "s1": [], "s2": []}
    for engine in primaries.values():
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM pg_prepared_xacts")) == 0


# -- configuration (no server) ------------------------------------------------------------------

_URLS = {"s0": "postgresql+psycopg2://u:secret@127.0.0.1:1/a", "s1": "postgresql://u@127.0.0.1:2/a"}


def test_two_phase_keyword_warns_naming_version_and_replacement() -> None:
    """ShardSet(two_phase=True) still works, with a DeprecationWarning pointing at the caller."""
    with pytest.warns(DeprecationWarning, match=r"0\.3.*cross_shard_writes='two_phase'") as seen:
        shards = ss.ShardSet(_URLS, strategy=ss.HashSharding(), two_phase=True)
    assert seen[0].filename == __file__
    assert shards.cross_shard_writes == "two_phase" and shards.two_phase
    with pytest.warns(DeprecationWarning, match="cross_shard_writes='refuse'"):
        refusing = ss.ShardSet(_URLS, strategy=ss.HashSharding(), two_phase=False)
    assert refusing.cross_shard_writes == "refuse" and not refusing.two_phase


def test_cross_shard_writes_is_checked_at_construction() -> None:
    """An unknown mode, or two_phase contradicting cross_shard_writes, raises ConfigurationError."""
    with pytest.raises(ss.ConfigurationError, match=r"'best_effort'.*got 'sometimes'"):
        ss.ShardSet(_URLS, strategy=ss.HashSharding(), cross_shard_writes="sometimes")  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ss.ConfigurationError, match="disagree"):
            ss.ShardSet(
                _URLS, strategy=ss.HashSharding(), two_phase=True, cross_shard_writes="best_effort"
            )


def test_config_key_and_its_deprecated_spelling(tmp_path: Path) -> None:
    """The TOML key cross_shard_writes sets the mode; the old two_phase key still works and warns."""
    config = tmp_path / "topology.toml"
    shards_toml = '[shards]\ns0 = "postgresql+psycopg2://u:secret@127.0.0.1:1/a"\n'
    config.write_text('strategy = "hash"\ncross_shard_writes = "best_effort"\n' + shards_toml)
    with ss.ShardSet.from_config(config) as shards:
        assert shards.cross_shard_writes == "best_effort"
    config.write_text('strategy = "hash"\ntwo_phase = true\n' + shards_toml)
    with (
        pytest.warns(DeprecationWarning, match="cross_shard_writes = 'two_phase'"),
        ss.ShardSet.from_config(config) as shards,
    ):
        assert shards.cross_shard_writes == "two_phase"
