"""ShardedSession against four real shard servers (shard0 with a streaming replica).

Every routing rule is checked on the servers: rows are counted on each shard
through separate engines, loaded rows carry ``inet_server_port()`` and
``pg_is_in_recovery()`` of the server that answered, and concurrency and
cancellation are observed in ``pg_stat_activity`` while the test holds an
advisory lock the fan-out queries wait for.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    Engine,
    Enum,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    column_property,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.pool import NullPool

import sqlalchemy_scale as ss
from sqlalchemy_scale._sa import select_distinct_on
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.sharding import (
    DirectorySharding,
    HashSharding,
    RangeSharding,
    ShardSet,
    set_shard_id,
    sharded_sessionmaker,
)

GATE_LOCK = 4242  # advisory lock id the gate() SQL function waits for


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "shtest_orders"
    __shard_key__ = "customer_id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int]
    v: Mapped[int | None]
    served_by: Mapped[int] = column_property(func.inet_server_port())
    in_recovery: Mapped[bool] = column_property(func.pg_is_in_recovery())
    lines: Mapped[list[Line]] = relationship(order_by="Line.id")


class Line(Base):
    __tablename__ = "shtest_lines"
    __shard_key__ = "customer_id"

    customer_id: Mapped[int] = mapped_column(primary_key=True)
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("shtest_orders.id"))
    qty: Mapped[int]


class Country(Base):
    __tablename__ = "shtest_countries"
    __shard__ = "all"

    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str]


class AuditEntry(Base):
    __tablename__ = "shtest_audit"
    __shard__ = "s2"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    message: Mapped[str]


class Note(Base):
    __tablename__ = "shtest_notes"
    __shard_key__ = "customer_id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int]
    body: Mapped[str]
    mood: Mapped[str] = mapped_column(Enum("zeta", "alpha", "mid", name="shtest_mood"))


# A Core table placed through Table.info rather than a model.
events = Table(
    "shtest_events",
    Base.metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("customer_id", Integer, nullable=False),
    info={"shard_key": "customer_id"},
)

SHARD_IDS = ["s0", "s1", "s2", "s3"]
_LISTENERS: list[Callable[..., None]] = []


@pytest.fixture
def primaries(scale_cluster: LocalCluster) -> Iterator[dict[str, Engine]]:
    """One engine per shard primary, separate from any ShardSet, with fresh tables."""
    engines = {s: create_engine(scale_cluster.shards[i].url()) for i, s in enumerate(SHARD_IDS)}
    for engine in engines.values():
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE OR REPLACE FUNCTION shtest_gate() RETURNS boolean LANGUAGE plpgsql "
                    f"VOLATILE AS $$ BEGIN PERFORM pg_advisory_xact_lock_shared({GATE_LOCK}); "
                    "RETURN true; END $$"
                )
            )
    _wait_for_replicas(scale_cluster)
    yield engines
    for engine in engines.values():
        Base.metadata.drop_all(engine)
        with engine.begin() as conn:
            conn.execute(text("DROP FUNCTION IF EXISTS shtest_gate()"))
        engine.dispose()


def _wait_for_replicas(cluster: LocalCluster) -> None:
    for index, replicas in cluster.shard_replicas.items():
        # Commit an XID on the primary first: that flushes WAL records written outside a
        # commit (page pruning by a SELECT), which walsenders do not send until flushed and
        # which wait_for_replay() (insert LSN) would otherwise wait for.
        cluster.shards[index].execute("SELECT txid_current()")
        for replica in replicas:
            replica.wait_for_replay()


@pytest.fixture(
    params=[("psycopg2", "direct"), ("psycopg", "direct"), ("psycopg2", "pgbouncer")],
    ids=["psycopg2", "psycopg", "psycopg2-pgbouncer"],
)
def make_shards(
    request: pytest.FixtureRequest, scale_cluster: LocalCluster, primaries: dict[str, Engine]
) -> Iterator[Callable[..., ShardSet]]:
    """Build ShardSets over the four shards (each driver, direct and through PgBouncer in
    transaction mode); shard s0 is a ReplicaSet with its replica."""
    driver, via = request.param
    bouncer = scale_cluster.pgbouncer if via == "pgbouncer" else None

    def url(node: Any) -> str:
        if bouncer is None:
            return str(node.url(driver))
        return bouncer.url(driver, database=node.name)

    made: list[ShardSet] = []

    def factory(strategy: Any = None, *, two_phase: bool = False) -> ShardSet:
        targets: dict[str, Any] = {}
        for i, shard_id in enumerate(SHARD_IDS):
            node = scale_cluster.shards[i]
            replicas = scale_cluster.shard_replicas.get(i, [])
            if replicas:
                targets[shard_id] = ss.ReplicaSet(
                    primary=url(node), replicas=[url(r) for r in replicas], name=shard_id
                )
            else:
                targets[shard_id] = url(node)
        shard_set = ShardSet(
            targets,
            strategy=strategy or HashSharding(),
            cross_shard_writes="two_phase" if two_phase else "refuse",
        )
        made.append(shard_set)
        return shard_set

    yield factory
    for shard_set in made:
        shard_set.dispose()


def _counts(primaries: dict[str, Engine], table: str) -> dict[str, int]:
    counts = {}
    for shard_id, engine in primaries.items():
        with engine.connect() as conn:
            counts[shard_id] = int(conn.scalar(text(f"SELECT count(*) FROM {table}")) or 0)
    return counts


def _ports(scale_cluster: LocalCluster) -> dict[int, str]:
    return {node.port: SHARD_IDS[i] for i, node in enumerate(scale_cluster.shards)}


def _seed(shards: ShardSet, n: int = 40) -> list[Order]:
    orders = [
        Order(id=i, customer_id=i % 10, v=None if i % 7 == 0 else (i * 37) % 23) for i in range(n)
    ]
    by_shard: dict[str, list[Order]] = {}
    for order in orders:
        by_shard.setdefault(shards.shard_for(order.customer_id), []).append(order)
    for group in by_shard.values():  # one transaction per shard: no two-phase commit needed
        with sharded_sessionmaker(shards, expire_on_commit=False)() as session:
            session.add_all(group)
            session.commit()
    return orders


def test_inserts_route_by_shard_key(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """Each row is stored only on the shard its customer_id hashes to."""
    shards = make_shards()
    _seed(shards)
    expected = dict.fromkeys(SHARD_IDS, 0)
    for i in range(40):
        expected[shards.shard_for(i % 10)] += 1
    assert _counts(primaries, "shtest_orders") == expected
    assert sum(1 for n in expected.values() if n) >= 3  # the data really spans shards


def test_missing_shard_key_raises_and_writes_nothing(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """An object without a shard key raises ShardKeyError naming model and column; no shard gets a row."""
    shards = make_shards()
    with sharded_sessionmaker(shards)() as session:
        session.add(Order(id=1, customer_id=1, v=1))
        session.add(Order(id=2, customer_id=None, v=2))
        with pytest.raises(ss.ShardKeyError, match=r"Order\.customer_id is missing") as info:
            session.commit()
    assert (info.value.model, info.value.column, info.value.value) == ("Order", "customer_id", None)
    assert _counts(primaries, "shtest_orders") == dict.fromkeys(SHARD_IDS, 0)


def test_value_outside_every_range_raises_and_writes_nothing(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """RangeSharding refuses a key beyond the last bound, naming the value; nothing is written."""
    shards = make_shards(RangeSharding([0, 10, 20, 30, 40]))
    with sharded_sessionmaker(shards)() as session:
        session.add_all([Order(id=1, customer_id=5, v=1), Order(id=2, customer_id=40, v=1)])
        with pytest.raises(ss.ShardKeyError, match=r"Order\.customer_id = 40"):
            session.commit()
    assert _counts(primaries, "shtest_orders") == dict.fromkeys(SHARD_IDS, 0)


def test_where_on_shard_key_queries_only_the_owning_shard(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet]
) -> None:
    """``customer_id == v`` and ``IN`` run only on the owning shards (recorded per server)."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    _seed(shards)
    _wait_for_replicas(scale_cluster)
    ran_on = _record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        rows = session.scalars(select(Order).where(Order.customer_id == 4)).all()
        assert {r.customer_id for r in rows} == {4} and len(rows) == 4
        assert {_ports(scale_cluster)[r.served_by] for r in rows} == {"s1"}
        assert ran_on() == {"s1"}
        rows = session.scalars(select(Order).where(Order.customer_id.in_([1, 9]))).all()
        assert {r.customer_id for r in rows} == {1, 9}
        assert ran_on() == {"s0", "s3"}
        count = session.scalar(
            select(func.count())
            .select_from(Order)
            .where((Order.customer_id == 6) | (Order.customer_id == 7))
        )
        assert count == 8
        assert ran_on() == {"s2"}
        session.scalars(select(Order).where(Order.v == 3)).all()
        assert ran_on() == set(SHARD_IDS)


def test_join_on_the_shard_key_is_pinned(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet]
) -> None:
    """A join of tables sharded on the same key, filtered on one side's key, runs on one shard."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    _seed(shards)
    with sharded_sessionmaker(shards)() as session:
        session.add_all(
            [
                Line(customer_id=7, id=1, order_id=7, qty=2),
                Line(customer_id=7, id=2, order_id=17, qty=3),
            ]
        )
        session.commit()
    _wait_for_replicas(scale_cluster)
    ran_on = _record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        stmt = (
            select(Order.id, Line.qty)
            .join(Line, (Line.customer_id == Order.customer_id) & (Line.order_id == Order.id))
            .where(Line.customer_id == 7)
            .order_by(Order.id)
        )
        assert session.execute(stmt).all() == [(7, 2), (17, 3)]
        assert ran_on() == {"s2"}


def test_explicit_routing_options(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet]
) -> None:
    """shard_key=, shard_id=, set_shard_id() and bind_arguments route without a fan-out."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    _seed(shards)
    _wait_for_replicas(scale_cluster)
    ran_on = _record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        rows = session.scalars(select(Order).execution_options(shard_key=9)).all()
        assert {r.customer_id for r in rows} == {8, 9} and ran_on() == {"s3"}
        session.scalars(select(Order).execution_options(shard_id="s1")).all()
        assert ran_on() == {"s1"}
        session.scalars(select(Order).options(set_shard_id("s2"))).all()
        assert ran_on() == {"s2"}
        session.execute(select(Order.id), bind_arguments={"shard_id": "s0"}).all()
        assert ran_on() == {"s0"}


def test_get_by_key_with_shard_key_or_composite_pk(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet]
) -> None:
    """get(..., shard_key=) and a primary key containing the shard key query one shard; plain get fans out."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    _seed(shards)
    with sharded_sessionmaker(shards)() as session:
        session.add(Line(customer_id=4, id=1, order_id=14, qty=1))
        session.commit()
    _wait_for_replicas(scale_cluster)
    ran_on = _record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        order = session.get(Order, 14, shard_key=4)
        assert order is not None and inspect(order).identity_token == "s1"
        assert ran_on() == {"s1"}
        line = session.get(Line, (4, 1))
        assert line is not None and line.qty == 1 and ran_on() == {"s1"}
        other = session.get(Order, 18)
        assert other is not None and inspect(other).identity_token == "s3"
        assert ran_on() == set(SHARD_IDS)


def test_fanout_order_by_limit_offset_equals_one_database(
    make_shards: Callable[..., ShardSet],
) -> None:
    """ORDER BY ... LIMIT/OFFSET over four shards returns the globally first rows, as ORM objects."""
    shards = make_shards()
    orders = _seed(shards)
    with sharded_sessionmaker(shards)() as session:
        got = session.scalars(select(Order).order_by(Order.v.desc(), Order.id).limit(3)).all()
        expected = sorted(orders, key=lambda o: (o.v is not None, -(o.v or 0), o.id))[:3]
        assert [o.id for o in got] == [o.id for o in expected]
        assert all(isinstance(o, Order) for o in got)
        assert [inspect(o).identity_token for o in got] == [
            shards.shard_for(o.customer_id) for o in got
        ]
        page = session.execute(
            select(Order.id, Order.v)
            .order_by(Order.v.asc().nulls_first(), Order.id)
            .limit(5)
            .offset(4)
        ).all()
        ref = sorted(orders, key=lambda o: (o.v is not None, o.v or 0, o.id))[4:9]
        assert page == [(o.id, o.v) for o in ref]


def test_fanout_aggregates_equal_one_database(make_shards: Callable[..., ShardSet]) -> None:
    """count/sum/min/max/avg, with and without GROUP BY, are merged rather than listed per shard."""
    shards = make_shards()
    orders = _seed(shards)
    values = [o.v for o in orders if o.v is not None]
    with sharded_sessionmaker(shards)() as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 40
        total, low, high, mean = session.execute(
            select(func.sum(Order.v), func.min(Order.v), func.max(Order.v), func.avg(Order.v))
        ).one()
        assert (total, low, high) == (sum(values), min(values), max(values))
        assert float(mean) == pytest.approx(sum(values) / len(values))
        rows = session.execute(
            select(Order.customer_id, func.count().label("n"), func.sum(Order.v))
            .group_by(Order.customer_id)
            .order_by(Order.customer_id.desc())
            .limit(3)
        ).all()
        expected = []
        for customer in (9, 8, 7):
            mine = [o for o in orders if o.customer_id == customer]
            expected.append((customer, len(mine), sum(o.v for o in mine if o.v is not None)))
        assert [tuple(r) for r in rows] == expected


def test_unmergeable_fanout_raises_before_running(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet]
) -> None:
    """DISTINCT ON or a window function across shards raises CrossShardQueryError and sends nothing."""
    shards = make_shards()
    ran_on = _record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        with pytest.raises(ss.CrossShardQueryError, match="DISTINCT ON"):
            session.execute(select_distinct_on(select(Order.v), Order.v))
        with pytest.raises(ss.CrossShardQueryError, match="window"):
            session.execute(select(Order.id, func.rank().over(order_by=Order.v)))
    assert ran_on() == set()


def test_fanout_runs_on_all_shards_at_the_same_time(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """While the test holds the gate lock, all four shards are seen waiting on it at once."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))  # rows on every shard
    _seed(shards)
    _wait_for_replicas(scale_cluster)
    with _gate_closed(scale_cluster) as waiting:
        outcome: list[Any] = []
        worker = threading.Thread(target=_fan_out_gated, args=(shards, outcome))
        worker.start()
        seen = _poll(lambda: waiting() == set(SHARD_IDS))
        last_seen = waiting()
    worker.join(30)
    assert seen, f"shards waiting at the same time: {last_seen}"
    assert outcome == [40]


def test_error_on_one_shard_cancels_the_others_and_names_it(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """A failing shard cancels the queries still waiting on the others; the error names the shard."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))  # rows on every shard
    _seed(shards)
    _wait_for_replicas(scale_cluster)
    with primaries["s2"].begin() as conn:
        conn.execute(text("DROP FUNCTION shtest_gate()"))
    outcome: list[Any] = []
    with _gate_closed(scale_cluster) as waiting:
        worker = threading.Thread(target=_fan_out_gated, args=(shards, outcome))
        worker.start()
        worker.join(30)
        still_waiting = waiting()  # the lock is still held: only a cancel frees them
    assert not worker.is_alive()
    assert still_waiting == set()
    error = outcome[0]
    assert isinstance(error, ProgrammingError)
    assert "on shard 's2'" in str(error) and error.shard_id == "s2"  # type: ignore[attr-defined]


def test_cross_shard_write_without_two_phase_raises_and_commits_nothing(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """Writing two shards in one transaction raises CrossShardWriteError; neither shard keeps a row."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    with sharded_sessionmaker(shards)() as session:
        session.add_all([Order(id=1, customer_id=1, v=1), Order(id=2, customer_id=9, v=1)])
        with pytest.raises(ss.CrossShardWriteError, match="already wrote to shard"):
            session.commit()
    assert _counts(primaries, "shtest_orders") == dict.fromkeys(SHARD_IDS, 0)


def test_cross_shard_write_commits_with_two_phase_commit(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """With two_phase=True both shards commit through PREPARE TRANSACTION; none stays prepared."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]), two_phase=True)
    prepared_seen: list[int] = []

    def before_commit_prepared(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("COMMIT PREPARED"):
            prepared_seen.append(_prepared(primaries["s0"]) + _prepared(primaries["s3"]))

    for shard_id in ("s0", "s3"):
        engine = shards.replica_set(shard_id).primary.engine
        event.listen(engine, "before_cursor_execute", before_commit_prepared)
    with sharded_sessionmaker(shards)() as session:
        session.add_all([Order(id=1, customer_id=1, v=1), Order(id=2, customer_id=9, v=1)])
        session.flush()
        assert session.written_shards == ["s0", "s3"]
        session.commit()
    assert prepared_seen == [2, 1]  # both prepared before the first COMMIT PREPARED
    counts = _counts(primaries, "shtest_orders")
    assert (counts["s0"], counts["s3"], counts["s1"], counts["s2"]) == (1, 1, 0, 0)
    assert _prepared(primaries["s0"]) + _prepared(primaries["s3"]) == 0


def test_global_table_is_written_to_every_shard_and_read_from_one(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """``__shard__ = 'all'`` rows land on every shard (2PC) and reads go to a single shard."""
    shards = make_shards(two_phase=True)
    with sharded_sessionmaker(shards)() as session:
        session.add_all([Country(code="FR", name="France"), Country(code="JP", name="Japan")])
        session.commit()
        country = session.get(Country, "FR")
        assert country is not None
        country.name = "République française"
        session.commit()
    assert _counts(primaries, "shtest_countries") == dict.fromkeys(SHARD_IDS, 2)
    for engine in primaries.values():
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT name FROM shtest_countries WHERE code = 'FR'")) == (
                "République française"
            )
    _wait_for_replicas(scale_cluster)
    ran_on = _record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        assert session.scalars(select(Country.code).order_by(Country.code)).all() == ["FR", "JP"]
        assert ran_on() == {shards.home_shard}


def test_table_pinned_to_one_shard(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """``__shard__ = 's2'`` keeps the table's rows on s2 only."""
    shards = make_shards()
    with sharded_sessionmaker(shards)() as session:
        session.add(AuditEntry(id=1, message="hello"))
        session.commit()
        assert session.scalars(select(AuditEntry.message)).all() == ["hello"]
    assert _counts(primaries, "shtest_audit") == {"s0": 0, "s1": 0, "s2": 1, "s3": 0}


def test_replica_routing_inside_a_shard(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet]
) -> None:
    """In shard s0 (a ReplicaSet) reads go to its replica, writes and reads after a write to its primary."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    _seed(shards)
    _wait_for_replicas(scale_cluster)
    primary_port = scale_cluster.shards[0].port
    replica_port = scale_cluster.shard_replicas[0][0].port
    with sharded_sessionmaker(shards)() as session:
        order = session.scalars(select(Order).where(Order.customer_id == 1).limit(1)).one()
        assert (order.served_by, order.in_recovery) == (replica_port, True)
        forced = session.scalars(
            select(Order.served_by)
            .where(Order.customer_id == 1)
            .execution_options(use_primary=True)
        ).first()
        assert forced == primary_port
        with session.use_primary():
            assert (
                session.scalar(select(Order.served_by).where(Order.customer_id == 2))
                == primary_port
            )
        order.v = 99
        session.flush()
        after = session.scalar(select(Order.served_by).where(Order.customer_id == 1).limit(1))
        assert after == primary_port
        session.commit()
    with sharded_sessionmaker(shards)() as session:
        # A write to shard s1 pins only s1's reads: s0's reads stay on its replica.
        session.add(Order(id=1000, customer_id=4, v=1))
        session.flush()
        assert session.written_shards == ["s1"]
        read = session.scalar(select(Order.served_by).where(Order.customer_id == 2).limit(1))
        assert read == replica_port


def test_changing_the_shard_key_of_a_stored_row_is_refused(
    make_shards: Callable[..., ShardSet],
) -> None:
    """Moving a row by editing its shard key raises instead of leaving it on the wrong shard."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    _seed(shards)
    with sharded_sessionmaker(shards, default_role="primary")() as session:
        order = session.get(Order, 1, shard_key=1)
        assert order is not None
        order.customer_id = 9
        with pytest.raises(ss.CrossShardWriteError, match="changing a shard key moves the row"):
            session.flush()


def test_directory_sharding_table_and_move(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """Keys are placed by a directory table; move() relocates one key's rows atomically."""
    directory_engine = create_engine(scale_cluster.primary.url())
    directory = DirectorySharding(directory_engine, table="shtest_directory", ttl=60)
    try:
        directory.table.drop(directory_engine, checkfirst=True)
        directory.create_table()
        for customer in range(10):
            directory.assign(customer, SHARD_IDS[customer % 4])
        shards = make_shards(directory, two_phase=True)
        _seed(shards)
        with sharded_sessionmaker(shards)() as session:
            session.add(Order(id=100, customer_id=42, v=1))
            with pytest.raises(ss.ShardKeyError, match="customer_id = 42"):
                session.flush()
        before = _counts(primaries, "shtest_orders")
        moved = directory.move(5, "s3", shards, [(Order.__table__, "customer_id")])  # type: ignore[list-item]
        assert moved == 4
        after = _counts(primaries, "shtest_orders")
        assert after["s1"] == before["s1"] - 4 and after["s3"] == before["s3"] + 4
        assert directory(5, SHARD_IDS) == "s3"
        with sharded_sessionmaker(shards)() as session:
            ids = session.scalars(
                select(Order.id).where(Order.customer_id == 5).order_by(Order.id)
            ).all()
            assert ids == [5, 15, 25, 35]
    finally:
        directory.table.drop(directory_engine, checkfirst=True)
        directory_engine.dispose()


# -- helpers -----------------------------------------------------------------------------------


def _record_servers(cluster: LocalCluster) -> Callable[[], set[str]]:
    """Record which shard servers (primary or replica) receive SELECTs from the next statements."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine as EngineClass

    # Direct connections are told apart by port, PgBouncer ones by database (the node's name).
    where: dict[Any, str] = {}
    for i, node in enumerate(cluster.shards):
        where[node.port] = where[node.name] = SHARD_IDS[i]
    for i, replicas in cluster.shard_replicas.items():
        for replica in replicas:
            where[replica.port] = where[replica.name] = SHARD_IDS[i]
    bouncer = cluster.pgbouncer.port if cluster.pgbouncer is not None else None
    seen: set[str] = set()

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        url = conn.engine.url
        key = url.database if url.port == bouncer else url.port
        if key in where and statement.lstrip().upper().startswith("SELECT"):
            seen.add(where[key])

    event.listen(EngineClass, "before_cursor_execute", before)
    _LISTENERS.append(before)

    def take() -> set[str]:
        found = set(seen)
        seen.clear()
        return found

    return take


@pytest.fixture(autouse=True)
def _forget_listeners() -> Iterator[None]:
    """Remove the server recorders a test installed."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine as EngineClass

    yield
    while _LISTENERS:
        event.remove(EngineClass, "before_cursor_execute", _LISTENERS.pop())


class _gate_closed:
    """Hold the gate advisory lock on every shard server; yields who is waiting on it."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.nodes = [*cluster.shards, *cluster.shard_replicas.get(0, [])]
        self.names = [*SHARD_IDS, "s0"]
        self.engines: list[Engine] = []
        self.conns: list[Any] = []

    def __enter__(self) -> Callable[[], set[str]]:
        for node in self.nodes:
            # Autocommit: a session-level advisory lock needs no open transaction, and an open
            # transaction on the standby could hold back its replay.
            engine = create_engine(node.url(), isolation_level="AUTOCOMMIT")
            self.engines.append(engine)
            conn = engine.connect()
            conn.execute(text(f"SELECT pg_advisory_lock({GATE_LOCK})"))
            self.conns.append(conn)

        def waiting() -> set[str]:
            found = set()
            for name, conn in zip(self.names, self.conns, strict=True):
                n = conn.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND wait_event = 'advisory' AND pid <> pg_backend_pid()"
                    )
                )
                if n:
                    found.add(name)
            return found

        return waiting

    def __exit__(self, *exc: object) -> None:
        for conn in self.conns:
            conn.execute(text(f"SELECT pg_advisory_unlock({GATE_LOCK})"))
            conn.close()
        for engine in self.engines:
            engine.dispose()


def _fan_out_gated(shards: ShardSet, outcome: list[Any]) -> None:
    try:
        with sharded_sessionmaker(shards)() as session:
            outcome.append(
                session.scalar(select(func.count()).select_from(Order).where(func.shtest_gate()))
            )
    except Exception as exc:
        outcome.append(exc)


def _poll(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def _prepared(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text("SELECT count(*) FROM pg_prepared_xacts")) or 0)


# -- more routing and fan-out shapes -------------------------------------------------------------


def test_bound_parameters_pin_the_shard(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet]
) -> None:
    """A key given as a named bind parameter at execute time pins the query too."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    _seed(shards)
    _wait_for_replicas(scale_cluster)
    ran_on = _record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        stmt = select(Order.id).where(Order.customer_id == bindparam("c")).order_by(Order.id)
        assert session.scalars(stmt, {"c": 8}).all() == [8, 18, 28, 38]
        assert ran_on() == {"s3"}


def test_columns_only_fanout_orders_by_an_unselected_column(
    make_shards: Callable[..., ShardSet],
) -> None:
    """``select(Order.id).order_by(Order.v)`` merges on v without returning it."""
    shards = make_shards()
    orders = _seed(shards)
    with sharded_sessionmaker(shards)() as session:
        got = session.scalars(select(Order.id).order_by(Order.v.desc(), Order.id).limit(4)).all()
    expected = sorted(orders, key=lambda o: (o.v is not None, -(o.v or 0), o.id))[:4]
    assert got == [o.id for o in expected]


def test_core_table_placed_by_info(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """A Core Table with info={'shard_key': ...} is pinned and fanned out like a model."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    for customer in range(10):
        with sharded_sessionmaker(shards)() as session:
            session.execute(events.insert().values(id=customer, customer_id=customer))
            session.commit()
    assert _counts(primaries, "shtest_events") == {"s0": 3, "s1": 3, "s2": 2, "s3": 2}
    _wait_for_replicas(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        top = session.execute(select(events.c.id).order_by(events.c.id.desc()).limit(4)).all()
        assert [r.id for r in top] == [9, 8, 7, 6]
        assert session.scalar(select(func.count()).select_from(events)) == 10


def test_fanout_with_selectinload_and_joinedload(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet]
) -> None:
    """selectinload() works across a fan-out; a joined load over a relationship that is not
    joined on the shard key (Order.lines joins on order_id only) is refused, with or without LIMIT."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    _seed(shards)
    with sharded_sessionmaker(shards)() as session:
        session.add_all([Line(customer_id=9, id=1, order_id=9, qty=5)])
        session.commit()
    with sharded_sessionmaker(shards)() as session:
        session.add_all([Line(customer_id=0, id=1, order_id=0, qty=1)])
        session.commit()
    _wait_for_replicas(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        stmt = select(Order).options(selectinload(Order.lines)).order_by(Order.id).limit(10)
        orders = session.scalars(stmt).all()
        assert [o.id for o in orders] == list(range(10))
        assert [(o.id, [line.qty for line in o.lines]) for o in orders if o.lines] == [
            (0, [1]),
            (9, [5]),
        ]
        with pytest.raises(ss.CrossShardQueryError, match="selectinload"):
            session.scalars(select(Order).options(joinedload(Order.lines)).limit(3)).unique().all()
        with pytest.raises(ss.CrossShardQueryError, match="without equating their shard keys"):
            session.scalars(select(Order).options(joinedload(Order.lines))).unique().all()


def test_bulk_update_across_shards(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """A bulk UPDATE on every shard needs two-phase commit; without it, nothing changes."""
    for two_phase in (False, True):
        shards = make_shards(RangeSharding([0, 3, 6, 8, 10]), two_phase=two_phase)
        if not two_phase:
            _seed(shards)
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


def test_text_statements_need_an_explicit_shard(
    make_shards: Callable[..., ShardSet], scale_cluster: LocalCluster
) -> None:
    """text() cannot be placed, so it raises unless a shard id is given."""
    shards = make_shards()
    with sharded_sessionmaker(shards)() as session:
        with pytest.raises(ss.CrossShardQueryError, match="text"):
            session.execute(text("SELECT count(*) FROM shtest_orders"))
        port = session.scalar(text("SELECT inet_server_port()"), bind_arguments={"shard_id": "s3"})
        assert port == scale_cluster.shards[3].port


# -- regressions ---------------------------------------------------------------------------------


def test_retried_write_to_a_second_shard_is_refused_again(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """Without two-phase commit, retrying a refused write to a second shard raises again and commit keeps only the first shard's row."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    with sharded_sessionmaker(shards)() as session:
        session.execute(insert(Order).values(id=1, customer_id=1, v=1))
        for _ in range(2):
            with pytest.raises(ss.CrossShardWriteError, match="already wrote to shard"):
                session.execute(insert(Order).values(id=2, customer_id=9, v=1))
        assert session.written_shards == ["s0"]
        session.commit()
    assert _counts(primaries, "shtest_orders") == {"s0": 1, "s1": 0, "s2": 0, "s3": 0}


def test_refused_update_across_shards_runs_on_no_shard(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """Without two-phase commit, an UPDATE spanning shards is refused before any shard runs it, so a later commit changes nothing."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    _seed(shards)
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
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]), two_phase=True)

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
    assert _counts(primaries, "shtest_orders") == {"s0": 1, "s1": 0, "s2": 0, "s3": 1}
    assert _prepared(primaries["s0"]) + _prepared(primaries["s3"]) == 0


def test_shard_key_values_are_converted_to_the_column_type(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """A key given as the string "k" for an Integer column is stored and found on the shard of k; "x" raises."""
    shards = make_shards()
    key = next(k for k in range(100) if shards.shard_for(k) != shards.shard_for(str(k)))
    owner = shards.shard_for(key)
    with sharded_sessionmaker(shards)() as session:
        session.add(Order(id=1, customer_id=str(key), v=1))  # type: ignore[arg-type]
        session.commit()
        session.execute(insert(Order).values(id=2, customer_id=str(key), v=2))
        session.commit()
    assert _counts(primaries, "shtest_orders") == {s: 2 if s == owner else 0 for s in SHARD_IDS}
    with sharded_sessionmaker(shards)() as session:
        found = session.scalars(select(Order.id).where(Order.customer_id == key))
        assert sorted(found) == [1, 2]
        assert session.get(Order, 1, shard_key=str(key)) is not None
        session.add(Order(id=3, customer_id="x", v=3))  # type: ignore[arg-type]
        with pytest.raises(ss.ShardKeyError, match=r"Order\.customer_id = 'x'"):
            session.flush()


def test_update_that_sets_the_shard_key_is_refused(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """UPDATE ... SET (values or ordered_values) and ON CONFLICT DO UPDATE of the shard key raise ShardKeyError and leave the row where it was."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    _seed(shards)
    before = _counts(primaries, "shtest_orders")
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
    assert _counts(primaries, "shtest_orders") == before
    with primaries["s0"].connect() as conn:
        assert conn.scalar(text("SELECT customer_id FROM shtest_orders WHERE id = 1")) == 1


def test_shard_key_option_does_not_move_global_or_pinned_tables(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """execution_options(shard_key=...) leaves global inserts on every shard and pinned ones on their shard."""
    shards = make_shards(two_phase=True)
    with sharded_sessionmaker(shards)() as session:
        session.execute(
            insert(Country).values(code="DE", name="Germany").execution_options(shard_key=5)
        )
        session.execute(insert(AuditEntry).values(id=1, message="m").execution_options(shard_key=5))
        session.commit()
    assert _counts(primaries, "shtest_countries") == dict.fromkeys(SHARD_IDS, 1)
    assert _counts(primaries, "shtest_audit") == {"s0": 0, "s1": 0, "s2": 1, "s3": 0}


def test_unmergeable_aggregates_and_locking_reads_raise_before_running(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet]
) -> None:
    """string_agg, bool_and, stddev_pop, array_agg and FOR UPDATE across shards raise and reach no server."""
    shards = make_shards()
    ran_on = _record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        for call in (
            func.string_agg(func.cast(Order.v, String), ","),
            func.bool_and(Order.v > 3),
            func.stddev_pop(Order.v),
            func.array_agg(Order.v),
        ):
            with pytest.raises(ss.CrossShardQueryError, match="cannot be merged"):
                session.execute(select(call))
        with pytest.raises(ss.CrossShardQueryError, match="FOR UPDATE"):
            session.execute(select(Order).with_for_update())
    assert ran_on() == set()


def _add_notes(shards: ShardSet) -> None:
    notes = [("apple", "zeta"), ("Banana", "alpha"), ("cherry", "mid"), ("Zed", "zeta")]
    for i, (body, mood) in enumerate(notes):
        with sharded_sessionmaker(shards)() as session:
            session.add(Note(id=i, customer_id=i, body=body, mood=mood))
            session.commit()


def test_native_enum_comparisons_across_shards_raise(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """ORDER BY, min() and max() of a PostgreSQL enum across shards raise; text under C still merges."""
    shards = make_shards(RangeSharding([0, 1, 2, 3, 10]))
    _add_notes(shards)
    assert _counts(primaries, "shtest_notes") == dict.fromkeys(SHARD_IDS, 1)
    with sharded_sessionmaker(shards)() as session:
        with pytest.raises(ss.CrossShardQueryError, match="enum"):
            session.execute(select(Note.mood).order_by(Note.mood))
        with pytest.raises(ss.CrossShardQueryError, match="enum"):
            session.execute(select(func.min(Note.mood)))
        with pytest.raises(ss.CrossShardQueryError, match="enum"):
            session.execute(select(func.max(Note.mood)))
        assert session.execute(select(func.min(Note.body), func.max(Note.body))).one() == (
            "Banana",
            "cherry",
        )


@pytest.fixture
def icu_shards(scale_cluster: LocalCluster) -> Iterator[ShardSet]:
    """A ShardSet over a database per shard server whose default collation comes from ICU."""
    urls = {}
    for i, shard_id in enumerate(SHARD_IDS):
        admin = create_engine(scale_cluster.shards[i].url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS shtest_icu")
            conn.exec_driver_sql(
                "CREATE DATABASE shtest_icu TEMPLATE template0 LOCALE_PROVIDER icu "
                "ICU_LOCALE 'und' LOCALE 'C'"
            )
        admin.dispose()
        urls[shard_id] = make_url(scale_cluster.shards[i].url()).set(database="shtest_icu")
    shards = ShardSet(urls, strategy=RangeSharding([0, 1, 2, 3, 10]))
    for shard_id in SHARD_IDS:
        Base.metadata.create_all(shards.replica_set(shard_id).primary.engine)
    yield shards
    shards.dispose()
    for i in range(len(SHARD_IDS)):
        admin = create_engine(scale_cluster.shards[i].url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS shtest_icu WITH (FORCE)")
        admin.dispose()


def test_text_comparisons_under_an_icu_database_collation_raise(icu_shards: ShardSet) -> None:
    """ORDER BY, min() and max() of text across shards raise when the databases sort with ICU."""
    _add_notes(icu_shards)
    with sharded_sessionmaker(icu_shards)() as session:
        with pytest.raises(ss.CrossShardQueryError, match="icu provider"):
            session.execute(select(Note.body).order_by(Note.body))
        with pytest.raises(ss.CrossShardQueryError, match="icu provider"):
            session.execute(select(func.min(Note.body)))
        with pytest.raises(ss.CrossShardQueryError, match="icu provider"):
            session.execute(select(func.max(Note.body)))
        # The servers agree that ICU does not sort by code point.
        assert session.scalars(
            text("SELECT x FROM unnest(ARRAY['apple', 'Banana']) x ORDER BY x"),
            bind_arguments={"shard_id": "s0"},
        ).all() == ["apple", "Banana"]


def test_interrupted_fanout_cancels_every_shard_query(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """A KeyboardInterrupt while waiting for a fan-out cancels the queries on every shard before it propagates."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))  # rows on every shard
    _seed(shards)
    _wait_for_replicas(scale_cluster)
    main = threading.get_ident()
    seen: list[bool] = []
    # Closed after the gate opens: without the cancel, closing would wait for the queries.
    with sharded_sessionmaker(shards)() as session, _gate_closed(scale_cluster) as waiting:

        def interrupt_when_all_wait() -> None:
            seen.append(_poll(lambda: waiting() == set(SHARD_IDS)))
            signal.pthread_kill(main, signal.SIGINT)

        interrupter = threading.Thread(target=interrupt_when_all_wait)
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            session.scalar(select(func.count()).select_from(Order).where(func.shtest_gate()))
        interrupter.join(30)
        still_waiting = waiting()  # the lock is still held: only a cancel frees them
    assert seen == [True]
    assert still_waiting == set()


def test_one_engine_for_two_shards_is_refused(scale_cluster: LocalCluster) -> None:
    """Giving the same Engine for two shards raises ConfigurationError when the ShardSet is built."""
    engine = create_engine(scale_cluster.shards[0].url())
    try:
        with pytest.raises(ss.ConfigurationError, match="same Engine"):
            ShardSet({"s0": engine, "s1": engine}, strategy=HashSharding())
        with engine.connect() as conn:  # the engine itself is a working server
            assert conn.scalar(text("SELECT inet_server_port()")) == scale_cluster.shards[0].port
    finally:
        engine.dispose()


@pytest.fixture
def move_setup(
    scale_cluster: LocalCluster, primaries: dict[str, Engine]
) -> Iterator[tuple[DirectorySharding, ShardSet]]:
    """A directory placing customer 5 on s1 (two orders there) and a ShardSet whose engines
    open one server connection per checkout, named ``shtest_move``."""
    directory_engine = create_engine(scale_cluster.primary.url())
    directory = DirectorySharding(directory_engine, table="shtest_directory", ttl=0)
    directory.table.drop(directory_engine, checkfirst=True)
    directory.create_table()
    directory.assign(5, "s1")
    with primaries["s1"].begin() as conn:
        conn.execute(text("INSERT INTO shtest_orders (id, customer_id) VALUES (5, 5), (15, 5)"))
    shards = ShardSet(
        {s: scale_cluster.shards[i].url() for i, s in enumerate(SHARD_IDS)},
        strategy=directory,
        poolclass=NullPool,
        connect_args={"application_name": "shtest_move"},
    )
    yield directory, shards
    shards.dispose()
    directory.table.drop(directory_engine, checkfirst=True)
    directory_engine.dispose()


def _move_connections(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shtest_move'")
            )
            or 0
        )


def test_failed_move_closes_its_shard_connections(
    move_setup: tuple[DirectorySharding, ShardSet], primaries: dict[str, Engine]
) -> None:
    """A move whose copy fails leaves no connection open on either shard server and moves nothing."""
    directory, shards = move_setup
    extra = Table("shtest_move_extra", MetaData(), Column("customer_id", Integer))
    extra.create(primaries["s1"])  # missing on s2: the copy fails there
    with primaries["s1"].begin() as conn:
        conn.execute(extra.insert(), [{"customer_id": 5}])
    try:
        with pytest.raises(ProgrammingError, match="shtest_move_extra") as info:
            directory.move(
                5, "s2", shards, [(Order.__table__, "customer_id"), (extra, "customer_id")]
            )  # type: ignore[list-item]
        assert info.value is not None  # the traceback (and move()'s frame) is still alive
        # A closed connection's server process exits just after the client leaves: poll.
        assert _poll(
            lambda: _move_connections(primaries["s1"]) + _move_connections(primaries["s2"]) == 0
        )
        assert _counts(primaries, "shtest_orders") == {"s0": 0, "s1": 2, "s2": 0, "s3": 0}
        assert directory(5, SHARD_IDS) == "s1"
    finally:
        extra.drop(primaries["s1"])


def test_move_commits_forward_when_one_commit_prepared_fails(
    move_setup: tuple[DirectorySharding, ShardSet], primaries: dict[str, Engine]
) -> None:
    """When the source's COMMIT PREPARED fails, the others still commit and CommitOutcomeUnknown names the shard and gid."""
    directory, shards = move_setup
    source = shards.replica_set("s1").primary.engine

    def lose_connection(conn: Any, xid: Any, is_prepared: bool) -> None:
        pid = conn.connection.dbapi_connection.info.backend_pid
        with primaries["s1"].connect() as admin:  # waits until the backend has exited
            assert admin.scalar(text(f"SELECT pg_terminate_backend({pid}, 10000)"))

    event.listen(source, "commit_twophase", lose_connection)
    try:
        with pytest.raises(ss.CommitOutcomeUnknown) as info:
            directory.move(5, "s2", shards, [(Order.__table__, "customer_id")])  # type: ignore[list-item]
        with primaries["s1"].connect() as conn:
            gids = conn.scalars(text("SELECT gid FROM pg_prepared_xacts")).all()
        assert info.value.node == "s1" and len(gids) == 1 and gids[0] in str(info.value)
        assert directory(5, SHARD_IDS) == "s2"  # the directory's part committed
        assert _counts(primaries, "shtest_orders") == {"s0": 0, "s1": 2, "s2": 2, "s3": 0}
        with primaries["s1"].connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"COMMIT PREPARED '{gids[0]}'"))  # recovery, as the message says
        assert _counts(primaries, "shtest_orders") == {"s0": 0, "s1": 0, "s2": 2, "s3": 0}
    finally:
        event.remove(source, "commit_twophase", lose_connection)
        for engine in primaries.values():  # a prepared transaction would block the teardown
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                for gid in conn.scalars(text("SELECT gid FROM pg_prepared_xacts")).all():
                    conn.execute(text(f"ROLLBACK PREPARED '{gid}'"))


def test_a_write_through_connection_to_a_second_shard_is_refused(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """Without two-phase commit, session.connection(bind_arguments={"shard_id": ...}) to a
    second shard is refused before anything is sent on it, as session.execute() would be."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]))
    with sharded_sessionmaker(shards)() as session:
        session.add(Order(id=1, customer_id=1, v=1))
        session.flush()
        with pytest.raises(ss.CrossShardWriteError, match="already wrote to shard"):
            session.connection(bind_arguments={"shard_id": "s3"})
        session.commit()
    assert _counts(primaries, "shtest_orders") == {"s0": 1, "s1": 0, "s2": 0, "s3": 0}


def test_a_write_through_connection_takes_part_in_two_phase_commit(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """With two-phase commit, a shard written through session.connection() is prepared and
    committed with the others."""
    shards = make_shards(RangeSharding([0, 3, 6, 8, 10]), two_phase=True)
    with sharded_sessionmaker(shards)() as session:
        session.add(Order(id=1, customer_id=1, v=1))
        session.flush()
        conn = session.connection(bind_arguments={"shard_id": "s3"})
        conn.execute(insert(Order).values(id=2, customer_id=9, v=1))
        assert session.written_shards == ["s0", "s3"]
        session.commit()
    assert _counts(primaries, "shtest_orders") == {"s0": 1, "s1": 0, "s2": 0, "s3": 1}
