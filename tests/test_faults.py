"""Faults and bad input that used to be reported falsely (issue 12, health and secrets): the
breaker's backoff per outage, a frozen replica, a promotion, a writable "replica", a password
in a URL's query string, nonsense configuration and a ReplicaSet dropped without dispose().
Each loop is bounded in count and time; each test prints the figure it checks."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import URL, make_url

import sqlalchemy_scale as ss
from sqlalchemy_scale.errors import mask_secrets, render_url
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.testing import wait_until

pytestmark = pytest.mark.fault

WHERE = select(func.inet_server_port(), func.pg_is_in_recovery())
APP_NAME = text("SELECT current_setting('application_name')")


def _signal_server(node: PgNode, sig: int) -> None:
    """Send ``sig`` to a node's postmaster and every process it started (by PID, from /proc)."""
    postmaster = node.pid
    assert postmaster is not None
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == postmaster:
                pids.append(int(entry))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# -- the circuit breaker -------------------------------------------------------------------


def test_one_outage_is_one_step_of_backoff(
    scale_cluster: LocalCluster, driver: str, scale_restart: Callable[[PgNode], None]
) -> None:
    """Eight reads failing at one kill of their replica open the breaker once: its backoff is
    the first step, not doubled per failed statement."""
    victim = scale_cluster.replicas[0]
    with ss.ReplicaSet(
        primary=scale_cluster.primary.url(driver), replicas=[victim.url(driver)], monitor=False
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        read_once = threading.Barrier(9, timeout=30)
        killed = threading.Event()
        errors: list[str] = []
        ports: list[int] = []

        def reader() -> None:
            with Session() as session:
                ports.append(session.execute(WHERE).one()[0])
                read_once.wait()
                killed.wait(30)
                try:
                    session.execute(WHERE)
                except ss.NodeUnavailableError as exc:
                    errors.append(exc.node)

        threads = [threading.Thread(target=reader, daemon=True) for _ in range(8)]
        for th in threads:
            th.start()
        read_once.wait()
        scale_restart(victim)
        victim.kill()
        killed.set()
        for th in threads:
            th.join(30)
        assert replica_set.monitor is not None
        report = {h.name: h for h in replica_set.health(refresh=False)}
    print(f"\nfailed reads: {len(errors)}, backoff after one outage: {report['replica1'].backoff}")
    assert ports == [victim.port] * 8
    assert errors == ["replica1"] * 8
    assert report["replica1"].state == "down"
    assert report["replica1"].backoff == replica_set.monitor.min_backoff


# -- a frozen replica ------------------------------------------------------------------------


def test_a_frozen_replica_releases_its_readers(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """Readers of a replica frozen with SIGSTOP are not held for as long as it is frozen: after
    read_timeout their reads fail over to another node, and none of them fails."""
    cluster = scale_cluster_factory(replicas=2, shards=0, pgbouncer=False)
    frozen = cluster.replicas[0]
    with ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[r.url(driver) for r in cluster.replicas],
        pool="direct",
        monitor_interval=0.05,
        read_timeout=1.0,
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        for _ in range(16):  # every replica has pooled connections and the monitor runs
            with Session() as session:
                session.execute(WHERE)
        assert wait_until(lambda: all(n.is_usable for n in replica_set.replicas))
        served: list[int] = []
        failed: list[str] = []
        lock = threading.Lock()

        def reader() -> None:
            for _ in range(10):
                try:
                    with Session() as session:
                        port = int(session.execute(WHERE).one()[0])
                    with lock:
                        served.append(port)
                except Exception as exc:
                    with lock:
                        failed.append(type(exc).__name__)

        threads = [threading.Thread(target=reader, daemon=True) for _ in range(8)]
        began = time.monotonic()
        _signal_server(frozen, signal.SIGSTOP)
        try:
            for th in threads:
                th.start()
            for th in threads:
                th.join(max(0.0, began + 40 - time.monotonic()))
            finished = not any(th.is_alive() for th in threads)
            elapsed = time.monotonic() - began
            report = {h.name: h for h in replica_set.health(refresh=False)}
        finally:
            _signal_server(frozen, signal.SIGCONT)
        thawed = time.monotonic()
        for th in threads:
            th.join(30)
        rejoined = wait_until(lambda: replica_set.replicas[0].is_usable, timeout=30)
        rejoined_after = time.monotonic() - thawed
    print(
        f"\n8 threads x 10 reads with {frozen.name} frozen: finished={finished} in {elapsed:.1f} s,"
        f" served {len(served)}, failed {failed}; {frozen.name}: {report['replica1'].state},"
        f" back in rotation {rejoined_after:.1f} s after SIGCONT"
    )
    assert finished and rejoined
    assert failed == [] and len(served) == 80
    assert report["replica1"].state == "down" and not report["replica1"].in_rotation


# -- promotion, a replica left behind, and two primaries --------------------------------------


def test_after_promotion_the_promoted_replica_is_writable_and_the_orphan_leaves(
    scale_cluster_factory: Callable[..., LocalCluster],
    driver: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After a promotion the promoted replica is reported writable (not lagging), the replica
    still following the dead primary leaves the rotation long before max_lag_seconds, and when
    the old primary comes back health() and the log say two servers accept writes."""
    cluster = scale_cluster_factory(replicas=2, shards=0, pgbouncer=False)
    old, orphan, promoted = cluster.primary, cluster.replicas[0], cluster.replicas[1]
    primary_url = make_url(old.url(driver)).set(
        host=None,
        port=None,
        query={
            "host": [f"127.0.0.1:{old.port}", f"127.0.0.1:{promoted.port}"],
            "target_session_attrs": "read-write",
        },
    )
    with ss.ReplicaSet(
        primary=primary_url,
        replicas=[orphan.url(driver), promoted.url(driver)],
        monitor_interval=0.05,
        max_lag_seconds=300,  # lag alone would keep the orphan in rotation for 5 minutes
        pool_pre_ping=True,
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        with Session() as session:
            session.execute(WHERE)
        # The monitor has seen both replicas streaming (what tells a replica that stopped
        # following from one never fed by streaming).
        assert wait_until(
            lambda: all(
                h.receiver == "streaming"
                for h in replica_set.health(refresh=False)
                if h.name != "primary"
            )
        )
        old.stop()
        promoted.promote()
        promoted_at = time.monotonic()
        # Bounded well below max_lag_seconds; generous because a loaded machine may take
        # seconds to promote, and the primary's probe backs off meanwhile.
        left = wait_until(lambda: not replica_set.replicas[0].is_usable, timeout=60)
        left_after = time.monotonic() - promoted_at
        writable = wait_until(
            lambda: (
                {h.name: h for h in replica_set.health(refresh=False)}["replica2"].state
                == "writable"
            ),
            timeout=20,
        )
        report = {h.name: h for h in replica_set.health()}
        with Session() as session:
            port_after = session.execute(WHERE).one()[0]
    print(
        f"\norphan left the rotation: {left}, {left_after:.2f} s after the promotion "
        f"({report['replica1'].state}, receiver "
        f"{report['replica1'].receiver}); promoted: {report['replica2'].state}, "
        f"lag {report['replica2'].lag_seconds}; reads after on {port_after}"
    )
    assert left and not report["replica1"].in_rotation
    assert writable and report["replica2"].server_role == "primary"
    assert report["replica2"].lag_seconds is None and not report["replica2"].in_rotation
    assert port_after == promoted.port  # the only server with current data
    assert not any(h.split_brain for h in report.values())  # one server behind two URLs

    # The old primary comes back as a second writable server.
    old.start()
    caplog.set_level(logging.WARNING, logger="sqlalchemy_scale.health")
    with ss.ReplicaSet(
        primary=old.url(driver), replicas=[promoted.url(driver)], monitor=False
    ) as split:
        report = {h.name: h for h in split.health()}
        split.health()  # logged once per change, not once per sweep
    errors = [r for r in caplog.records if "SPLIT BRAIN" in r.getMessage()]
    print(f"split brain: {[n for n, h in report.items() if h.split_brain]}, {len(errors)} ERROR")
    assert report["primary"].split_brain and report["replica1"].split_brain
    assert len(errors) == 1 and errors[0].levelno == logging.ERROR


def test_a_promoted_replica_is_not_written_through_connections_made_before(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """A connection made while its replica was a hot standby (which refuses writes itself, so
    the connection carries no READ ONLY flag) gets the flag once the monitor sees the promoted
    server accept writes: with allow_writable_replicas=True the same pooled connection (same
    backend) then runs READ ONLY and a text() marked use_replica that writes is refused."""
    cluster = scale_cluster_factory(replicas=1, shards=0, pgbouncer=False)
    primary, replica = cluster.primary, cluster.replicas[0]
    primary.execute("CREATE TABLE promoted_writes (id int)")
    replica.wait_for_replay()
    backend = text(
        "SELECT pg_backend_pid(), current_setting('transaction_read_only'), pg_is_in_recovery()"
    ).execution_options(use_replica=True)
    with ss.ReplicaSet(
        primary=primary.url(driver),
        replicas={"promoted": replica.url(driver)},
        allow_writable_replicas=True,
        monitor_interval=0.05,
        pool_size=1,
        max_overflow=0,
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        with Session() as session:
            before = tuple(session.execute(backend).one())
        replica.promote()
        writable = wait_until(
            lambda: replica_set.health(refresh=False)[1].state == "writable", timeout=30
        )
        with Session() as session:
            after = tuple(session.execute(backend).one())
        with Session() as session, pytest.raises(ss.ReplicaWriteError) as caught:
            session.execute(
                text("INSERT INTO promoted_writes VALUES (1)").execution_options(use_replica=True)
            )
            session.commit()
    rows = replica.execute("SELECT count(*) FROM promoted_writes")
    print(f"\nbefore promotion {before}, after {after}: {caught.value}; rows {rows}")
    assert before[1:] == ("on", True)  # a standby: read-only by itself
    assert writable
    assert after == (before[0], "on", False)  # the same backend, now READ ONLY by the flag
    assert caught.value.node == "promoted"
    assert rows == [(0,)]


def test_idle_streaming_replicas_stay_in_rotation(
    scale_cluster: LocalCluster, replicas: ss.ReplicaSet
) -> None:
    """Replicas of a live but idle primary (nothing written) stream, and the WAL-receiver rule
    never takes them out: over 40 monitor sweeps both stay in rotation."""
    with ss.routing_sessionmaker(replicas)() as session:
        session.execute(WHERE)  # starts the monitor
    assert replicas.monitor is not None
    seen_out = 0
    for _ in range(40):  # bounded: 40 sweeps, each at most probe_timeout
        replicas.monitor.check()
        seen_out += sum(1 for n in replicas.replicas if not n.is_usable)
    report = {h.name: h for h in replicas.health(refresh=False)}
    print(
        f"\nreplica states over 40 sweeps: out {seen_out} times; receivers "
        f"{[report[n].receiver for n in ('replica1', 'replica2')]}"
    )
    assert seen_out == 0
    assert [report[n].receiver for n in ("replica1", "replica2")] == ["streaming"] * 2


def test_replicas_return_after_the_primary_restarts(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> None:
    """A primary restart takes its replicas out only until their WAL receivers stream again;
    then they serve reads, without any action by the application."""
    cluster = scale_cluster_factory(replicas=1, shards=0, pgbouncer=False)
    with ss.ReplicaSet(
        primary=cluster.primary.url(driver),
        replicas=[cluster.replicas[0].url(driver)],
        monitor_interval=0.05,
        pool_pre_ping=True,
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        with Session() as session:
            session.execute(WHERE)
        assert wait_until(lambda: replica_set.replicas[0].is_usable)
        cluster.primary.restart()
        cluster.replicas[0].wait_for_streaming()
        back = wait_until(lambda: replica_set.replicas[0].is_usable, timeout=30)
        with Session() as session:
            port = session.execute(WHERE).one()[0]
    print(f"\nreplica back in rotation after the primary restarted: {back}; read on {port}")
    assert back and port == cluster.replicas[0].port


# -- a writable server named as a replica -----------------------------------------------------


def _misconfigured_url(cluster: LocalCluster, driver: str) -> URL:
    # The primary, named as a replica; its application_name tells which engine served a read.
    return make_url(cluster.primary.url(driver)).update_query_dict(
        {"application_name": "misconfigured"}
    )


def test_a_writable_replica_is_refused_before_any_read(
    scale_cluster: LocalCluster, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica URL that names a writable server is out of rotation before the first read,
    with an ERROR naming it; reads marked use_replica are not sent to it."""
    caplog.set_level(logging.ERROR, logger="sqlalchemy_scale.health")
    with ss.ReplicaSet(
        primary=scale_cluster.primary.url(driver),
        replicas={"misconfigured": _misconfigured_url(scale_cluster, driver)},
    ) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        with Session() as session:
            served_by = session.execute(APP_NAME.execution_options(use_replica=True)).scalar()
        report = {h.name: h for h in replica_set.health(refresh=False)}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    print(f"\nserved by application_name={served_by!r}; misconfigured: {report['misconfigured']}")
    assert served_by != "misconfigured"
    assert report["misconfigured"].state == "writable" and not report["misconfigured"].in_rotation
    assert any("misconfigured" in m and "accepts writes" in m for m in errors)


@pytest.mark.parametrize(
    "statement",
    [
        "COMMIT; INSERT INTO fault_writes VALUES (1)",
        "SET TRANSACTION READ WRITE; INSERT INTO fault_writes VALUES (2)",
        "INSERT INTO fault_writes VALUES (3)",
    ],
)
def test_an_allowed_writable_replica_is_never_written_through(
    scale_cluster: LocalCluster, driver: str, statement: str
) -> None:
    """With allow_writable_replicas=True a writable replica serves reads, and no text() marked
    use_replica writes through it, even one that ends its READ ONLY transaction first."""
    primary = scale_cluster.primary
    primary.execute("DROP TABLE IF EXISTS fault_writes; CREATE TABLE fault_writes (id int)")
    try:
        with ss.ReplicaSet(
            primary=primary.url(driver),
            replicas={"misconfigured": _misconfigured_url(scale_cluster, driver)},
            allow_writable_replicas=True,
        ) as replica_set:
            Session = ss.routing_sessionmaker(replica_set)
            with Session() as session:
                served_by = session.execute(APP_NAME.execution_options(use_replica=True)).scalar()
            with Session() as session, pytest.raises(ss.ReplicaWriteError) as caught:
                session.execute(text(statement).execution_options(use_replica=True))
                session.commit()
        rows = primary.execute("SELECT count(*) FROM fault_writes")
    finally:
        primary.execute("DROP TABLE IF EXISTS fault_writes")
    print(f"\n{statement!r}: {type(caught.value).__name__}, rows written: {rows[0][0]}")
    assert served_by == "misconfigured"
    assert caught.value.node == "misconfigured"
    assert rows == [(0,)]


def test_savepoints_on_a_replica_still_work(replicas: ss.ReplicaSet) -> None:
    """Refusing transaction control on replicas leaves SAVEPOINT / ROLLBACK TO SAVEPOINT of a
    read transaction (begin_nested()) working."""
    with ss.routing_sessionmaker(replicas)() as session:
        port, in_recovery = session.execute(WHERE).one()
        nested = session.begin_nested()
        session.execute(WHERE)
        nested.rollback()
        again = session.execute(WHERE).one()
    print(f"\nread, savepoint, rollback to it, read again: all on port {port}")
    assert in_recovery and again == (port, True)


# -- secrets ---------------------------------------------------------------------------------


def _query_password_url(node: PgNode, driver: str, password: str, port: int | None = None) -> URL:
    return (
        make_url(node.url(driver))
        .set(password=None, port=port or node.port)
        .update_query_dict({"password": password})
    )


def test_a_password_in_the_query_string_is_never_shown(
    scale_cluster: LocalCluster, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A password given as ?password=... (or inside a dbname connection string) appears in no
    repr, URL, error message, status output or DEBUG line."""
    secret = scale_cluster.password
    caplog.set_level(logging.DEBUG, logger="sqlalchemy_scale")
    primary = _query_password_url(scale_cluster.primary, driver, secret)
    replica = _query_password_url(scale_cluster.replicas[0], driver, secret)
    shown: list[str] = []
    with ss.ReplicaSet(primary=primary, replicas=[replica]) as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        with Session() as session:  # connects with the password from the query string
            assert session.execute(WHERE).one()[0] == scale_cluster.replicas[0].port
        shown += [repr(replica_set), repr(replica_set.primary), replica_set.replicas[0].url]
        shown.append(repr(replica_set.health()))
    assert scale_cluster.pgbouncer is not None
    bounced = _query_password_url(
        scale_cluster.primary, driver, secret, scale_cluster.pgbouncer.port
    )
    with (
        ss.ReplicaSet(primary=bounced, pool="pgbouncer-transaction") as guarded,
        pytest.raises(ss.TransactionPoolingError) as pooling_error,
        ss.routing_sessionmaker(guarded)() as session,
    ):
        session.execute(text("SET work_mem = '8MB'"))
    shown.append(str(pooling_error.value))
    conninfo = f"host=127.0.0.1 password={secret} user=scale"
    for bad in (
        make_url("mysql://scale@127.0.0.1/app").update_query_dict({"password": secret}),
        make_url("postgresql+psycopg2://scale@127.0.0.1/app").update_query_dict(
            {"dbname": conninfo}
        ),
        make_url("postgresql+psycopg2://scale@127.0.0.1/app").update_query_dict(
            {"dbname": f"postgresql://scale:{secret}@127.0.0.1/app"}
        ),
    ):
        # Not PostgreSQL, or an engine that cannot be built: both messages show the URL.
        with pytest.raises(ss.ConfigurationError) as config_error:
            ss.ReplicaSet(primary=bad, no_such_engine_option=1)
        shown.append(str(config_error.value))
        shown.append(render_url(bad))
    status = subprocess.run(
        [sys.executable, "-m", "sqlalchemy_scale", "status", "--primary", primary.render_as_string(False),
         "--replica", replica.render_as_string(False)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    shown += [status.stdout, status.stderr]
    shown += [record.getMessage() for record in caplog.records]
    print(f"\nsurfaces checked: {len(shown)}; status exit code {status.returncode}")
    assert status.returncode == 0, status.stderr
    assert "***" in shown[0]
    leaks = [s for s in shown if secret in s]
    assert leaks == []


def test_render_url_masks_every_secret_libpq_accepts() -> None:
    """render_url masks the URL's password, ?password=, ?sslpassword= and the password inside
    a connection string given as the database or as dbname/service (key=value or URI)."""
    urls = [
        "postgresql://u:hunter2@h/db",
        "postgresql://u@h/db?password=hunter2",
        "postgresql://u@h/db?sslpassword=hunter2",
        "postgresql://u@h/db?password=hunter2&password=hunter2",
        URL.create("postgresql", host="h", query={"dbname": "host=x password=hunter2"}),
        URL.create("postgresql", host="h", query={"dbname": "host=x password='hun ter2'"}),
        URL.create("postgresql", host="h", query={"service": "postgresql://u:hunter2@h/db"}),
        URL.create(
            "postgresql", host="h", query={"dbname": "postgresql://u@h/db?password=hunter2"}
        ),
        URL.create("postgresql", host="h", database="host=x PASSWORD = hunter2"),
    ]
    rendered = [render_url(u) for u in urls]
    print("\n" + "\n".join(rendered))
    assert not [r for r in rendered if "hunter2" in r or "hun ter2" in r or "hun%20ter2" in r]
    assert all("***" in r for r in rendered)
    assert render_url("postgresql://u@h/plain?dbname=app") == "postgresql://u@h/plain?dbname=app"
    driver_message = 'invalid dsn: "host=x password=hunter2 dbname=postgresql://u:hunter2@h/db"'
    assert "hunter2" not in mask_secrets(driver_message)


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_lag_seconds", -1),
        ("max_lag_seconds", math.nan),
        ("max_lag_seconds", "10"),
        ("max_lag_bytes", -1),
        ("max_lag_bytes", 1.5),
        ("max_wait", math.nan),
        ("max_wait", math.inf),
        ("max_wait", -0.1),
        ("max_wait", True),
        ("monitor_interval", 0),
        ("monitor_interval", math.inf),
        ("read_timeout", 0),
        ("read_timeout", -5),
        ("monitor", "yes"),
        ("allow_writable_replicas", 1),
    ],
)
def test_nonsense_configuration_is_refused_at_construction(option: str, value: Any) -> None:
    """A negative, NaN, infinite or wrongly typed setting raises ConfigurationError naming it."""
    url = "postgresql+psycopg2://app@127.0.0.1:5432/app"
    with pytest.raises(ss.ConfigurationError) as caught:
        ss.ReplicaSet(primary=url, replicas=[url], **{option: value})
    print(f"\n{option}={value!r}: {caught.value}")
    assert option in str(caught.value)


def test_sensible_configuration_is_accepted() -> None:
    """None switches the optional limits off; zero lag and zero wait are valid settings."""
    url = "postgresql+psycopg2://app@127.0.0.1:5432/app"
    replica_set = ss.ReplicaSet(
        primary=url,
        replicas=[url],
        max_lag_seconds=None,
        max_lag_bytes=0,
        max_wait=0,
        read_timeout=None,
    )
    assert replica_set.max_wait == 0
    replica_set.dispose()


# -- a ReplicaSet dropped without dispose() ---------------------------------------------------


@pytest.mark.parametrize("pool", [None, "pgbouncer-transaction"])
def test_a_dropped_replica_set_leaves_no_connection(
    scale_cluster: LocalCluster, driver: str, pool: str | None
) -> None:
    """Twenty ReplicaSets that read and wrote, dropped without dispose(), leave no server
    connection open after gc.collect() (counted in pg_stat_activity)."""
    primary = scale_cluster.primary
    name = f"dropped_{pool or 'none'}_{driver}".replace("-", "_")
    primary.execute("DROP TABLE IF EXISTS fault_dropped; CREATE TABLE fault_dropped (id int)")

    def count() -> int:
        rows = primary.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
        )
        return int(rows[0][0])

    def use_and_drop() -> None:
        replica_set = ss.ReplicaSet(
            primary=scale_cluster.primary.url(driver),
            replicas=[r.url(driver) for r in scale_cluster.replicas],
            pool=pool,
            connect_args={"application_name": name},
        )
        with ss.routing_sessionmaker(replica_set)() as session:
            session.execute(WHERE)
            session.execute(text("INSERT INTO fault_dropped VALUES (1)"))
            session.commit()

    try:
        for _ in range(20):
            use_and_drop()
        opened = count()
        gc.collect()
        closed = wait_until(lambda: count() == 0, timeout=10)
        left = count()
    finally:
        primary.execute("DROP TABLE IF EXISTS fault_dropped")
    print(f"\nprimary connections of 20 dropped sets: {opened} before gc, {left} after")
    assert closed and left == 0
