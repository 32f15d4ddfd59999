"""Where a ShardedSession puts rows and sends statements, on four real shard servers
(shard0 with a streaming replica).

Placement: by shard key (hash, range, a directory table and its ``move()``, a Core
table's ``info``), global (``__shard__ = "all"``) and pinned tables, key values
converted to the column type, refusals that write nothing. Routing: WHERE, bound
parameters and joins on the shard key prune to the owning shards; ``shard_key=``,
``shard_id=``, ``set_shard_id()`` and ``bind_arguments`` choose one; inside a shard
that is a ReplicaSet, reads go to its replica. Rows are counted on each shard through
separate engines, and loaded rows carry ``inet_server_port()`` and
``pg_is_in_recovery()`` of the server that answered. Fan-out merging is in
``test_sharding_fanout.py``, writes across shards in ``test_cross_shard_writes.py``;
the models and fixtures are shared (``tests/_sharding_models.py``, ``tests/conftest.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _sharding_models import (
    SHARD_IDS,
    AuditEntry,
    Country,
    Line,
    Order,
    count_rows,
    events,
    range_strategy,
    record_servers,
    seed_orders,
    shard_of_port,
    wait_for_replicas,
)
from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.pool import NullPool

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.sharding import (
    DirectorySharding,
    HashSharding,
    RangeSharding,
    ShardSet,
    set_shard_id,
    sharded_sessionmaker,
)
from sqlalchemy_scale.testing import wait_until


def test_inserts_route_by_shard_key(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """Each row is stored only on the shard its customer_id hashes to."""
    shards = make_shards()
    seed_orders(shards)
    expected = dict.fromkeys(SHARD_IDS, 0)
    for i in range(40):
        expected[shards.shard_for(i % 10)] += 1
    assert count_rows(primaries, "shtest_orders") == expected
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
    assert count_rows(primaries, "shtest_orders") == dict.fromkeys(SHARD_IDS, 0)


def test_value_outside_every_range_raises_and_writes_nothing(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """RangeSharding refuses a key beyond the last bound, naming the value; nothing is written."""
    shards = make_shards(RangeSharding([0, 10, 20, 30, 40]))
    with sharded_sessionmaker(shards)() as session:
        session.add_all([Order(id=1, customer_id=5, v=1), Order(id=2, customer_id=40, v=1)])
        with pytest.raises(ss.ShardKeyError, match=r"Order\.customer_id = 40"):
            session.commit()
    assert count_rows(primaries, "shtest_orders") == dict.fromkeys(SHARD_IDS, 0)


def test_where_on_shard_key_queries_only_the_owning_shard(
    scale_cluster: LocalCluster, seeded_shards: ShardSet
) -> None:
    """``customer_id == v`` and ``IN`` run only on the owning shards (recorded per server)."""
    shards = seeded_shards
    ran_on = record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        rows = session.scalars(select(Order).where(Order.customer_id == 4)).all()
        assert {r.customer_id for r in rows} == {4} and len(rows) == 4
        assert {shard_of_port(scale_cluster)[r.served_by] for r in rows} == {"s1"}
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
    scale_cluster: LocalCluster, seeded_shards: ShardSet
) -> None:
    """A join of tables sharded on the same key, filtered on one side's key, runs on one shard."""
    shards = seeded_shards
    with sharded_sessionmaker(shards)() as session:
        session.add_all(
            [
                Line(customer_id=7, id=1, order_id=7, qty=2),
                Line(customer_id=7, id=2, order_id=17, qty=3),
            ]
        )
        session.commit()
    wait_for_replicas(scale_cluster)
    ran_on = record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        stmt = (
            select(Order.id, Line.qty)
            .join(Line, (Line.customer_id == Order.customer_id) & (Line.order_id == Order.id))
            .where(Line.customer_id == 7)
            .order_by(Order.id)
        )
        assert session.execute(stmt).all() == [(7, 2), (17, 3)]
        assert ran_on() == {"s2"}


def test_explicit_routing_options(scale_cluster: LocalCluster, seeded_shards: ShardSet) -> None:
    """shard_key=, shard_id=, set_shard_id() and bind_arguments route without a fan-out."""
    shards = seeded_shards
    ran_on = record_servers(scale_cluster)
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
    scale_cluster: LocalCluster, seeded_shards: ShardSet
) -> None:
    """get(..., shard_key=) and a primary key containing the shard key query one shard; plain get fans out."""
    shards = seeded_shards
    with sharded_sessionmaker(shards)() as session:
        session.add(Line(customer_id=4, id=1, order_id=14, qty=1))
        session.commit()
    wait_for_replicas(scale_cluster)
    ran_on = record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        order = session.get(Order, 14, shard_key=4)
        assert order is not None and inspect(order).identity_token == "s1"
        assert ran_on() == {"s1"}
        line = session.get(Line, (4, 1))
        assert line is not None and line.qty == 1 and ran_on() == {"s1"}
        other = session.get(Order, 18)
        assert other is not None and inspect(other).identity_token == "s3"
        assert ran_on() == set(SHARD_IDS)


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
    assert count_rows(primaries, "shtest_countries") == dict.fromkeys(SHARD_IDS, 2)
    for engine in primaries.values():
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT name FROM shtest_countries WHERE code = 'FR'")) == (
                "République française"
            )
    wait_for_replicas(scale_cluster)
    ran_on = record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        assert session.scalars(select(Country.code).order_by(Country.code)).all() == ["FR", "JP"]
        assert ran_on() == {shards.home_shard}


def test_orm_bulk_insert_writes_each_row_on_its_shards_primary(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """session.execute(insert(Order).returning(Order), rows) writes each row on its own
    shard's primary (s0 is a ReplicaSet): each returned row was written by that primary's
    server, in parameter order, and the committed rows are counted on each shard."""
    shards = make_shards(two_phase=True)
    rows = [{"id": i, "customer_id": (i * 7) % 30, "v": i} for i in range(20)]
    with sharded_sessionmaker(shards)() as session:
        stmt = insert(Order).returning(Order, sort_by_parameter_order=True)
        returned = [(o.id, o.served_by, o.in_recovery) for o in session.scalars(stmt, rows)]
        session.commit()
    ports = {f"s{i}": node.port for i, node in enumerate(scale_cluster.shards)}
    owners = [shards.shard_for(row["customer_id"]) for row in rows]
    assert returned == [(row["id"], ports[s], False) for row, s in zip(rows, owners, strict=True)]
    assert count_rows(primaries, "shtest_orders") == {s: owners.count(s) for s in SHARD_IDS}
    assert set(owners) == set(SHARD_IDS)  # s0, the ReplicaSet, among them


def test_table_pinned_to_one_shard(
    make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """``__shard__ = 's2'`` keeps the table's rows on s2 only."""
    shards = make_shards()
    with sharded_sessionmaker(shards)() as session:
        session.add(AuditEntry(id=1, message="hello"))
        session.commit()
        assert session.scalars(select(AuditEntry.message)).all() == ["hello"]
    assert count_rows(primaries, "shtest_audit") == {"s0": 0, "s1": 0, "s2": 1, "s3": 0}


def test_replica_routing_inside_a_shard(
    scale_cluster: LocalCluster, seeded_shards: ShardSet
) -> None:
    """In shard s0 (a ReplicaSet) reads go to its replica, writes and reads after a write to its primary."""
    shards = seeded_shards
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
        seed_orders(shards)
        with sharded_sessionmaker(shards)() as session:
            session.add(Order(id=100, customer_id=42, v=1))
            with pytest.raises(ss.ShardKeyError, match="customer_id = 42"):
                session.flush()
        before = count_rows(primaries, "shtest_orders")
        moved = directory.move(5, "s3", shards, [(Order.__table__, "customer_id")])  # type: ignore[list-item]
        assert moved == 4
        after = count_rows(primaries, "shtest_orders")
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


def test_bound_parameters_pin_the_shard(
    scale_cluster: LocalCluster, seeded_shards: ShardSet
) -> None:
    """A key given as a named bind parameter at execute time pins the query too."""
    shards = seeded_shards
    ran_on = record_servers(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        stmt = select(Order.id).where(Order.customer_id == bindparam("c")).order_by(Order.id)
        assert session.scalars(stmt, {"c": 8}).all() == [8, 18, 28, 38]
        assert ran_on() == {"s3"}


def test_core_table_placed_by_info(
    scale_cluster: LocalCluster, make_shards: Callable[..., ShardSet], primaries: dict[str, Engine]
) -> None:
    """A Core Table with info={'shard_key': ...} is pinned and fanned out like a model."""
    shards = make_shards(range_strategy())
    for customer in range(10):
        with sharded_sessionmaker(shards)() as session:
            session.execute(events.insert().values(id=customer, customer_id=customer))
            session.commit()
    assert count_rows(primaries, "shtest_events") == {"s0": 3, "s1": 3, "s2": 2, "s3": 2}
    wait_for_replicas(scale_cluster)
    with sharded_sessionmaker(shards)() as session:
        top = session.execute(select(events.c.id).order_by(events.c.id.desc()).limit(4)).all()
        assert [r.id for r in top] == [9, 8, 7, 6]
        assert session.scalar(select(func.count()).select_from(events)) == 10


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
    assert count_rows(primaries, "shtest_orders") == {s: 2 if s == owner else 0 for s in SHARD_IDS}
    with sharded_sessionmaker(shards)() as session:
        found = session.scalars(select(Order.id).where(Order.customer_id == key))
        assert sorted(found) == [1, 2]
        assert session.get(Order, 1, shard_key=str(key)) is not None
        session.add(Order(id=3, customer_id="x", v=3))  # type: ignore[arg-type]
        with pytest.raises(ss.ShardKeyError, match=r"Order\.customer_id = 'x'"):
            session.flush()


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
    assert count_rows(primaries, "shtest_countries") == dict.fromkeys(SHARD_IDS, 1)
    assert count_rows(primaries, "shtest_audit") == {"s0": 0, "s1": 0, "s2": 1, "s3": 0}


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
        assert wait_until(
            lambda: _move_connections(primaries["s1"]) + _move_connections(primaries["s2"]) == 0,
            timeout=20,
        )
        assert count_rows(primaries, "shtest_orders") == {"s0": 0, "s1": 2, "s2": 0, "s3": 0}
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
        assert count_rows(primaries, "shtest_orders") == {"s0": 0, "s1": 2, "s2": 2, "s3": 0}
        with primaries["s1"].connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f"COMMIT PREPARED '{gids[0]}'"))  # recovery, as the message says
        assert count_rows(primaries, "shtest_orders") == {"s0": 0, "s1": 0, "s2": 2, "s3": 0}
    finally:
        event.remove(source, "commit_twophase", lose_connection)
        for engine in primaries.values():  # a prepared transaction would block the teardown
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                for gid in conn.scalars(text("SELECT gid FROM pg_prepared_xacts")).all():
                    conn.execute(text(f"ROLLBACK PREPARED '{gid}'"))
