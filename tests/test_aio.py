"""Asyncio sessions (AsyncRoutingSession, AsyncShardedSession) on asyncpg and psycopg 3 async.

Every test runs its coroutine with ``asyncio.run()`` against the real topology and
asks the servers where statements ran (``inet_server_port()``,
``pg_is_in_recovery()``). Lag is made with ``pg_wal_replay_pause()``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import func, insert, literal_column, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, QueuePool

import sqlalchemy_scale as ss
from sqlalchemy_scale._async_bridge import sync_url
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.testing import wait_until

ASYNC_DRIVERS = ("asyncpg", "psycopg_async")
_ids = itertools.count(1)

WHERE = select(func.inet_server_port(), func.pg_is_in_recovery())


class Base(DeclarativeBase):
    pass


class Event(Base):
    __tablename__ = "aio_events"
    __shard_key__ = "tenant"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant: Mapped[int]


class Item(Base):
    __tablename__ = "aio_items"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


@pytest.fixture(params=ASYNC_DRIVERS)
def async_driver(request: pytest.FixtureRequest) -> str:
    """Each test runs on asyncpg and on psycopg 3's async driver."""
    return str(request.param)


@pytest.fixture(scope="module")
def cluster(scale_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The shared topology with an aio_items table on the primary, replicated."""
    scale_cluster.primary.execute(
        "DROP TABLE IF EXISTS aio_items; CREATE TABLE aio_items (id int PRIMARY KEY)"
    )
    for replica in scale_cluster.replicas:
        replica.wait_for_replay()
    yield scale_cluster
    scale_cluster.primary.execute("DROP TABLE IF EXISTS aio_items")


def async_set(cluster: LocalCluster, driver: str, **kw: Any) -> ss.ReplicaSet:
    return ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[r.url(driver) for r in cluster.replicas],
        monitor_interval=0.05,
        **kw,
    )


def test_reads_go_to_replicas_and_writes_to_the_primary(
    cluster: LocalCluster, async_driver: str
) -> None:
    """An AsyncRoutingSession sends a SELECT to a replica and an INSERT, and the rest of
    its transaction, to the primary, as the servers report."""

    async def main() -> list[tuple[int, bool]]:
        async with async_set(cluster, async_driver) as replica_set:
            Session = ss.async_routing_sessionmaker(replica_set)
            async with Session() as session:
                first = (await session.execute(WHERE)).one()
                await session.commit()
                await session.execute(
                    text("INSERT INTO aio_items VALUES (:id)"), {"id": next(_ids)}
                )
                assert session.has_written
                after_write = (await session.execute(WHERE)).one()
                await session.commit()
                assert session.causal_token is not None
            return [tuple(first), tuple(after_write)]

    (read_port, read_recovery), (write_port, write_recovery) = asyncio.run(main())
    assert read_recovery is True
    assert read_port in {r.port for r in cluster.replicas}
    assert (write_port, write_recovery) == (cluster.primary.port, False)


def test_own_commit_is_read_back_with_replay_paused(
    cluster: LocalCluster, async_driver: str, paused: Callable[[PgNode], None]
) -> None:
    """With replay paused on both replicas, a session's read after its own commit, and a
    session given its token, see the row (served by the primary)."""
    for replica in cluster.replicas:
        paused(replica)

    async def main() -> list[tuple[int, int]]:
        async with async_set(cluster, async_driver, max_wait=0.05) as replica_set:
            Session = ss.async_routing_sessionmaker(replica_set)
            row_id = next(_ids)
            read = select(func.inet_server_port(), func.count()).select_from(
                text("aio_items WHERE id = :id")
            )
            async with Session() as session:
                await session.execute(text("INSERT INTO aio_items VALUES (:id)"), {"id": row_id})
                await session.commit()
                own = (await session.execute(read, {"id": row_id})).one()
                token = session.causal_token
            async with Session(causal_token=token) as session:
                other = (await session.execute(read, {"id": row_id})).one()
            return [tuple(own), tuple(other)]

    for port, count in asyncio.run(main()):
        assert count == 1
        assert port == cluster.primary.port


def test_use_primary_pins_an_async_session(cluster: LocalCluster, async_driver: str) -> None:
    """``with session.use_primary():`` sends the session's reads to the primary, and only
    inside the block."""

    async def main() -> tuple[bool, bool]:
        async with async_set(cluster, async_driver) as replica_set:
            async with ss.async_routing_sessionmaker(replica_set)() as session:
                with session.use_primary():
                    pinned = (await session.execute(WHERE)).one()[1]
                await session.commit()
                unpinned = (await session.execute(WHERE)).one()[1]
            return pinned, unpinned

    assert asyncio.run(main()) == (False, True)


def test_the_health_monitor_sees_async_nodes_up(cluster: LocalCluster, async_driver: str) -> None:
    """The monitor probes async nodes from its thread (with a sync driver) and reports them up,
    with the roles the servers report."""

    async def main() -> list[ss.NodeHealth]:
        async with async_set(cluster, async_driver) as replica_set:
            async with ss.async_routing_sessionmaker(replica_set)() as session:
                await session.execute(WHERE)  # starts the monitor thread
            assert wait_until(lambda: all(r.replay_lsn is not None for r in replica_set.replicas))
            return replica_set.health()

    health = asyncio.run(main())
    assert [h.state for h in health] == ["up", "up", "up"]
    assert [h.server_role for h in health] == ["primary", "replica", "replica"]


@pytest.mark.parametrize(
    ("primary_driver", "replica_driver"), [("psycopg", "asyncpg"), ("asyncpg", "psycopg")]
)
def test_async_engines_are_accepted(
    cluster: LocalCluster, primary_driver: str, replica_driver: str
) -> None:
    """AsyncEngines, including create_async_engine over a postgresql+psycopg URL, make an
    async ReplicaSet whose replicas are read-only views; the user's replica engine is left
    read-write for the user's own sessions."""
    primary = create_async_engine(cluster.primary.url(primary_driver))
    replica = create_async_engine(cluster.replicas[0].url(replica_driver))

    async def main() -> tuple[bool, str]:
        async with ss.ReplicaSet(primary=primary, replicas=[replica]) as replica_set:
            assert replica_set.is_async
            for _ in range(2):  # the second session reuses the pooled connection
                async with ss.async_routing_sessionmaker(replica_set)() as session:
                    in_recovery = (await session.execute(WHERE)).one()[1]
                    read_only = await session.scalar(
                        select(func.current_setting("transaction_read_only"))
                    )
            async with AsyncSession(replica) as own:  # the same pool, the user's own engine
                own_flag = await own.run_sync(
                    lambda s: replica.dialect.get_readonly(
                        s.connection().connection.dbapi_connection
                    )
                )
            assert not own_flag  # the driver's read-only flag was put back at checkin
        await primary.dispose()
        await replica.dispose()
        return in_recovery, str(read_only)

    assert asyncio.run(main()) == (True, "on")


@pytest.mark.parametrize("preset", ["direct", "pgbouncer-transaction", "external-pooler-null"])
def test_pool_presets_build_async_engines(
    cluster: LocalCluster, async_driver: str, preset: str
) -> None:
    """Each pool preset builds working async engines (AsyncAdaptedQueuePool or NullPool)."""

    async def main() -> tuple[str, bool]:
        async with async_set(cluster, async_driver, pool=preset) as replica_set:
            async with ss.async_routing_sessionmaker(replica_set)() as session:
                in_recovery = (await session.execute(WHERE)).one()[1]
            return type(replica_set.primary.engine.pool).__name__, in_recovery

    pool_class, in_recovery = asyncio.run(main())
    assert in_recovery is True
    assert pool_class == (
        "NullPool" if preset == "external-pooler-null" else "AsyncAdaptedQueuePool"
    )


def test_mixing_sync_and_async_nodes_is_refused(cluster: LocalCluster) -> None:
    """A set with a sync primary and an async replica, a ShardSet mixing sync and async
    shards, and a session factory of the wrong kind raise ConfigurationError at once."""
    with pytest.raises(ss.ConfigurationError, match=r"replica 'replica1'.* is async"):
        ss.ReplicaSet(
            primary=cluster.primary.url("psycopg2"), replicas=[cluster.replicas[0].url("asyncpg")]
        )
    with pytest.raises(ss.ConfigurationError, match="mixes sync shards"):
        ss.ShardSet(
            {"a": cluster.shards[0].url("psycopg2"), "b": cluster.shards[1].url("asyncpg")},
            strategy=ss.HashSharding(),
        )
    sync_set = ss.ReplicaSet(primary=cluster.primary.url("psycopg2"))
    with pytest.raises(ss.ConfigurationError, match="has sync engines"):
        ss.async_routing_sessionmaker(sync_set)
    sync_set.dispose()
    async_only = ss.ReplicaSet(primary=cluster.primary.url("asyncpg"))
    with pytest.raises(ss.ConfigurationError, match="async_routing_sessionmaker"):
        ss.routing_sessionmaker(async_only)
    asyncio.run(async_only.adispose())


def test_the_caught_up_wait_does_not_block_the_event_loop(
    cluster: LocalCluster, async_driver: str, paused: Callable[[PgNode], None]
) -> None:
    """While a read waits (max_wait) for a replica to replay its token, other tasks on the
    loop keep running; then the read goes to the primary."""
    for replica in cluster.replicas:
        paused(replica)

    async def main() -> tuple[int, int, int]:
        async with async_set(cluster, async_driver, max_wait=0.3) as replica_set:
            Session = ss.async_routing_sessionmaker(replica_set)
            async with Session() as session:
                await session.execute(
                    text("INSERT INTO aio_items VALUES (:id)"), {"id": next(_ids)}
                )
                await session.commit()
                token = session.causal_token
            ticks = 0
            reading = True

            async def ticker() -> None:
                nonlocal ticks
                while reading:
                    ticks += 1
                    await asyncio.sleep(0.01)

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0)  # the ticker's first tick happens before the read starts
            before = ticks
            async with Session(causal_token=token) as session:
                port = (await session.execute(WHERE)).one()[0]
            reading = False
            await task
            return port, before, ticks

    port, before, after = asyncio.run(main())
    print(f"\nticks while the read waited for a caught-up replica: {after - before}")
    assert port == cluster.primary.port
    assert after > before + 1


@pytest.fixture
def async_shards(cluster: LocalCluster, async_driver: str) -> Iterator[Callable[[], ss.ShardSet]]:
    """make() builds a ShardSet over the four shard servers with async URLs (the test disposes
    it on its own loop); each shard holds an empty aio_events table."""
    for shard in cluster.shards:
        shard.execute(
            "DROP TABLE IF EXISTS aio_events; "
            "CREATE TABLE aio_events (id int PRIMARY KEY, tenant int NOT NULL)"
        )

    def make(**kw: Any) -> ss.ShardSet:
        return ss.ShardSet(
            {f"s{i}": shard.url(async_driver) for i, shard in enumerate(cluster.shards)},
            strategy=ss.HashSharding(),
            **kw,
        )

    yield make
    for shard in cluster.shards:
        shard.execute("DROP TABLE IF EXISTS aio_events")


def test_async_fan_out_merges_every_shard(
    cluster: LocalCluster, async_shards: Callable[[], ss.ShardSet]
) -> None:
    """Inserts route by shard key; an ordered, limited fan-out and a count across shards
    equal one database's answer, and a keyed get reads one shard."""

    async def main() -> tuple[list[int], int, int | None]:
        shard_set = async_shards()
        try:
            Session = ss.async_sharded_sessionmaker(shard_set, expire_on_commit=False)
            for i in range(1, 41):  # one transaction per row: each writes one shard
                async with Session() as session:
                    session.add(Event(id=i, tenant=i % 7))
                    await session.commit()
            async with Session() as session:
                query = select(Event.id).order_by(Event.id.desc()).limit(5)
                ids = list((await session.scalars(query)).all())
                count = (
                    await session.execute(select(func.count()).select_from(Event))
                ).scalar_one()
                event = await session.get(Event, 12, shard_key=12 % 7)
                tenant = event.tenant if event is not None else None
        finally:
            await shard_set.adispose()
        return ids, count, tenant

    ids, count, tenant = asyncio.run(main())
    per_shard = [int(s.execute("SELECT count(*) FROM aio_events")[0][0]) for s in cluster.shards]
    assert ids == [40, 39, 38, 37, 36]
    assert count == 40
    assert tenant == 12 % 7
    assert sum(per_shard) == 40
    assert sum(1 for n in per_shard if n) > 1


def test_async_orm_bulk_insert_places_each_row_and_commits_every_shard(
    cluster: LocalCluster, async_shards: Callable[..., ss.ShardSet]
) -> None:
    """An ORM bulk INSERT through an AsyncShardedSession puts each row on its own tenant's
    shard, returns the ids in parameter order, and commits on every shard (two-phase)."""
    rows = [{"id": i, "tenant": (i * 5) % 11} for i in range(1, 13)]

    async def main() -> tuple[list[int], dict[int, str]]:
        shard_set = async_shards(cross_shard_writes="two_phase")
        try:
            Session = ss.async_sharded_sessionmaker(shard_set)
            async with Session() as session:
                stmt = insert(Event).returning(Event.id, sort_by_parameter_order=True)
                ids = list((await session.scalars(stmt, rows)).all())
                await session.commit()
            owners = {row["id"]: shard_set.shard_for(row["tenant"]) for row in rows}
        finally:
            await shard_set.adispose()
        return ids, owners

    ids, owners = asyncio.run(main())
    stored = {
        int(row[0]): f"s{i}"
        for i, shard in enumerate(cluster.shards)
        for row in shard.execute("SELECT id FROM aio_events")
    }
    assert ids == [row["id"] for row in rows]
    assert stored == owners
    assert len(set(owners.values())) > 1


def test_async_fan_out_runs_on_all_shards_at_once(
    cluster: LocalCluster, async_shards: Callable[[], ss.ShardSet]
) -> None:
    """A fan-out's statements are in progress on every shard at the same moment (seen in
    each shard's pg_stat_activity), and the connections go back to the pools afterwards."""

    def watch() -> list[int]:
        for _ in range(400):  # bounded: at most ~4 s
            counts = [
                int(
                    shard.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(0.5)%'"
                        " AND pid <> pg_backend_pid()"
                    )[0][0]
                )
                for shard in cluster.shards
            ]
            if all(counts):
                return counts
            time.sleep(0.01)
        return counts

    for index, shard in enumerate(cluster.shards):  # one row per shard: one sleep each
        shard.execute(f"INSERT INTO aio_events VALUES ({index}, {index})")

    async def main() -> tuple[list[int], list[int]]:
        shard_set = async_shards()
        try:
            async with ss.async_sharded_sessionmaker(shard_set)() as session:
                watcher = asyncio.create_task(asyncio.to_thread(watch))
                await session.execute(select(Event.id, func.pg_sleep(literal_column("0.5"))))
                seen = await watcher
            checked_out = [
                shard_set.replica_set(s).primary.checked_out() for s in shard_set.shard_ids
            ]
        finally:
            await shard_set.adispose()
        return seen, checked_out

    seen, checked_out = asyncio.run(main())
    assert seen == [1, 1, 1, 1]
    assert checked_out == [0, 0, 0, 0]


@pytest.mark.fault
def test_reads_survive_a_replica_killed_under_async_load(
    scale_cluster_factory: Callable[..., LocalCluster], async_driver: str
) -> None:
    """Four tasks reading concurrently lose no read while a replica is killed; the replica
    leaves the rotation, and reads after the kill are served by the other replica."""
    cluster = scale_cluster_factory(replicas=2, shards=0, pgbouncer=False)
    victim, survivor = cluster.replicas

    async def main() -> tuple[int, int, list[int], bool, str]:
        async with async_set(cluster, async_driver) as replica_set:
            Session = ss.async_routing_sessionmaker(replica_set)
            ports: list[int] = []
            errors: list[str] = []
            failed = 0

            async def reader(count: int) -> None:
                nonlocal failed
                for _ in range(count):  # bounded
                    try:
                        async with Session() as session:
                            ports.append((await session.execute(WHERE)).one()[0])
                    except Exception as exc:
                        failed += 1
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])

            await asyncio.gather(*(reader(20) for _ in range(4)))
            load = asyncio.gather(*(reader(40) for _ in range(4)))
            await asyncio.sleep(0.02)
            await asyncio.to_thread(victim.kill)
            await load
            after = len(ports)
            await asyncio.gather(*(reader(10) for _ in range(4)))
            node = replica_set.node("replica1")
            state = next(h.state for h in replica_set.health() if h.name == "replica1")
            print(*sorted(set(errors)), sep="\n")
            return failed, len(ports), ports[after:], node.is_usable, state

    failed, served, after_kill, usable, state = asyncio.run(main())
    print(f"\nasync reads: {served + failed}, failed: {failed}, victim state: {state}")
    assert failed == 0
    assert set(after_kill) == {survivor.port}
    assert usable is False
    assert state == "down"


def test_a_failing_shard_cancels_the_async_fan_out(
    cluster: LocalCluster, async_shards: Callable[[], ss.ShardSet]
) -> None:
    """When one shard fails, the error names it, the other shards' statements are cancelled
    (none is still running on any server), and every connection goes back to its pool."""
    for index, shard in enumerate(cluster.shards):
        shard.execute(f"INSERT INTO aio_events VALUES ({index}, {index})")
    cluster.shards[2].execute("DROP TABLE aio_events")

    def running() -> list[int]:
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(5)%'"
            " AND pid <> pg_backend_pid()"
        )
        return [int(shard.execute(sql)[0][0]) for shard in cluster.shards]

    async def main() -> tuple[str | None, str, list[int]]:
        shard_set = async_shards()
        try:
            async with ss.async_sharded_sessionmaker(shard_set)() as session:
                with pytest.raises(ProgrammingError) as caught:
                    await session.execute(select(Event.id, func.pg_sleep(literal_column("5"))))
                await session.rollback()
            checked_out = [
                shard_set.replica_set(s).primary.checked_out() for s in shard_set.shard_ids
            ]
        finally:
            await shard_set.adispose()
        return getattr(caught.value, "shard_id", None), str(caught.value), checked_out

    shard_id, message, checked_out = asyncio.run(main())
    assert wait_until(lambda: running() == [0, 0, 0, 0], timeout=4)
    assert shard_id == "s2"
    assert "shard 's2'" in message
    assert checked_out == [0, 0, 0, 0]


def test_an_async_routed_get_sends_what_a_plain_async_session_sends(
    cluster: LocalCluster, async_driver: str
) -> None:
    """A primary-key get through AsyncRoutingSession sends the replica the same statements
    as a plain AsyncSession on that replica does (counted in the replica's statement log):
    routing adds no round trip, and a hot standby's transactions begin without READ ONLY
    (the standby refuses writes itself)."""
    replica = cluster.replicas[0]
    item_id = next(_ids)
    cluster.primary.execute(f"INSERT INTO aio_items VALUES ({item_id})")
    replica.wait_for_replay()
    if async_driver == "asyncpg":
        logged: dict[str, Any] = {"server_settings": {"log_statement": "all"}}
    else:
        logged = {"options": "-c log_statement=all"}

    async def routed() -> None:
        async with ss.ReplicaSet(
            primary=cluster.primary.url(async_driver),
            replicas=[replica.url(async_driver)],
            monitor=False,
            connect_args=logged,
        ) as replica_set:
            for _ in range(2):  # the second get runs on a warm connection
                async with ss.async_routing_sessionmaker(replica_set)() as session:
                    assert (await session.get(Item, item_id)) is not None

    async def plain() -> None:
        engine = create_async_engine(replica.url(async_driver), connect_args=logged)
        for _ in range(2):
            async with AsyncSession(engine) as session:
                assert (await session.get(Item, item_id)) is not None
        await engine.dispose()

    routed_statements, plain_statements = (
        replica.statements_logged(lambda: asyncio.run(routed())),
        replica.statements_logged(lambda: asyncio.run(plain())),
    )
    print(f"\nrouted: {routed_statements}\nplain: {plain_statements}")
    assert routed_statements == plain_statements
    assert routed_statements


def test_pool_presets_pick_the_asyncio_pool_class() -> None:
    """pool_preset() gives AsyncAdaptedQueuePool for asyncpg and psycopg_async, QueuePool for
    sync drivers, and keeps NullPool for the external-pooler preset."""
    for driver in ("asyncpg", "psycopg_async"):
        assert ss.pool_preset("direct", driver=driver)["poolclass"] is AsyncAdaptedQueuePool
        assert ss.pool_preset("pgbouncer-session", driver=driver)["poolclass"] is (
            AsyncAdaptedQueuePool
        )
        assert ss.pool_preset("external-pooler-null", driver=driver)["poolclass"] is NullPool
    assert ss.pool_preset("direct", driver="psycopg")["poolclass"] is QueuePool


def test_async_sessions_through_transaction_pgbouncer(
    cluster: LocalCluster, async_driver: str
) -> None:
    """Through PgBouncer in transaction mode with the pgbouncer-transaction preset, four
    tasks' write-and-read transactions all succeed (no prepared-statement clashes on shared
    server connections), reach the primary, and the guard refuses a session-level SET."""
    assert cluster.pgbouncer is not None and cluster.pgbouncer.mode == "transaction"

    async def main() -> tuple[set[int], int]:
        async with ss.ReplicaSet(
            primary=cluster.pgbouncer.url(async_driver), pool="pgbouncer-transaction"
        ) as replica_set:
            Session = ss.async_routing_sessionmaker(replica_set)
            ports: set[int] = set()

            async def work() -> None:
                for _ in range(15):  # bounded
                    async with Session() as session:
                        await session.execute(
                            text("INSERT INTO aio_items VALUES (:id)"), {"id": next(_ids)}
                        )
                        ports.add((await session.execute(WHERE)).one()[0])
                        await session.commit()

            await asyncio.gather(*(work() for _ in range(4)))
            async with Session() as session:
                with pytest.raises(ss.TransactionPoolingError):
                    await session.execute(text("SET statement_timeout = 1000"))
            return ports, len(ports)

    ports, _ = asyncio.run(main())
    assert ports == {cluster.primary.port}


def test_use_primary_pins_only_its_own_task(cluster: LocalCluster, async_driver: str) -> None:
    """Two tasks interleaved on one loop: the one inside ``with ss.use_primary():`` (nested
    twice) reads from the primary, the other at the same moment from a replica."""

    async def main() -> dict[str, list[bool]]:
        async with async_set(cluster, async_driver) as replica_set:
            Session = ss.async_routing_sessionmaker(replica_set)
            seen: dict[str, list[bool]] = {"pinned": [], "free": []}
            turn = asyncio.Event()

            async def pinned() -> None:
                with ss.use_primary(), ss.use_primary():
                    async with Session() as session:
                        seen["pinned"].append((await session.execute(WHERE)).one()[1])
                        turn.set()  # the other task reads while this block is open
                        await asyncio.sleep(0.05)
                        seen["pinned"].append((await session.execute(WHERE)).one()[1])

            async def free() -> None:
                await turn.wait()
                async with Session() as session:
                    seen["free"].append((await session.execute(WHERE)).one()[1])

            await asyncio.gather(pinned(), free())
            return seen

    assert asyncio.run(main()) == {"pinned": [False, False], "free": [True]}


def test_async_shard_with_a_replica_routes_inside_the_shard(
    cluster: LocalCluster, async_driver: str
) -> None:
    """In an async ShardSet whose shard s0 is a ReplicaSet, a read on s0 goes to its replica
    and a read after a write in the same transaction to its primary (asked of the servers)."""
    shard0, replica0 = cluster.shards[0], cluster.shard_replicas[0][0]

    async def main() -> tuple[tuple[int, bool], tuple[int, bool]]:
        shard_set = ss.ShardSet(
            {
                "s0": ss.ReplicaSet(
                    primary=shard0.url(async_driver), replicas=[replica0.url(async_driver)]
                ),
                "s1": cluster.shards[1].url(async_driver),
            },
            strategy=ss.HashSharding(),
        )
        try:
            async with ss.async_sharded_sessionmaker(shard_set)() as session:
                on_s0 = WHERE.execution_options(shard_id="s0")
                port, in_recovery = (await session.execute(on_s0)).one()
                await session.execute(
                    text("SELECT pg_advisory_xact_lock(1)"), bind_arguments={"shard_id": "s0"}
                )
                port_after, in_recovery_after = (await session.execute(on_s0)).one()
                await session.rollback()
        finally:
            await shard_set.adispose()
        return (port, in_recovery), (port_after, in_recovery_after)

    read, after_write = asyncio.run(main())
    assert read == (replica0.port, True)
    assert after_write == (shard0.port, False)


def test_the_monitor_probes_async_nodes_with_a_sync_driver_on_the_same_url() -> None:
    """sync_url() keeps host, port, database and credentials, maps asyncpg to psycopg2 (ssl
    becoming sslmode, asyncpg-only keys dropped) and psycopg async to psycopg."""
    url = make_url(
        "postgresql+asyncpg://app:s3cret@db1:6543/app?ssl=require&prepared_statement_cache_size=0"
    )
    assert sync_url(url).render_as_string(hide_password=False) == (
        "postgresql+psycopg2://app:s3cret@db1:6543/app?sslmode=require"
    )
    psycopg = make_url("postgresql+psycopg_async://app:s3cret@db1/app?connect_timeout=3")
    assert sync_url(psycopg).render_as_string(hide_password=False) == (
        "postgresql+psycopg://app:s3cret@db1/app?connect_timeout=3"
    )


def test_causal_context_is_per_task(
    cluster: LocalCluster, async_driver: str, paused: Callable[[PgNode], None]
) -> None:
    """Each task's ``causal_context`` collects its own sessions' commits: a task that wrote
    reads its row back in a new session (replicas paused), a concurrent task that did not
    write keeps no token and reads from a replica."""
    for replica in cluster.replicas:
        paused(replica)

    async def main() -> tuple[tuple[str | None, int, int], tuple[str | None, bool]]:
        async with async_set(cluster, async_driver, max_wait=0.02) as replica_set:
            Session = ss.async_routing_sessionmaker(replica_set)
            wrote = asyncio.Event()

            async def writer() -> tuple[str | None, int, int]:
                row_id = next(_ids)
                with ss.causal_context() as ctx:
                    async with Session() as session:
                        await session.execute(
                            text("INSERT INTO aio_items VALUES (:id)"), {"id": row_id}
                        )
                        await session.commit()
                    wrote.set()
                    async with Session() as session:  # a new session, no token of its own
                        port, count = (
                            await session.execute(
                                select(func.inet_server_port(), func.count()).select_from(
                                    text("aio_items WHERE id = :id")
                                ),
                                {"id": row_id},
                            )
                        ).one()
                return ctx.token, port, count

            async def bystander() -> tuple[str | None, bool]:
                with ss.causal_context() as ctx:
                    await wrote.wait()
                    async with Session() as session:
                        in_recovery = (await session.execute(WHERE)).one()[1]
                return ctx.token, in_recovery

            return await asyncio.gather(writer(), bystander())

    (token, port, count), (other_token, other_in_recovery) = asyncio.run(main())
    assert token is not None
    assert (port, count) == (cluster.primary.port, 1)
    assert other_token is None
    assert other_in_recovery is True
