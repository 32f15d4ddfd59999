"""A fan-out over four real shard servers answers as one database, or refuses before
anything runs, and runs on every shard at once.

Merged: ORDER BY with LIMIT/OFFSET (also on an unselected column), aggregates with and
without GROUP BY, a Core table, ``selectinload()``. Refused before any server sees the
statement: DISTINCT ON, window functions, aggregates that cannot be merged, FOR UPDATE,
joined loads not joined on the shard key, and ordering of a native enum or of text
under an ICU collation. Execution: concurrency and cancellation are observed in
``pg_stat_activity`` while the test holds an advisory lock the fan-out queries wait
for (``shtest_gate()``); one shard's error or a KeyboardInterrupt cancels the others.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _sharding_models import (
    GATE_LOCK,
    SHARD_IDS,
    Base,
    Line,
    Note,
    Order,
    count_rows,
    record_servers,
    seed_orders,
    wait_for_replicas,
)
from sqlalchemy import (
    Engine,
    String,
    create_engine,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import joinedload, selectinload

import sqlalchemy_scale as ss
from sqlalchemy_scale._sa import select_distinct_on
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.sharding import (
    RangeSharding,
    ShardSet,
    sharded_sessionmaker,
)


def test_fanout_order_by_limit_offset_equals_one_database(
    make_shards: Callable[..., ShardSet],
) -> None:
    """ORDER BY ... LIMIT/OFFSET over four shards returns the globally first rows, as ORM objects."""
    shards = make_shards()
    orders = seed_orders(shards)
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
    orders = seed_orders(shards)
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
    ran_on = record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        with pytest.raises(ss.CrossShardQueryError, match="DISTINCT ON"):
            session.execute(select_distinct_on(select(Order.v), Order.v))
        with pytest.raises(ss.CrossShardQueryError, match="window"):
            session.execute(select(Order.id, func.rank().over(order_by=Order.v)))
    assert ran_on() == set()


def test_fanout_runs_on_all_shards_at_the_same_time(
    scale_cluster: LocalCluster, seeded_shards: ShardSet, primaries: dict[str, Engine]
) -> None:
    """While the test holds the gate lock, all four shards are seen waiting on it at once."""
    shards = seeded_shards
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
    scale_cluster: LocalCluster, seeded_shards: ShardSet, primaries: dict[str, Engine]
) -> None:
    """A failing shard cancels the queries still waiting on the others; the error names the shard."""
    shards = seeded_shards
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


def test_columns_only_fanout_orders_by_an_unselected_column(
    make_shards: Callable[..., ShardSet],
) -> None:
    """``select(Order.id).order_by(Order.v)`` merges on v without returning it."""
    shards = make_shards()
    orders = seed_orders(shards)
    with sharded_sessionmaker(shards)() as session:
        got = session.scalars(select(Order.id).order_by(Order.v.desc(), Order.id).limit(4)).all()
    expected = sorted(orders, key=lambda o: (o.v is not None, -(o.v or 0), o.id))[:4]
    assert got == [o.id for o in expected]


def test_fanout_with_selectinload_and_joinedload(
    scale_cluster: LocalCluster, seeded_shards: ShardSet
) -> None:
    """selectinload() works across a fan-out; a joined load over a relationship that is not
    joined on the shard key (Order.lines joins on order_id only) is refused, with or without LIMIT."""
    shards = seeded_shards
    with sharded_sessionmaker(shards)() as session:
        session.add_all([Line(customer_id=9, id=1, order_id=9, qty=5)])
        session.commit()
    with sharded_sessionmaker(shards)() as session:
        session.add_all([Line(customer_id=0, id=1, order_id=0, qty=1)])
        session.commit()
    wait_for_replicas(scale_cluster)
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


def test_unmergeable_aggregates_and_locking_reads_raise_before_running(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet]
) -> None:
    """string_agg, bool_and, stddev_pop, array_agg and FOR UPDATE across shards raise and reach no server."""
    shards = make_shards()
    ran_on = record_servers(scale_cluster)
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
    assert count_rows(primaries, "shtest_notes") == dict.fromkeys(SHARD_IDS, 1)
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


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt during the test, also where the run started with it
    ignored (``pytest ... &`` from a script: the interrupt test would otherwise hang)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_raises")
def test_interrupted_fanout_cancels_every_shard_query(
    scale_cluster: LocalCluster, seeded_shards: ShardSet, primaries: dict[str, Engine]
) -> None:
    """A KeyboardInterrupt while waiting for a fan-out cancels the queries on every shard before it propagates."""
    shards = seeded_shards
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
