"""Writes across shards, on real shard servers: ShardSet(cross_shard_writes=...) refuses
(the default, before anything runs), commits with two-phase commit, or commits shard by
shard (best effort); and what no mode allows (moving a row by changing its shard key,
a write after the commit step).

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
from _sharding_models import SHARD_IDS as ORDER_SHARD_IDS
from _sharding_models import (
    Country,
    Order,
    build_shard_set,
    count_rows,
    fresh_tables,
    prepared_count,
    range_strategy,
    seed_orders,
)
from sqlalchemy import Engine, event, insert, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.sharding import ShardSet, sharded_sessionmaker

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
def item_primaries(scale_cluster: LocalCluster) -> Iterator[dict[str, Engine]]:
    """One engine per shard primary, separate from any ShardSet, with a fresh xstest_items
    table (the ``shtest_*`` tables: the ``primaries`` fixture of conftest.py)."""
    engines = fresh_tables(scale_cluster, Base.metadata, SHARD_IDS)
    yield engines
    for engine in engines.values():
        Base.metadata.drop_all(engine)
        with engine.begin() as conn:
            conn.execute(text("DROP FUNCTION IF EXISTS xstest_refuse()"))
        engine.dispose()


@pytest.fixture(params=["psycopg2", "psycopg"])
def make_item_shards(
    request: pytest.FixtureRequest, scale_cluster: LocalCluster
) -> Iterator[Callable[..., ss.ShardSet]]:
    """Build ShardSets over three shard servers (their primaries only) with the given
    keyword arguments (each driver)."""
    made: list[ss.ShardSet] = []

    def factory(**kw: Any) -> ss.ShardSet:
        shard_set = build_shard_set(
            scale_cluster,
            driver=request.param,
            shard_ids=SHARD_IDS,
            strategy=_strategy(),
            with_replicas=False,
            **kw,
        )
        made.append(shard_set)
        return shard_set

    yield factory
    for shard_set in made:
        shard_set.dispose()


def _held(item_primaries: dict[str, Engine]) -> dict[str, list[int]]:
    held = {}
    for shard_id, engine in item_primaries.items():
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
    make_item_shards: Callable[..., ss.ShardSet], item_primaries: dict[str, Engine]
) -> None:
    """By default the flush that writes a second shard raises CrossShardWriteError and no
    shard keeps anything."""
    shards = make_item_shards()
    assert shards.cross_shard_writes == "refuse"
    with ss.sharded_sessionmaker(shards)() as session:
        session.add_all([Item(id=1, k=1), Item(id=2, k=11)])
        with pytest.raises(ss.CrossShardWriteError, match="cross_shard_writes='two_phase'"):
            session.commit()
        session.rollback()
    assert _held(item_primaries) == {"s0": [], "s1": [], "s2": []}


def test_best_effort_commits_every_shard_without_prepare(
    make_item_shards: Callable[..., ss.ShardSet], item_primaries: dict[str, Engine]
) -> None:
    """With best_effort a transaction on three shards commits on each, with no prepared
    transaction left anywhere."""
    shards = make_item_shards(cross_shard_writes="best_effort")
    with ss.sharded_sessionmaker(shards)() as session:
        session.add_all([Item(id=1, k=1), Item(id=2, k=11), Item(id=3, k=21)])
        session.commit()
        # The session goes on normally: a second transaction on two shards.
        session.add_all([Item(id=4, k=2), Item(id=5, k=12)])
        session.commit()
    assert _held(item_primaries) == {"s0": [1, 4], "s1": [2, 5], "s2": [3]}
    for engine in item_primaries.values():
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM pg_prepared_xacts")) == 0


def test_best_effort_failure_in_the_middle_reports_each_shard(
    make_item_shards: Callable[..., ss.ShardSet], item_primaries: dict[str, Engine]
) -> None:
    """When the second shard's COMMIT fails, PartialCommitError says s0 committed, s1 failed
    and s2 was rolled back, and the shards hold exactly that."""
    _refuse_commits_on(item_primaries["s1"])
    shards = make_item_shards(cross_shard_writes="best_effort")
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
        assert _held(item_primaries) == {"s0": [1], "s1": [], "s2": []}
        # After the rollback the session works again, on one shard.
        session.add(Item(id=4, k=22))
        session.commit()
    assert _held(item_primaries) == {"s0": [1], "s1": [], "s2": [4]}


def test_two_phase_mode_commits_through_prepare(
    make_item_shards: Callable[..., ss.ShardSet], item_primaries: dict[str, Engine]
) -> None:
    """cross_shard_writes='two_phase' is the former two_phase=True: a shard whose COMMIT
    would fail makes the whole transaction fail, and no shard keeps anything."""
    _refuse_commits_on(item_primaries["s1"])
    shards = make_item_shards(cross_shard_writes="two_phase")
    assert shards.two_phase
    with ss.sharded_sessionmaker(shards)() as session:
        session.add_all([Item(id=1, k=1), Item(id=2, k=11)])
        with pytest.raises(Exception, match="xstest: refused at commit"):
            session.commit()  # PREPARE TRANSACTION runs the deferred trigger on s1
        session.rollback()
    assert _held(item_primaries) == {"s0": [], "s1": [], "s2": []}
    for engine in item_primaries.values():
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


# -- the shtest_* orders on four shards (fixtures primaries, make_shards: conftest.py) ------------


def test_cross_shard_write_without_two_phase_raises_and_commits_nothing(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """Writing two shards in one transaction raises CrossShardWriteError; neither shard keeps a row."""
    shards = make_shards(range_strategy())
    with sharded_sessionmaker(shards)() as session:
        session.add_all([Order(id=1, customer_id=1, v=1), Order(id=2, customer_id=9, v=1)])
        with pytest.raises(ss.CrossShardWriteError, match="already wrote to shard"):
            session.commit()
    assert count_rows(primaries, "shtest_orders") == dict.fromkeys(ORDER_SHARD_IDS, 0)


def test_cross_shard_write_commits_with_two_phase_commit(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """With two_phase=True both shards commit through PREPARE TRANSACTION; none stays prepared."""
    shards = make_shards(range_strategy(), two_phase=True)
    prepared_seen: list[int] = []

    def before_commit_prepared(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("COMMIT PREPARED"):
            prepared_seen.append(prepared_count(primaries["s0"]) + prepared_count(primaries["s3"]))

    for shard_id in ("s0", "s3"):
        engine = shards.replica_set(shard_id).primary.engine
        event.listen(engine, "before_cursor_execute", before_commit_prepared)
    with sharded_sessionmaker(shards)() as session:
        session.add_all([Order(id=1, customer_id=1, v=1), Order(id=2, customer_id=9, v=1)])
        session.flush()
        assert session.written_shards == ["s0", "s3"]
        session.commit()
    assert prepared_seen == [2, 1]  # both prepared before the first COMMIT PREPARED
    counts = count_rows(primaries, "shtest_orders")
    assert (counts["s0"], counts["s3"], counts["s1"], counts["s2"]) == (1, 1, 0, 0)
    assert prepared_count(primaries["s0"]) + prepared_count(primaries["s3"]) == 0


def test_changing_the_shard_key_of_a_stored_row_is_refused(
    seeded_shards: ShardSet,
) -> None:
    """Moving a row by editing its shard key raises instead of leaving it on the wrong shard."""
    shards = seeded_shards
    with sharded_sessionmaker(shards, default_role="primary")() as session:
        order = session.get(Order, 1, shard_key=1)
        assert order is not None
        order.customer_id = 9
        with pytest.raises(ss.CrossShardWriteError, match="changing a shard key moves the row"):
            session.flush()


def test_bulk_update_across_shards(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """A bulk UPDATE on every shard needs two-phase commit; without it, nothing changes."""
    for two_phase in (False, True):
        shards = make_shards(range_strategy(), two_phase=two_phase)
        if not two_phase:
            seed_orders(shards)
        with sharded_sessionmaker(shards)() as session:
            stmt = update(Order).where(Order.v.is_(None)).values(v=-1)
            if two_phase:
                session.execute(stmt)
                session.commit()
            else:
                with pytest.raises(ss.CrossShardWriteError):
                    session.execute(stmt)
        changed = 0
        for engine in primaries.values():
            with engine.connect() as conn:
                changed += int(
                    conn.scalar(text("SELECT count(*) FROM shtest_orders WHERE v = -1")) or 0
                )
        assert changed == (6 if two_phase else 0)


def test_bulk_statements_on_a_global_table_reach_every_shard(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """insert()/update() of a global table run on every shard in one two-phase transaction."""
    shards = make_shards(two_phase=True)
    with sharded_sessionmaker(shards)() as session:
        session.execute(Country.__table__.insert(), [{"code": "DE", "name": "Germany"}])  # type: ignore[attr-defined]
        session.execute(update(Country).where(Country.code == "DE").values(name="Deutschland"))
        session.commit()
    for engine in primaries.values():
        with engine.connect() as conn:
            assert conn.execute(text("SELECT code, name FROM shtest_countries")).all() == [
                ("DE", "Deutschland")
            ]


def test_retried_write_to_a_second_shard_is_refused_again(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """Without two-phase commit, retrying a refused write to a second shard raises again and commit keeps only the first shard's row."""
    shards = make_shards(range_strategy())
    with sharded_sessionmaker(shards)() as session:
        session.execute(insert(Order).values(id=1, customer_id=1, v=1))
        for _ in range(2):
            with pytest.raises(ss.CrossShardWriteError, match="already wrote to shard"):
                session.execute(insert(Order).values(id=2, customer_id=9, v=1))
        assert session.written_shards == ["s0"]
        session.commit()
    assert count_rows(primaries, "shtest_orders") == {"s0": 1, "s1": 0, "s2": 0, "s3": 0}


def test_refused_update_across_shards_runs_on_no_shard(
    seeded_shards: ShardSet, primaries: dict[str, Engine]
) -> None:
    """Without two-phase commit, an UPDATE spanning shards is refused before any shard runs it, so a later commit changes nothing."""
    shards = seeded_shards
    with sharded_sessionmaker(shards)() as session:
        with pytest.raises(ss.CrossShardWriteError, match="nothing was run"):
            session.execute(update(Order).values(v=-5))
        session.commit()
    for engine in primaries.values():
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM shtest_orders WHERE v = -5")) == 0


def test_write_after_the_commit_step_is_refused(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """An object added by a before_commit listener that runs after the two-phase commit raises instead of being lost."""
    shards = make_shards(range_strategy(), two_phase=True)

    class LateSession(ss.ShardedSession):
        pass

    def add_late_row(session: Any) -> None:
        if not session.info.get("added"):
            session.info["added"] = True
            session.add(Order(id=99, customer_id=1, v=99))

    event.listen(LateSession, "before_commit", add_late_row)
    maker = sessionmaker(class_=LateSession, shard_set=shards)
    with maker() as session:
        session.add_all([Order(id=1, customer_id=1, v=1), Order(id=2, customer_id=9, v=1)])
        with pytest.raises(ss.CrossShardWriteError, match="was refused"):
            session.commit()
    assert count_rows(primaries, "shtest_orders") == {"s0": 1, "s1": 0, "s2": 0, "s3": 1}
    assert prepared_count(primaries["s0"]) + prepared_count(primaries["s3"]) == 0


def test_update_that_sets_the_shard_key_is_refused(
    seeded_shards: ShardSet, primaries: dict[str, Engine]
) -> None:
    """UPDATE ... SET (values or ordered_values) and ON CONFLICT DO UPDATE of the shard key raise ShardKeyError and leave the row where it was."""
    shards = seeded_shards
    before = count_rows(primaries, "shtest_orders")
    with sharded_sessionmaker(shards)() as session:
        with pytest.raises(ss.ShardKeyError, match="sets its shard key"):
            session.execute(
                update(Order).where(Order.customer_id == 1, Order.id == 1).values(customer_id=9)
            )
        # SQLAlchemy 2.0 keeps ordered_values() apart from values()
        ordered = update(Order).where(Order.customer_id == 1, Order.id == 1)
        with pytest.raises(ss.ShardKeyError, match="sets its shard key"):
            session.execute(ordered.ordered_values((Order.v, 2), (Order.customer_id, 9)))
        upsert = pg_insert(Order).values(id=1, customer_id=1, v=1)
        with pytest.raises(ss.ShardKeyError, match="sets its shard key"):
            session.execute(
                upsert.on_conflict_do_update(index_elements=["id"], set_={"customer_id": 9})
            )
        session.commit()
    assert count_rows(primaries, "shtest_orders") == before
    with primaries["s0"].connect() as conn:
        assert conn.scalar(text("SELECT customer_id FROM shtest_orders WHERE id = 1")) == 1


def test_a_write_through_connection_to_a_second_shard_is_refused(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """Without two-phase commit, session.connection(bind_arguments={"shard_id": ...}) to a
    second shard is refused before anything is sent on it, as session.execute() would be."""
    shards = make_shards(range_strategy())
    with sharded_sessionmaker(shards)() as session:
        session.add(Order(id=1, customer_id=1, v=1))
        session.flush()
        with pytest.raises(ss.CrossShardWriteError, match="already wrote to shard"):
            session.connection(bind_arguments={"shard_id": "s3"})
        session.commit()
    assert count_rows(primaries, "shtest_orders") == {"s0": 1, "s1": 0, "s2": 0, "s3": 0}


def test_a_write_through_connection_takes_part_in_two_phase_commit(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """With two-phase commit, a shard written through session.connection() is prepared and
    committed with the others."""
    shards = make_shards(range_strategy(), two_phase=True)
    with sharded_sessionmaker(shards)() as session:
        session.add(Order(id=1, customer_id=1, v=1))
        session.flush()
        conn = session.connection(bind_arguments={"shard_id": "s3"})
        conn.execute(insert(Order).values(id=2, customer_id=9, v=1))
        assert session.written_shards == ["s0", "s3"]
        session.commit()
    assert count_rows(primaries, "shtest_orders") == {"s0": 1, "s1": 0, "s2": 0, "s3": 1}
