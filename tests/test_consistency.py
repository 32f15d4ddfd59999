"""Causal (read-your-writes) routing by LSN, against real replicas with replay paused.

Lag is made deterministic with ``pg_wal_replay_pause()``: a paused replica stays
behind for as long as the test wants, and the test proves which server answered by
``inet_server_port()`` and whether the row it just wrote was visible.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import sessionmaker

import sqlalchemy_scale as ss
from sqlalchemy_scale.consistency import (
    COMMIT_AND_POSITION_SQL,
    WAL_INSERT_SQL,
    format_lsn,
    parse_lsn,
)
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.testing import wait_until

_ids = itertools.count(1)

# Every test here may touch this module's tables.
pytestmark = pytest.mark.usefixtures("cluster")


@pytest.fixture(scope="module")
def cluster(scale_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The shared topology with a causal_items table on the primary, replicated."""
    scale_cluster.primary.execute(
        "DROP TABLE IF EXISTS causal_items, causal_bulk; "
        "CREATE TABLE causal_items (id int PRIMARY KEY); CREATE TABLE causal_bulk (n int)"
    )
    for replica in scale_cluster.replicas:
        replica.wait_for_replay()
    yield scale_cluster
    scale_cluster.primary.execute("DROP TABLE IF EXISTS causal_items, causal_bulk")


def write_row(Session: sessionmaker[ss.RoutingSession]) -> tuple[int, str]:
    """Insert one row through a routing session; return its id and the session's token."""
    row_id = next(_ids)
    with Session() as session:
        session.execute(text("INSERT INTO causal_items VALUES (:id)"), {"id": row_id})
        session.commit()
        assert session.causal_token is not None
        return row_id, session.causal_token


READ = select(func.inet_server_port(), func.count()).select_from(text("causal_items"))


def read_row(session: ss.RoutingSession, row_id: int) -> tuple[int, bool]:
    """(port that answered, whether the row was visible) for one read."""
    port, count = session.execute(READ.where(text("id = :id")), {"id": row_id}).one()
    return port, count == 1


def test_token_is_the_primary_lsn_after_commit(
    cluster: LocalCluster, replicas: ss.ReplicaSet
) -> None:
    """After a write commits, causal_token is an LSN no older than the primary's position then."""
    Session = ss.routing_sessionmaker(replicas)
    before = parse_lsn(cluster.primary.execute("SELECT pg_current_wal_flush_lsn()::text")[0][0])
    _, token = write_row(Session)
    # The token is the insert position; the flush position may lag it (WAL written by the
    # server's own processes right after the commit), so compare like with like.
    after = parse_lsn(cluster.primary.execute("SELECT pg_current_wal_insert_lsn()::text")[0][0])
    assert before < parse_lsn(token) <= after
    assert format_lsn(parse_lsn(token)) == token


def test_read_only_transactions_leave_the_token_alone(replicas: ss.ReplicaSet) -> None:
    """A session that only reads records no token (and costs no extra query)."""
    with ss.routing_sessionmaker(replicas)() as session:
        session.execute(READ)
        session.commit()
        assert session.causal_token is None


def test_no_stale_reads_with_a_token(
    cluster: LocalCluster, replicas: ss.ReplicaSet, paused: Callable[[PgNode], None]
) -> None:
    """With replay paused on one replica, token-carrying reads never miss the row just written."""
    Session = ss.routing_sessionmaker(replicas)
    lagging = cluster.replicas[0]
    paused(lagging)
    stale = served_by_lagging = 0
    for _ in range(30):
        row_id, token = write_row(Session)
        with Session(causal_token=token) as session:
            port, visible = read_row(session, row_id)
        stale += not visible
        served_by_lagging += port == lagging.port
    print(f"\ncausal reads: 30, stale: {stale}, served by the paused replica: {served_by_lagging}")
    assert stale == 0
    assert served_by_lagging == 0


def test_a_session_reads_its_own_commits(
    cluster: LocalCluster, replicas: ss.ReplicaSet, paused: Callable[[PgNode], None]
) -> None:
    """A session's reads after its own commit see the commit, even with both replicas paused."""
    for replica in cluster.replicas:
        paused(replica)
    with ss.routing_sessionmaker(replicas)() as session:
        row_id = next(_ids)
        session.execute(text("INSERT INTO causal_items VALUES (:id)"), {"id": row_id})
        session.commit()
        port, visible = read_row(session, row_id)
    assert visible
    assert port == cluster.primary.port
    assert replicas.stats()["primary"]["fallbacks"] >= 1


def test_reads_use_a_replica_once_it_has_caught_up(cluster: LocalCluster, driver: str) -> None:
    """A token the replicas have replayed is served by a replica, not the primary, even
    before the monitor has seen it: routing asks one replica on demand (within max_wait)."""
    with ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[r.url(driver) for r in cluster.replicas],
        monitor=False,  # only the on-demand refresh can know the replicas' positions
        max_wait=2.0,  # room for the probe's first connection on a busy machine
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        row_id, token = write_row(Session)
        for replica in cluster.replicas:
            replica.wait_for_replay(token)
        with Session(causal_token=token) as session:
            port, visible = read_row(session, row_id)
    assert visible
    assert port in {r.port for r in cluster.replicas}


def test_the_monitor_lets_caught_up_reads_skip_the_round_trip(
    cluster: LocalCluster, replicas: ss.ReplicaSet
) -> None:
    """Once the monitor has seen the replicas replay a token, reads with it go to a replica
    on the strength of the known positions alone."""
    Session = ss.routing_sessionmaker(replicas)
    with Session() as session:
        session.execute(READ)  # starts the monitor
    row_id, token = write_row(Session)
    position = parse_lsn(token)
    assert wait_until(lambda: all((n.replay_lsn or 0) >= position for n in replicas.replicas))
    with Session(causal_token=token) as session:
        port, visible = read_row(session, row_id)
    assert visible
    assert port in {r.port for r in cluster.replicas}


def test_causal_context_carries_the_token_between_sessions(
    cluster: LocalCluster, replicas: ss.ReplicaSet, paused: Callable[[PgNode], None]
) -> None:
    """Within causal_context, a commit in one session is seen by reads of the next session."""
    Session = ss.routing_sessionmaker(replicas)
    for replica in cluster.replicas:
        paused(replica)
    with ss.causal_context() as ctx:
        row_id, token = write_row(Session)
        assert ctx.token == token
        with Session() as reader:
            assert read_row(reader, row_id) == (cluster.primary.port, True)
    with Session() as outside:  # no token outside the block: a (paused) replica answers
        port, visible = read_row(outside, row_id)
    assert port in {r.port for r in cluster.replicas} and not visible


def test_nested_causal_contexts_propagate_outwards() -> None:
    """An inner causal_context starts from the outer token and hands its newer token back."""
    with ss.causal_context("0/10") as outer:
        with ss.causal_context() as inner:
            assert inner.token == "0/10"
            inner.observe("0/20")
        assert outer.token == "0/20"
        with ss.causal_context("0/5") as older:
            assert older.token == "0/20"
    assert ss.current_causal_context() is None


def test_invalid_tokens_are_refused() -> None:
    """A token that is not an LSN (a tampered cookie) raises ConfigurationError."""
    for bad in ["", "12345", "0/XYZ", "0/1; DROP TABLE x", "1/2/3"]:
        with pytest.raises(ss.ConfigurationError, match="not a causal token"):
            ss.causal_context(bad).__enter__()
    assert ss.newer_token("0/10", "0/9") == "0/10"
    assert ss.newer_token(None, "1/0") == "1/0"
    assert ss.newer_token("A/0", "9/FFFFFFFF") == "A/0"


def test_a_lagging_replica_leaves_and_rejoins_the_rotation(
    cluster: LocalCluster, driver: str, paused: Callable[[PgNode], None]
) -> None:
    """A replica beyond max_lag_bytes leaves the rotation within a few monitor sweeps and
    returns once it has caught up."""
    lagging = cluster.replicas[0]
    with ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[r.url(driver) for r in cluster.replicas],
        monitor_interval=0.05,
        max_lag_bytes=64 * 1024,
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        node = replica_set.replicas[0]
        with Session() as session:  # the first routed read starts the monitor
            session.execute(READ)
        assert wait_until(lambda: node.is_usable)
        paused(lagging)
        # About 1 MB of WAL: far beyond the 64 kB bound for the paused replica only.
        cluster.primary.execute("INSERT INTO causal_bulk SELECT generate_series(1, 20000)")
        # The healthy replica lags briefly too while it replays the burst: let it finish.
        cluster.replicas[1].wait_for_replay()
        healthy = replica_set.replicas[1]
        assert wait_until(lambda: not node.is_usable and healthy.is_usable)
        ports = set()
        for _ in range(6):
            with Session() as session:
                ports.add(session.execute(READ).one()[0])
        assert ports == {cluster.replicas[1].port}
        health = {h.name: h for h in replica_set.health()}
        assert health["replica1"].state == "lagging" and health["replica1"].lag_bytes
        lagging.resume_replay()
        assert wait_until(lambda: node.is_usable)
        ports = set()
        for _ in range(6):
            with Session() as session:
                ports.add(session.execute(READ).one()[0])
        assert ports == {r.port for r in cluster.replicas}


def test_token_capture_costs_no_round_trip_on_psycopg3(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """A write transaction with token capture sends as many statements as a plain Session's on
    psycopg 3 (the position query travels with the COMMIT) and one more on psycopg2, counted
    in the server's own statement log."""
    cluster = scale_cluster_factory(
        replicas=1, shards=0, pgbouncer=False, settings={"log_statement": "all"}
    )
    cluster.primary.execute("CREATE TABLE counted (id int)")

    plain_engine = create_engine(cluster.primary.url(driver))
    with ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[cluster.replicas[0].url(driver)],
        monitor=False,
    ) as replica_set:

        def plain() -> None:
            with sessionmaker(plain_engine)() as session:
                session.execute(text("INSERT INTO counted VALUES (1)"))
                session.commit()

        def routed() -> None:
            with ss.routing_sessionmaker(replica_set)() as session:
                session.execute(text("INSERT INTO counted VALUES (1)"))
                session.commit()

        plain()
        routed()  # warm both pools: connection set-up queries are not per transaction
        baseline = cluster.primary.statements_logged(plain)
        captured = cluster.primary.statements_logged(routed)
    plain_engine.dispose()
    print(f"\nplain: {baseline}\nrouted: {captured}")
    if driver == "psycopg":
        assert captured == [*baseline[:-1], COMMIT_AND_POSITION_SQL]
        assert baseline[-1] == "COMMIT"
    else:
        assert captured == [*baseline, WAL_INSERT_SQL]


def test_an_asynchronous_commit_is_still_read_back(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """A transaction with SET LOCAL synchronous_commit = off (WAL not flushed at commit, the
    WAL writer asleep for 10 s) still reads its write back with its token."""
    cluster = scale_cluster_factory(
        replicas=1,
        shards=0,
        pgbouncer=False,
        settings={"wal_writer_delay": "10s", "wal_writer_flush_after": 0},
    )
    with ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[cluster.replicas[0].url(driver)],
        monitor_interval=0.05,
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        with Session() as session:
            session.execute(text("CREATE TABLE async_items (id int)"))
            session.commit()
        cluster.replicas[0].wait_for_replay()
        with Session() as session:
            session.execute(text("SET LOCAL synchronous_commit = off"))
            session.execute(text("INSERT INTO async_items VALUES (1)"))
            session.commit()
            token = session.causal_token
        with Session(causal_token=token) as session:
            count, in_recovery = session.execute(
                select(func.count(), func.pg_is_in_recovery()).select_from(text("async_items"))
            ).one()
    print(
        f"\ntoken {token}: read back {count} row(s), on a {'replica' if in_recovery else 'primary'}"
    )
    assert count == 1


def test_token_reads_skip_a_paused_replica_without_waiting(
    cluster: LocalCluster, driver: str, paused: Callable[[PgNode], None]
) -> None:
    """With replay paused on every replica, reads carrying a token go to the primary without
    waiting max_wait for a replica the monitor has seen stalled, and none is stale."""
    with ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[r.url(driver) for r in cluster.replicas],
        monitor_interval=0.05,
        max_wait=60.0,  # a read that waited for a paused replica would take a minute
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        with Session() as session:
            session.execute(READ)  # starts the monitor
        for replica in cluster.replicas:
            paused(replica)
        row_id, token = write_row(Session)
        assert wait_until(lambda: all(n.replay_stalled for n in replica_set.replicas))
        served: list[tuple[int, bool]] = []

        def reads() -> None:
            for _ in range(20):
                with Session(causal_token=token) as session:
                    served.append(read_row(session, row_id))

        reader = threading.Thread(target=reads, daemon=True)
        reader.start()
        reader.join(20)
    stale = sum(not visible for _, visible in served)
    print(f"\ntoken reads with replay paused: {len(served)} of 20 done, stale: {stale}")
    assert len(served) == 20
    assert stale == 0
    assert {port for port, _ in served} == {cluster.primary.port}


def test_a_resumed_replica_serves_token_reads_again(
    cluster: LocalCluster, replicas: ss.ReplicaSet, paused: Callable[[PgNode], None]
) -> None:
    """Once replay resumes, the monitor sees the replica move again and token reads it has
    replayed are served by a replica."""
    Session = ss.routing_sessionmaker(replicas)
    with Session() as session:
        session.execute(READ)  # starts the monitor
    for replica in cluster.replicas:
        paused(replica)
    row_id, token = write_row(Session)
    assert wait_until(lambda: all(n.replay_stalled for n in replicas.replicas))
    for replica in cluster.replicas:
        replica.resume_replay()
    assert wait_until(lambda: not any(n.replay_stalled for n in replicas.replicas))
    position = parse_lsn(token)
    assert wait_until(lambda: all((n.replay_lsn or 0) >= position for n in replicas.replicas))
    with Session(causal_token=token) as session:
        port, visible = read_row(session, row_id)
    assert visible
    assert port in {r.port for r in cluster.replicas}


FORGED = "FFFFFFFF/FFFFFFFF"


def test_a_forged_token_is_ignored_once_seen_ahead_of_the_primary(
    cluster: LocalCluster, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A token ahead of the primary's own WAL position is ignored with one warning: reads
    carrying it are served by replicas, and real commits made after it replace it."""
    with ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[r.url(driver) for r in cluster.replicas],
        max_wait=2.0,  # room for the on-demand probe on a busy machine
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        ports = []
        for _ in range(4):
            with Session(causal_token=FORGED) as session:
                ports.append(session.execute(READ).one()[0])
        with ss.causal_context(FORGED) as ctx:
            row_id, token = write_row(Session)
            with Session() as reader:
                port, visible = read_row(reader, row_id)
    warnings = [r.getMessage() for r in caplog.records if "ignoring causal token" in r.getMessage()]
    print(f"\nforged-token reads served by {ports}; warnings: {warnings}")
    assert set(ports) <= {r.port for r in cluster.replicas}
    assert len(warnings) == 1 and FORGED in warnings[0]
    assert ctx.token == token != FORGED
    assert visible and port in {cluster.primary.port, *(r.port for r in cluster.replicas)}
    assert ss.newer_token(FORGED, token) == token
    assert ss.newer_token(token, FORGED) == token


def test_a_real_token_from_another_process_is_honoured(
    cluster: LocalCluster, driver: str, paused: Callable[[PgNode], None]
) -> None:
    """A token committed through another ReplicaSet (as another process would), ahead of
    everything this one has seen of the primary, is checked and honoured: no stale read."""
    for replica in cluster.replicas:
        paused(replica)
    with (
        ss.ReplicaSet(primary=cluster.primary.url(driver), monitor=False) as writer,
        ss.ReplicaSet(
            primary=cluster.primary.url(driver),
            replicas=[r.url(driver) for r in cluster.replicas],
        ) as reader,
    ):
        row_id, token = write_row(ss.routing_sessionmaker(writer))
        with ss.routing_sessionmaker(reader)(causal_token=token) as session:
            port, visible = read_row(session, row_id)
            assert session.causal_token == token
    assert (port, visible) == (cluster.primary.port, True)
