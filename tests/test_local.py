"""The local topology launcher against real servers: every claim is checked by asking them."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sqlalchemy_scale.local import (
    ClusterError,
    LocalCluster,
    PgNode,
    find_binaries,
    reap_leaked_clusters,
)
from sqlalchemy_scale.local.binaries import BINDIR_ENV
from sqlalchemy_scale.testing import cluster_options

Factory = Callable[..., LocalCluster]
WHERE = "SELECT inet_server_port(), pg_is_in_recovery()"


@pytest.fixture
def table(request: pytest.FixtureRequest, scale_cluster: LocalCluster) -> Iterator[str]:
    """A table name owned by this test, dropped afterwards from every writable server."""
    name = "local_" + re.sub(r"\W", "_", request.node.name)[:50]
    yield name
    for node in scale_cluster.nodes:
        if not node.is_replica and node.is_running():
            node.execute(f"DROP TABLE IF EXISTS {name}")


def _where(node: PgNode) -> tuple[int, bool]:
    port, in_recovery = node.execute(WHERE)[0]
    return port, in_recovery


def _need_shards(cluster: LocalCluster, count: int) -> None:
    if len(cluster.shards) < count:
        pytest.fail(f"this suite needs --scale-shards >= {count}, got {len(cluster.shards)}")


# -- binaries --------------------------------------------------------------------------


def test_find_binaries_finds_a_server_installation() -> None:
    """find_binaries returns a PostgreSQL 13+ directory holding the programs the launcher runs."""
    binaries = find_binaries()
    assert binaries.version >= 13
    for program in ("postgres", "pg_ctl", "initdb", "pg_basebackup"):
        assert Path(binaries.path(program)).is_file()


def test_a_wrong_bindir_override_fails_with_instructions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A SQLALCHEMY_SCALE_PG_BINDIR without server programs raises, saying what to install."""
    monkeypatch.setenv(BINDIR_ENV, str(tmp_path))
    with pytest.raises(ClusterError, match=BINDIR_ENV) as info:
        find_binaries()
    assert "apt-get install postgresql" in str(info.value)
    assert 'pip install "sqlalchemy-scale[embedded]"' in str(info.value)


# -- the shared topology ------------------------------------------------------------------


def test_plugin_topology_matches_its_options(
    scale_cluster: LocalCluster, pytestconfig: pytest.Config
) -> None:
    """scale_cluster has the replicas, shards, shard replicas and PgBouncer mode the options ask for."""
    options = cluster_options(pytestconfig)
    assert len(scale_cluster.replicas) == options["replicas"]
    assert [s.name for s in scale_cluster.shards] == [f"shard{i}" for i in range(options["shards"])]
    assert {i: len(r) for i, r in scale_cluster.shard_replicas.items()} == options["shard_replicas"]
    expected_mode = options["pgbouncer"] or None
    assert (scale_cluster.pgbouncer.mode if scale_cluster.pgbouncer else None) == expected_mode
    assert len({n.port for n in scale_cluster.nodes}) == len(scale_cluster.nodes)


def test_primary_is_a_writable_server_on_its_port(scale_cluster: LocalCluster) -> None:
    """The primary answers on its own port and is not in recovery."""
    primary = scale_cluster.primary
    assert _where(primary) == (primary.port, False)
    assert primary.execute("SELECT current_user, current_database()") == [("scale", "app")]


def test_replicas_stream_rows_written_on_the_primary(
    scale_cluster: LocalCluster, table: str
) -> None:
    """Each replica is in recovery on its own port and receives a row written on the primary."""
    primary = scale_cluster.primary
    primary.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    primary.execute(f"INSERT INTO {table} VALUES (1)")
    for replica in scale_cluster.replicas:
        assert _where(replica) == (replica.port, True)
        replica.wait_for_replay()
        assert replica.execute(f"SELECT id FROM {table}") == [(1,)]


def test_shards_are_independent_servers(scale_cluster: LocalCluster, table: str) -> None:
    """A table created on shard0 does not exist on shard1 or on the primary."""
    _need_shards(scale_cluster, 2)
    shard0, shard1 = scale_cluster.shards[:2]
    assert _where(shard0) == (shard0.port, False)
    shard0.execute(f"CREATE TABLE {table} (id int)")
    assert shard1.execute("SELECT to_regclass(%s)", (table,)) == [(None,)]
    assert scale_cluster.primary.execute("SELECT to_regclass(%s)", (table,)) == [(None,)]


def test_shard_replica_follows_its_shard(scale_cluster: LocalCluster, table: str) -> None:
    """A shard's replica streams from that shard and sees rows written there."""
    if not scale_cluster.shard_replicas:
        pytest.fail("this suite needs a shard with a replica (--scale-shard-replicas)")
    index, (replica, *_) = next(iter(scale_cluster.shard_replicas.items()))
    shard = scale_cluster.shards[index]
    assert replica.upstream is shard
    assert _where(replica) == (replica.port, True)
    shard.execute(f"CREATE TABLE {table} (id int)")
    shard.execute(f"INSERT INTO {table} VALUES (7)")
    replica.wait_for_replay()
    assert replica.execute(f"SELECT id FROM {table}") == [(7,)]


def test_pgbouncer_reaches_the_primary_and_each_node(scale_cluster: LocalCluster) -> None:
    """Through PgBouncer, 'app' is served by the primary, a node's name by that node, and SHOW POOLS answers."""
    bouncer = scale_cluster.pgbouncer
    if bouncer is None:
        pytest.fail("this suite needs PgBouncer (--scale-pgbouncer transaction or session)")
    engine = create_engine(bouncer.url(), poolclass=NullPool)
    with engine.connect() as conn:
        assert tuple(conn.execute(text(WHERE)).one()) == (scale_cluster.primary.port, False)
    engine.dispose()
    for node in scale_cluster.nodes[1:]:
        engine = create_engine(bouncer.url(database=node.name), poolclass=NullPool)
        with engine.connect() as conn:
            assert tuple(conn.execute(text(WHERE)).one()) == (node.port, node.is_replica)
        engine.dispose()
    pools = bouncer.admin("SHOW POOLS")
    by_database = {row[0]: row[-1] for row in pools}
    assert by_database["app"] == bouncer.mode == "transaction"


def test_pause_replay_holds_back_new_rows_until_resumed(
    scale_cluster: LocalCluster, table: str
) -> None:
    """A paused replica misses a new row (and wait_for_replay times out) until replay resumes."""
    primary, replica = scale_cluster.primary, scale_cluster.replicas[0]
    primary.execute(f"CREATE TABLE {table} (id int)")
    replica.wait_for_replay()
    replica.pause_replay()
    try:
        primary.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(ClusterError, match=rf"{replica.name}: replay reached .* within 0.5s"):
            replica.wait_for_replay(timeout=0.5)
        assert replica.execute(f"SELECT count(*) FROM {table}") == [(0,)]
    finally:
        replica.resume_replay()
    replica.wait_for_replay()
    assert replica.execute(f"SELECT count(*) FROM {table}") == [(1,)]


@pytest.mark.fault
def test_killed_replica_starts_again_and_streams(scale_cluster: LocalCluster, table: str) -> None:
    """After SIGKILL a replica is down; start() brings it back streaming new rows."""
    primary, replica = scale_cluster.primary, scale_cluster.replicas[-1]
    pid = replica.pid
    try:
        replica.kill()
        assert not replica.is_running()
        with pytest.raises(psycopg2.OperationalError):
            replica.execute("SELECT 1")
        primary.execute(f"CREATE TABLE {table} AS SELECT 42 AS answer")
    finally:
        replica.start()
    replica.wait_for_streaming()
    assert replica.pid != pid
    replica.wait_for_replay()
    assert replica.execute(f"SELECT answer FROM {table}") == [(42,)]


@pytest.mark.fault
def test_stopped_server_starts_again(scale_cluster: LocalCluster) -> None:
    """stop() takes a server down and start() brings it back on the same port."""
    node = scale_cluster.shards[-1] if scale_cluster.shards else scale_cluster.replicas[-1]
    try:
        node.stop()
        assert not node.is_running()
        with pytest.raises(psycopg2.OperationalError):
            node.execute("SELECT 1")
    finally:
        node.start()
    assert node.is_running()
    assert _where(node) == (node.port, node.is_replica)


def test_urls_work_with_each_driver(scale_cluster: LocalCluster) -> None:
    """url() builds working URLs for psycopg2 and psycopg, and sa_url() hides the password."""
    replica = scale_cluster.replicas[0]
    assert replica.url("psycopg").startswith(
        f"postgresql+psycopg://scale:{scale_cluster.password}@"
    )
    assert scale_cluster.password not in str(replica.sa_url())
    for driver in ("psycopg2", "psycopg"):
        engine = create_engine(replica.url(driver), poolclass=NullPool)
        with engine.connect() as conn:
            assert tuple(conn.execute(text(WHERE)).one()) == (replica.port, True)
        engine.dispose()


def test_password_is_never_shown(scale_cluster: LocalCluster) -> None:
    """Neither describe() nor any repr contains the password."""
    shown = [scale_cluster.describe(), repr(scale_cluster), repr(scale_cluster.pgbouncer)]
    shown += [repr(node) for node in scale_cluster.nodes]
    assert scale_cluster.primary.name in shown[0]
    assert str(scale_cluster.primary.port) in shown[0]
    for text_ in shown:
        assert scale_cluster.password not in text_


# -- separate clusters ----------------------------------------------------------------------


@pytest.mark.fault
def test_promoted_replica_accepts_writes(scale_cluster_factory: Factory) -> None:
    """A promoted replica leaves recovery and accepts writes; describe() shows it as promoted."""
    cluster = scale_cluster_factory(replicas=1)
    replica = cluster.replicas[0]
    assert _where(replica) == (replica.port, True)
    replica.promote()
    assert not replica.is_replica
    assert _where(replica) == (replica.port, False)
    replica.execute("CREATE TABLE promoted (id int)")
    replica.execute("INSERT INTO promoted VALUES (1)")
    assert replica.execute("SELECT id FROM promoted") == [(1,)]
    assert "primary (promoted)" in cluster.describe()


def test_pgbouncer_session_mode_and_settings(scale_cluster_factory: Factory) -> None:
    """pgbouncer='session' and pgbouncer_settings reach PgBouncer's configuration."""
    cluster = scale_cluster_factory(
        replicas=0, pgbouncer="session", pgbouncer_settings={"default_pool_size": 3}
    )
    bouncer = cluster.pgbouncer
    assert bouncer is not None and bouncer.mode == "session"
    config = {row[0]: row[1] for row in bouncer.admin("SHOW CONFIG")}
    assert (config["pool_mode"], config["default_pool_size"]) == ("session", "3")
    engine = create_engine(bouncer.url(), poolclass=NullPool)
    with engine.connect() as conn:
        assert tuple(conn.execute(text(WHERE)).one()) == (cluster.primary.port, False)
    engine.dispose()


def test_settings_reach_every_server(scale_cluster_factory: Factory) -> None:
    """settings= applies to the primary and its replicas alike."""
    cluster = scale_cluster_factory(replicas=1, settings={"max_connections": 40})
    for node in cluster.nodes:
        assert node.execute("SHOW max_connections") == [("40",)]


def test_failed_start_names_the_node_and_shows_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """A server that cannot start raises a ClusterError naming it, with its log tail, no password."""
    caplog.set_level(logging.DEBUG, logger="sqlalchemy_scale.local")
    cluster = LocalCluster(replicas=0, settings={"shared_buffers": "bogus"})
    try:
        with pytest.raises(ClusterError) as info:
            cluster.start()
    finally:
        cluster.stop()
    message = str(info.value)
    assert message.startswith("primary: PostgreSQL failed to start")
    assert "/primary" in message and "data dir" in message
    assert 'invalid value for parameter "shared_buffers": "bogus"' in message
    assert cluster.password not in message
    assert cluster.password not in caplog.text
    assert cluster.base_dir is None and not cluster.nodes


def test_cluster_of_a_dead_process_is_reaped(scale_cluster_factory: Factory) -> None:
    """reap_leaked_clusters (run by every start()) stops a dead process's cluster and removes it."""
    orphan = scale_cluster_factory(replicas=0)
    primary, base_dir = orphan.primary, orphan.base_dir
    assert base_dir is not None and primary.is_running()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (base_dir / "owner.pid").write_text(f"{dead.pid}\n")
    assert base_dir in reap_leaked_clusters(find_binaries(), tmp_dir=base_dir.parent)
    assert not primary.is_running()
    assert not base_dir.exists()


_CHILD = """
import sys, time
from sqlalchemy_scale.local import LocalCluster
cluster = LocalCluster(replicas=0).start()
print(cluster.base_dir, cluster.primary.port, flush=True)
if sys.argv[1] == "sigterm":
    time.sleep(60)
"""


@pytest.mark.parametrize("ending", ["exit", "sigterm"])
def test_a_process_that_ends_without_stop_leaves_nothing(ending: str) -> None:
    """A process that exits or gets SIGTERM without calling stop() still stops its servers."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, ending], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        base_dir, port = child.stdout.readline().split()
        if ending == "sigterm":
            child.send_signal(signal.SIGTERM)
        returncode = child.wait(timeout=30)
    finally:
        child.kill()
        child.wait()
    assert returncode == (-signal.SIGTERM if ending == "sigterm" else 0)
    assert not Path(base_dir).exists()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(host="127.0.0.1", port=int(port), connect_timeout=2)


def _exit_child() -> None:
    raise SystemExit(0)  # runs the child's atexit hooks, as a worker process would


def test_a_forked_child_leaves_the_parents_cluster_alone(
    scale_cluster_factory: Callable[..., LocalCluster],
) -> None:
    """A forked child that exits (running its atexit hooks) stops none of the parent's servers."""
    import multiprocessing

    cluster = scale_cluster_factory(replicas=0, shards=0, pgbouncer=False)
    child = multiprocessing.get_context("fork").Process(target=_exit_child)
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert cluster.primary.is_running()
    assert cluster.primary.execute("SELECT 1") == [(1,)]
