"""Real faults, bounded in time: replicas killed under load, a primary promoted away, a
connection killed during COMMIT. Each test prints the counts it checks."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.testing import wait_until

pytestmark = pytest.mark.fault

WHERE = select(func.inet_server_port(), func.pg_is_in_recovery())


def test_reads_survive_a_replica_killed_and_restarted(
    scale_cluster: LocalCluster, replicas: ss.ReplicaSet, scale_restart: Callable[[PgNode], None]
) -> None:
    """A read load loses no read while a replica is killed; the replica rejoins by itself."""
    Session = ss.routing_sessionmaker(replicas)
    victim = scale_cluster.replicas[0]
    scale_restart(victim)
    node = replicas.replicas[0]
    failed = served = 0
    ports: list[int] = []

    def read() -> None:
        nonlocal failed, served
        try:
            with Session() as session:
                ports.append(session.execute(WHERE).one()[0])
            served += 1
        except Exception:
            failed += 1

    for _ in range(40):
        read()
    victim.kill()
    for _ in range(80):
        read()
    assert not node.is_usable
    down_ports = set(ports[-40:])
    victim.start()
    rejoined = wait_until(lambda: node.is_usable)
    for _ in range(40):
        read()
    print(
        f"\nreads: {served + failed}, failed: {failed}, rejoined: {rejoined}, "
        f"ports while down: {sorted(down_ports)}"
    )
    assert failed == 0
    assert down_ports == {scale_cluster.replicas[1].port}
    assert rejoined
    assert victim.port in set(ports[-40:])


def test_a_replica_lost_mid_transaction_raises_clearly(
    scale_cluster: LocalCluster, replicas: ss.ReplicaSet, scale_restart: Callable[[PgNode], None]
) -> None:
    """A replica dying after a transaction's first read makes the next read raise
    NodeUnavailableError naming it, rather than silently switching snapshots."""
    Session = ss.routing_sessionmaker(replicas)
    with Session() as session:
        port = session.execute(WHERE).one()[0]
        victim = next(r for r in scale_cluster.replicas if r.port == port)
        scale_restart(victim)
        victim.kill()
        with pytest.raises(ss.NodeUnavailableError) as caught:
            session.execute(WHERE)
        session.rollback()
        assert session.execute(WHERE).one()[0] != port  # the next transaction is fine
    assert caught.value.node in str(caught.value)
    assert isinstance(caught.value, ss.ScaleError)
    print(f"\nmid-transaction failure raised for {caught.value.node}")


def test_writes_reach_a_promoted_replica_through_a_multi_host_url(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """With the primary given as two hosts (target_session_attrs=read-write), writes reach the
    promoted replica after the primary stops, with no restart of the application."""
    cluster = scale_cluster_factory(replicas=1, shards=0, pgbouncer=False)
    old, new = cluster.primary, cluster.replicas[0]
    base = make_url(old.url(driver))
    primary_url = base.set(
        host=None,
        port=None,
        query={
            "host": [f"127.0.0.1:{old.port}", f"127.0.0.1:{new.port}"],
            "target_session_attrs": "read-write",
        },
    )
    old.execute("CREATE TABLE failover_log (id serial PRIMARY KEY, port int)")
    with ss.ReplicaSet(
        primary=primary_url, replicas=[new.url(driver)], pool_pre_ping=True, monitor=False
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)

        def write() -> int:
            with Session() as session:
                port = session.execute(
                    text(
                        "INSERT INTO failover_log (port) VALUES (inet_server_port()) RETURNING port"
                    )
                ).scalar_one()
                session.commit()
                return int(port)

        before = write()
        new.wait_for_replay()
        old.stop()
        new.promote()
        after = [write() for _ in range(3)]
    print(f"\nwrites before failover on {before}, after on {after}")
    assert before == old.port
    assert after == [new.port] * 3
    assert new.execute("SELECT count(*), pg_is_in_recovery() FROM failover_log") == [(4, False)]


def test_connection_lost_during_commit_raises_outcome_unknown(
    scale_cluster: LocalCluster, replicas: ss.ReplicaSet
) -> None:
    """A primary connection terminated while COMMIT runs raises CommitOutcomeUnknown."""
    primary = scale_cluster.primary
    primary.execute(
        """
        DROP TABLE IF EXISTS commit_probe;
        CREATE TABLE commit_probe (id int PRIMARY KEY);
        CREATE OR REPLACE FUNCTION commit_probe_slow() RETURNS trigger LANGUAGE plpgsql AS
          $$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER commit_probe_slow AFTER INSERT ON commit_probe
          DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION commit_probe_slow();
        """
    )
    Session = ss.routing_sessionmaker(replicas)
    try:
        with Session() as session:
            session.execute(text("INSERT INTO commit_probe VALUES (1)"))
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()

            def terminate() -> None:
                # The deferred trigger holds COMMIT for 5 s; end the backend once it is in it.
                wait_until(
                    lambda: (
                        primary.execute(
                            "SELECT count(*) FROM pg_stat_activity "
                            f"WHERE pid = {int(pid)} AND wait_event = 'PgSleep'"
                        )
                        == [(1,)]
                    ),
                    timeout=5,
                )
                primary.execute(f"SELECT pg_terminate_backend({int(pid)})")

            killer = threading.Thread(target=terminate)
            killer.start()
            with pytest.raises(ss.CommitOutcomeUnknown) as caught:
                session.commit()
            killer.join(10)
        assert caught.value.node == "primary"
        assert "may or may not have committed" in str(caught.value)
        print(f"\ncommit outcome unknown raised: {type(caught.value.orig).__name__}")
    finally:
        primary.execute(
            "DROP TABLE IF EXISTS commit_probe; DROP FUNCTION IF EXISTS commit_probe_slow()"
        )


def test_health_reports_roles_from_the_servers(
    scale_cluster: LocalCluster, replicas: ss.ReplicaSet
) -> None:
    """health() reports each node's role as the server reports it, its lag and state."""
    report = {h.name: h for h in replicas.health()}
    assert report["primary"].server_role == "primary"
    assert {report[n].server_role for n in ("replica1", "replica2")} == {"replica"}
    assert all(h.state in ("up", "lagging") and h.last_error is None for h in report.values())
    assert all(report[n].lag_bytes is not None for n in ("replica1", "replica2"))
    assert scale_cluster.password not in repr(report)


def test_a_replica_lost_inside_session_begin_raises_clearly(
    scale_cluster: LocalCluster, driver: str, scale_restart: Callable[[PgNode], None]
) -> None:
    """Inside `with Session.begin():` a dead replica is not retried (the block owns the
    transaction): NodeUnavailableError names it, and the replica leaves the rotation."""
    victim = scale_cluster.replicas[0]
    with ss.ReplicaSet(
        primary=scale_cluster.primary.url(driver),
        replicas=[r.url(driver) for r in scale_cluster.replicas],
        monitor=False,  # the session, not the monitor, is the one to find the dead replica
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        scale_restart(victim)
        victim.kill()
        failures: list[str] = []
        for _ in range(2):  # round-robin: one of the two transactions meets the dead replica
            try:
                with Session.begin() as session:
                    session.execute(WHERE)
            except ss.NodeUnavailableError as exc:
                failures.append(exc.node)
        print(f"\nfailures inside Session.begin(): {failures}")
        assert failures == ["replica1"]
        assert not replica_set.replicas[0].is_usable


def test_without_a_monitor_a_failed_replica_comes_back(
    scale_cluster: LocalCluster, driver: str, scale_restart: Callable[[PgNode], None]
) -> None:
    """With monitor=False, a replica that failed a read is retried after the breaker's backoff
    and serves reads again once it is back."""
    victim = scale_cluster.replicas[0]
    with ss.ReplicaSet(
        primary=scale_cluster.primary.url(driver),
        replicas=[r.url(driver) for r in scale_cluster.replicas],
        monitor=False,
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)

        def read() -> int:
            with Session() as session:
                return int(session.execute(WHERE).one()[0])

        scale_restart(victim)
        victim.kill()
        while_down = {read() for _ in range(6)}  # the dead replica's read is retried elsewhere
        assert victim.port not in while_down
        victim.start()
        victim.wait_for_streaming()
        came_back = wait_until(lambda: read() == victim.port, timeout=20)
        print(f"\nwhile down: {sorted(while_down)}, served by {victim.name} again: {came_back}")
        assert came_back


def _freeze(node: PgNode, sig: int) -> list[int]:
    """Send ``sig`` to a node's postmaster and its backends (by PID, from /proc)."""
    postmaster = node.pid
    assert postmaster is not None
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == postmaster:
                pids.append(int(entry))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def test_a_frozen_replica_blocks_neither_reads_nor_the_monitor(
    scale_cluster: LocalCluster, replicas: ss.ReplicaSet
) -> None:
    """A replica that stops answering (SIGSTOP) is marked down by the monitor while the
    other nodes keep being probed, and a causal read that would ask it is not held up."""
    frozen = scale_cluster.replicas[0]
    Session = ss.routing_sessionmaker(replicas)
    with Session() as session:
        session.execute(WHERE)  # starts the monitor
    assert wait_until(lambda: all(n.is_usable for n in replicas.replicas))
    _freeze(frozen, signal.SIGSTOP)
    scale_cluster.replicas[1].pause_replay()
    try:
        # A token neither replica has replayed (one frozen, one paused): routing asks a
        # replica on demand, for at most max_wait.
        ahead = scale_cluster.primary.execute(
            "CREATE TEMP TABLE frozen_probe AS SELECT 1; SELECT pg_current_wal_insert_lsn()::text"
        )[0][0]
        done = threading.Event()
        served: list[int] = []

        def causal_read() -> None:
            with Session(causal_token=ahead) as session:
                served.append(int(session.execute(WHERE).one()[0]))
            done.set()

        reads = [threading.Thread(target=causal_read, daemon=True) for _ in range(4)]
        for th in reads:
            th.start()
        finished = all(done.wait(10) for _ in reads) and all(not th.join(10) for th in reads)
        down = wait_until(lambda: not replicas.replicas[0].is_usable, timeout=15)
        report = {h.name: h for h in replicas.health(refresh=False)}
    finally:
        _freeze(frozen, signal.SIGCONT)
        scale_cluster.replicas[1].resume_replay()
    print(
        f"\ncausal reads served by {served}; replica1: {report['replica1'].state} "
        f"({report['replica1'].last_error}); primary: {report['primary'].state}"
    )
    assert finished and served == [scale_cluster.primary.port] * 4
    assert down and report["replica1"].state == "down"
    assert "TimeoutError" in (report["replica1"].last_error or "")
    assert report["primary"].state == "up" and report["replica2"].state == "up"
    assert wait_until(lambda: replicas.replicas[0].is_usable, timeout=20)
