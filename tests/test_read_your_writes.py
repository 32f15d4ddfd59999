"""``ReplicaSet(read_your_writes=...)``: "session" (default), "process" and "off".

Lag is made with ``pg_wal_replay_pause()`` on both replicas; which server answered is
asked of the server (``inet_server_port()``); round trips are counted in the primary's
own statement log, for the connections of one engine only (``log_statement`` set per
connection through libpq's ``options``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import func, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.testing import wait_until

_ids = itertools.count(1)

READ = select(func.inet_server_port(), func.count()).select_from(text("ryw_items WHERE id = :id"))
LOGGED = {"options": "-c log_statement=all"}


@pytest.fixture(scope="module")
def cluster(scale_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The shared topology with a ryw_items table on the primary, replicated."""
    scale_cluster.primary.execute(
        "DROP TABLE IF EXISTS ryw_items; CREATE TABLE ryw_items (id int PRIMARY KEY)"
    )
    for replica in scale_cluster.replicas:
        replica.wait_for_replay()
    yield scale_cluster
    scale_cluster.primary.execute("DROP TABLE IF EXISTS ryw_items")


@pytest.fixture
def replay_paused(cluster: LocalCluster) -> Iterator[None]:
    """WAL replay paused on every replica for the test; resumed and caught up afterwards."""
    paused: list[PgNode] = []
    try:
        for replica in cluster.replicas:
            replica.pause_replay()
            paused.append(replica)
        yield
    finally:
        for replica in paused:
            replica.resume_replay()
            replica.wait_for_replay()


def make_set(cluster: LocalCluster, driver: str, mode: Any, **kw: Any) -> ss.ReplicaSet:
    return ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[r.url(driver) for r in cluster.replicas],
        read_your_writes=mode,
        max_wait=0.02,
        monitor_interval=0.05,
        **kw,
    )


def plain_insert(replica_set: ss.ReplicaSet) -> int:
    """Insert a row with a plain Session on the primary engine (no routing session)."""
    row_id = next(_ids)
    with Session(bind=replica_set.primary.engine) as session:
        session.execute(text("INSERT INTO ryw_items VALUES (:id)"), {"id": row_id})
        session.commit()
    return row_id


def routed_read(replica_set: ss.ReplicaSet, row_id: int) -> tuple[int, int]:
    with ss.routing_sessionmaker(replica_set)() as session:
        port, count = session.execute(READ, {"id": row_id}).one()
    return int(port), int(count)


def test_process_mode_reads_a_plain_sessions_commit(
    cluster: LocalCluster, driver: str, replay_paused: None
) -> None:
    """In "process" mode a plain Session's commit on the primary engine is seen by the next
    routing-session read (from the primary, the replicas being paused); in "session" mode the
    same read goes to a paused replica and misses the row."""
    with make_set(cluster, driver, "process") as replica_set:
        process_port, process_count = routed_read(replica_set, plain_insert(replica_set))
        with replica_set.primary.engine.begin() as conn:  # a plain Connection too
            row_id = next(_ids)
            conn.execute(text("INSERT INTO ryw_items VALUES (:id)"), {"id": row_id})
        connection_port, connection_count = routed_read(replica_set, row_id)
    with make_set(cluster, driver, "session") as replica_set:
        session_port, session_count = routed_read(replica_set, plain_insert(replica_set))
    print(
        f"\nprocess: port {process_port} saw {process_count}; session: port {session_port} "
        f"saw {session_count}"
    )
    assert (process_port, process_count) == (cluster.primary.port, 1)
    assert (connection_port, connection_count) == (cluster.primary.port, 1)
    assert session_port in {r.port for r in cluster.replicas}
    assert session_count == 0


def test_process_mode_never_tracks_an_earlier_commits_position(cluster: LocalCluster) -> None:
    """psycopg 3 connections a ReplicaSet opens read the WAL position with a routing
    session's COMMIT. A routing session that only read on the primary leaves that position
    untaken on the driver connection; a plain Session's write committed next on the same
    connection is tracked at its own commit, not at that older position, so that the next
    read in "process" mode does not go to a replica that has not replayed the write."""
    with make_set(cluster, "psycopg", "process") as replica_set:
        with ss.routing_sessionmaker(replica_set)() as session, session.use_primary():
            port, backend = session.execute(
                select(func.inet_server_port(), func.pg_backend_pid())
            ).one()
            assert port == cluster.primary.port
            session.commit()  # read-only: its position is not the session's to take
        for replica in cluster.replicas:
            replica.wait_for_replay()
        paused: list[PgNode] = []
        try:
            for replica in cluster.replicas:
                replica.pause_replay()
                paused.append(replica)
            row_id = next(_ids)
            with Session(bind=replica_set.primary.engine) as plain:
                plain.execute(text("INSERT INTO ryw_items VALUES (:id)"), {"id": row_id})
                assert plain.execute(select(func.pg_backend_pid())).scalar_one() == backend
                plain.commit()
            port, count = routed_read(replica_set, row_id)
        finally:
            for replica in paused:
                replica.resume_replay()
                replica.wait_for_replay()
    assert (port, count) == (cluster.primary.port, 1)


def test_process_mode_uses_replicas_once_they_caught_up(cluster: LocalCluster, driver: str) -> None:
    """After a commit in "process" mode, reads return to the replicas once they have
    replayed it, and a read-only transaction does not move the floor."""
    with make_set(cluster, driver, "process") as replica_set:
        row_id = plain_insert(replica_set)
        position = replica_set.process_position
        assert position is not None and position.position is not None
        floor = position.position
        for replica in cluster.replicas:
            replica.wait_for_replay()
        routed_read(replica_set, row_id)  # starts the monitor (this read may be the primary's)
        assert wait_until(lambda: all((r.replay_lsn or 0) >= floor for r in replica_set.replicas))
        ports = {routed_read(replica_set, row_id) for _ in range(20)}
        with Session(bind=replica_set.primary.engine) as session:
            session.execute(select(func.count()).select_from(text("ryw_items")))
            session.commit()
        assert position.position == floor
    assert ports <= {(r.port, 1) for r in cluster.replicas}


def test_process_mode_with_async_sessions(cluster: LocalCluster, replay_paused: None) -> None:
    """An async ReplicaSet in "process" mode: a plain AsyncSession commit on the primary
    engine is read back by an AsyncRoutingSession (from the primary, replicas paused)."""

    async def main() -> tuple[int, int]:
        async with make_set(cluster, "asyncpg", "process") as replica_set:
            row_id = next(_ids)
            async with AsyncSession(AsyncEngine(replica_set.primary.engine)) as session:
                await session.execute(text("INSERT INTO ryw_items VALUES (:id)"), {"id": row_id})
                await session.commit()
            async with ss.async_routing_sessionmaker(replica_set)() as routed:
                port, count = (await routed.execute(READ, {"id": row_id})).one()
            return int(port), int(count)

    assert asyncio.run(main()) == (cluster.primary.port, 1)


def write_then_read(replica_set: ss.ReplicaSet) -> Callable[[], None]:
    def work() -> None:
        with ss.routing_sessionmaker(replica_set)() as session:
            session.execute(text("INSERT INTO ryw_items VALUES (:id)"), {"id": next(_ids)})
            session.commit()
        with Session(bind=replica_set.primary.engine) as session:  # read-only transaction
            session.execute(select(func.count()).select_from(text("ryw_items")))
            session.commit()

    return work


@pytest.mark.parametrize(("mode", "position_queries"), [("off", 0), ("session", 1), ("process", 1)])
def test_position_queries_per_mode(
    cluster: LocalCluster, driver: str, mode: str, position_queries: int
) -> None:
    """A routing session's write transaction sends no WAL position query after COMMIT in
    "off" mode and exactly one in "session" and "process" modes; a read-only transaction
    sends none in any mode (counted in the primary's statement log)."""
    with make_set(cluster, driver, mode, connect_args=LOGGED) as replica_set:
        write_then_read(replica_set)()  # warm the pools: set-up queries are not per transaction
        logged = cluster.primary.statements_logged(write_then_read(replica_set))
        token = None
        if mode == "off":
            with ss.routing_sessionmaker(replica_set)() as session:
                session.execute(text("INSERT INTO ryw_items VALUES (:id)"), {"id": next(_ids)})
                session.commit()
                token = session.causal_token
    print(f"\n{mode}: {logged}")
    # The position query follows the COMMIT, or travels in the same message (psycopg 3).
    positions = ["pg_current_wal_insert_lsn()" in line for line in logged]
    assert sum(positions) == position_queries
    commit_at = next(i for i, line in enumerate(logged) if line.startswith("COMMIT"))
    assert positions[commit_at] or positions[commit_at + 1] or not position_queries
    assert token is None


def test_a_write_through_an_explicit_primary_bind_is_read_back(
    cluster: LocalCluster, driver: str, replay_paused: None
) -> None:
    """A routing session's INSERT sent with ``bind_arguments={"bind": primary engine}``
    counts as the transaction's write: the next read in that transaction and the first
    read after its commit both run on the primary and find the row (replicas paused)."""
    with (
        make_set(cluster, driver, "session") as replica_set,
        ss.routing_sessionmaker(replica_set)() as session,
    ):
        row_id = next(_ids)
        session.execute(
            text("INSERT INTO ryw_items VALUES (:id)"),
            {"id": row_id},
            bind_arguments={"bind": replica_set.primary.engine},
        )
        inside = tuple(session.execute(READ, {"id": row_id}).one())
        session.commit()
        after = tuple(session.execute(READ, {"id": row_id}).one())
    assert (inside, after) == ((cluster.primary.port, 1), (cluster.primary.port, 1))


def test_process_mode_reads_a_write_made_in_autocommit(
    cluster: LocalCluster, driver: str, replay_paused: None
) -> None:
    """In "process" mode an INSERT on a primary-engine connection in AUTOCOMMIT (committed
    as it ran, with no commit() after it) is seen by the next routing-session read, sync
    and asyncpg, from the primary while the replicas are paused."""
    with make_set(cluster, driver, "process") as replica_set:
        row_id = next(_ids)
        autocommit = replica_set.primary.engine.execution_options(isolation_level="AUTOCOMMIT")
        with autocommit.connect() as conn:
            conn.execute(text("INSERT INTO ryw_items VALUES (:id)"), {"id": row_id})
        sync_read = routed_read(replica_set, row_id)

    async def main() -> tuple[int, int]:
        async with make_set(cluster, "asyncpg", "process") as replica_set:
            row_id = next(_ids)
            engine = AsyncEngine(replica_set.primary.engine)
            async with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
                await conn.execute(text("INSERT INTO ryw_items VALUES (:id)"), {"id": row_id})
            async with ss.async_routing_sessionmaker(replica_set)() as routed:
                port, count = (await routed.execute(READ, {"id": row_id})).one()
            return int(port), int(count)

    assert (sync_read, asyncio.run(main())) == ((cluster.primary.port, 1),) * 2


@pytest.fixture
def limited_role(cluster: LocalCluster) -> Iterator[Callable[[str], str]]:
    """limited(url): the URL as a role that may insert into ryw_items, while nobody may run
    pg_current_wal_insert_lsn() (the grant is restored after the test)."""
    cluster.primary.execute(
        "DROP ROLE IF EXISTS ryw_limited; CREATE ROLE ryw_limited LOGIN PASSWORD 'limited';"
        "GRANT SELECT, INSERT ON ryw_items TO ryw_limited;"
        "REVOKE EXECUTE ON FUNCTION pg_current_wal_insert_lsn() FROM PUBLIC"
    )
    for replica in cluster.replicas:
        replica.wait_for_replay()

    def limited(url: str) -> str:
        limited_url = make_url(url).set(username="ryw_limited", password="limited")
        return limited_url.render_as_string(hide_password=False)

    try:
        yield limited
    finally:
        cluster.primary.execute(
            "GRANT EXECUTE ON FUNCTION pg_current_wal_insert_lsn() TO PUBLIC;"
            "DROP OWNED BY ryw_limited; DROP ROLE ryw_limited"
        )


def test_a_commit_whose_position_cannot_be_read_is_reported_and_read_back(
    cluster: LocalCluster, driver: str, limited_role: Callable[[str], str], replay_paused: None
) -> None:
    """When the primary refuses the WAL position query after a routing session's COMMIT
    (its role may not run pg_current_wal_insert_lsn()), commit() still returns (the row is
    committed), and the session's next read runs on the primary and finds the row instead
    of going to a paused replica."""
    with (
        ss.ReplicaSet(
            primary=limited_role(cluster.primary.url(driver)),
            replicas=[limited_role(r.url(driver)) for r in cluster.replicas],
            max_wait=0.02,
            monitor_interval=0.05,
        ) as replica_set,
        ss.routing_sessionmaker(replica_set)() as session,
    ):
        row_id = next(_ids)
        session.execute(text("INSERT INTO ryw_items VALUES (:id)"), {"id": row_id})
        session.commit()
        port, count = session.execute(READ, {"id": row_id}).one()
    assert (port, count) == (cluster.primary.port, 1)


def test_process_mode_sees_a_commit_whose_position_cannot_be_read(
    cluster: LocalCluster, driver: str, limited_role: Callable[[str], str], replay_paused: None
) -> None:
    """In "process" mode, a plain Session's commit after which the primary refuses the WAL
    position query still holds back the next routed read: it runs on the primary and finds
    the row instead of going to a paused replica."""
    with ss.ReplicaSet(
        primary=limited_role(cluster.primary.url(driver)),
        replicas=[limited_role(r.url(driver)) for r in cluster.replicas],
        read_your_writes="process",
        max_wait=0.02,
        monitor_interval=0.05,
    ) as replica_set:
        port, count = routed_read(replica_set, plain_insert(replica_set))
    assert (port, count) == (cluster.primary.port, 1)
