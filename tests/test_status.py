"""``sqlalchemy-scale status`` on real topologies: sharded and replicated, healthy, lagging
and with a replica stopped (on a separate cluster, never the shared one), as a health check.

Plus the shared TOML format (``ShardSet.from_config``), which builds engines but connects
to nothing, so those tests need no server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import sqlalchemy_scale as ss
from sqlalchemy_scale._config import load_topology
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.local._process import free_ports
from sqlalchemy_scale.status import topology_status


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlalchemy_scale", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def shard_set_toml(cluster: LocalCluster, driver: str, *, admin: bool = True) -> str:
    lines = []
    if admin and cluster.pgbouncer is not None:
        url = cluster.pgbouncer.sa_url(database="pgbouncer").render_as_string(hide_password=False)
        lines += ["[status]", f'pgbouncer_admin = "{url}"']
    lines += ["[shard_set]", 'strategy = "hash"', "max_lag_seconds = 30"]
    for index, shard in enumerate(cluster.shards):
        lines += [f"[shard_set.shards.s{index}]", f'primary = "{shard.url(driver)}"']
        replicas = cluster.shard_replicas.get(index, [])
        if replicas:
            lines.append("replicas = [" + ", ".join(f'"{r.url(driver)}"' for r in replicas) + "]")
    return "\n".join(lines) + "\n"


def test_status_reads_a_shard_set_and_pgbouncer_pools_as_json(
    scale_cluster: LocalCluster, driver: str, tmp_path: Path
) -> None:
    """status --json on a ShardSet file reports every shard's primary and replica with the
    role each server reports, PgBouncer's pools, exits 0, and prints no password."""
    config = tmp_path / "topology.toml"
    config.write_text(shard_set_toml(scale_cluster, driver))
    result = run("status", "--config", str(config), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["healthy"] is True and report["problems"] == []
    nodes = {(n["shard"], n["node"]): n for n in report["nodes"]}
    shard_count = len(scale_cluster.shards)
    assert {s for s, _ in nodes} == {f"s{i}" for i in range(shard_count)}
    assert nodes[("s0", "replica1")]["server_role"] == "replica"
    assert all(n["server_role"] == n["configured_role"] for n in nodes.values())
    assert all(n["state"] == "up" for n in nodes.values())
    assert all(n["server_connections"] >= 1 and n["max_connections"] == 100 for n in nodes.values())
    pools = report["pgbouncer"]["pools"]
    assert {"database", "clients_active", "clients_waiting", "servers_active"} <= set(pools[0])
    assert "pgbouncer" in {p["database"] for p in pools}
    assert scale_cluster.password not in result.stdout + result.stderr


def test_status_table_for_a_shard_set(
    scale_cluster: LocalCluster, driver: str, tmp_path: Path
) -> None:
    """The table form names each shard's nodes and PgBouncer's pools, with masked URLs."""
    config = tmp_path / "topology.toml"
    config.write_text(shard_set_toml(scale_cluster, driver))
    result = run("status", "--config", str(config), "--section", "shard_set")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:5] == ["s0", "replica1", "replica", "replica", "up"] for line in lines)
    assert "PgBouncer pools" in result.stdout and "All nodes healthy." in result.stdout
    assert ":***@" in result.stdout
    assert scale_cluster.password not in result.stdout + result.stderr


def test_status_takes_the_password_from_the_environment(
    scale_cluster: LocalCluster, driver: str
) -> None:
    """A URL without its password works with PGPASSWORD set: nothing secret on the command line."""
    url = scale_cluster.primary.sa_url(driver).set(password=None)
    result = run(
        "status",
        "--primary",
        url.render_as_string(hide_password=False),
        env={"PGPASSWORD": scale_cluster.password},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All nodes healthy." in result.stdout


def test_status_fails_when_a_server_is_not_in_its_configured_role(
    scale_cluster: LocalCluster, driver: str
) -> None:
    """A replica configured as the primary (as after an unnoticed failover) makes status exit
    1 and say which role the server reports."""
    result = run("status", "--primary", scale_cluster.replicas[0].url(driver), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["nodes"][0]["server_role"] == "replica"
    assert report["problems"] == ["primary is configured as primary but the server reports replica"]


def test_status_fails_when_pgbouncer_cannot_be_asked(
    scale_cluster: LocalCluster, driver: str, tmp_path: Path
) -> None:
    """A configured PgBouncer admin URL that does not answer is a problem (exit 1), named
    with its password masked."""
    (dead_port,) = free_ports(1)
    admin = scale_cluster.primary.sa_url(driver, database="pgbouncer").set(port=dead_port)
    config = tmp_path / "topology.toml"
    config.write_text(
        f'[status]\npgbouncer_admin = "{admin.render_as_string(hide_password=False)}"\n'
        f'[replica_set]\nprimary = "{scale_cluster.primary.url(driver)}"\n'
    )
    result = run("status", "--config", str(config))
    assert result.returncode == 1
    assert f"pgbouncer postgresql+{driver}://scale:***@127.0.0.1:{dead_port}" in result.stdout
    assert scale_cluster.password not in result.stdout + result.stderr


@pytest.mark.fault
def test_status_is_a_health_check_for_lag_and_a_stopped_replica(
    scale_cluster_factory: Any, driver: str, tmp_path: Path
) -> None:
    """On a separate cluster: status exits 0 when healthy, 1 with the replica beyond
    max_lag_bytes while its replay is paused, and 1 with the replica stopped (down);
    --watch refreshes a bounded number of times; no password is printed."""
    cluster: LocalCluster = scale_cluster_factory(replicas=1, shards=0, pgbouncer=False)
    replica = cluster.replicas[0]
    config = tmp_path / "replicas.toml"
    config.write_text(
        f'primary = "{cluster.primary.url(driver)}"\nreplicas = ["{replica.url(driver)}"]\n'
        "max_lag_bytes = 0\n"
    )
    healthy = run("status", "--config", str(config), "--json", "--watch", "0.05", "--count", "2")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    refreshes = [json.loads(line) for line in healthy.stdout.splitlines()]
    assert len(refreshes) == 2 and all(r["healthy"] for r in refreshes)

    replica.pause_replay()
    try:
        cluster.primary.execute("CREATE TABLE lag_probe AS SELECT generate_series(1, 1000) AS n")
        lagging = run("status", "--config", str(config), "--json")
    finally:
        replica.resume_replay()
    assert lagging.returncode == 1
    report = json.loads(lagging.stdout)
    node = next(n for n in report["nodes"] if n["node"] == "replica1")
    assert node["state"] == "lagging" and node["lag_bytes"] > 0
    assert any("replica1 is lagging" in p for p in report["problems"])

    replica.stop()
    down = run("status", "--config", str(config))
    assert down.returncode == 1
    assert "replica1 is down" in down.stdout
    for result in (healthy, lagging, down):
        assert cluster.password not in result.stdout + result.stderr


def test_topology_status_in_process_counts_the_applications_pool(
    scale_cluster: LocalCluster, driver: str
) -> None:
    """Inside an application, the pool column counts the connections the app holds."""
    with ss.ReplicaSet(
        primary=scale_cluster.primary.url(driver), replicas=[], pool_size=3
    ) as replica_set:
        with replica_set.primary.engine.connect() as conn:
            port = conn.exec_driver_sql("SELECT inet_server_port()").scalar()
            status = topology_status(replica_set)
        assert port == scale_cluster.primary.port
    (primary,) = status.nodes
    assert (primary.pool_in_use, primary.pool_size) == (1, 3)
    assert primary.server_role == "primary" and status.is_healthy


# -- the shared TOML format (no server needed: nothing connects) ------------------------------


def test_shard_set_from_config_builds_each_shard_as_a_replica_set(tmp_path: Path) -> None:
    """ShardSet.from_config reads shard tables (or bare URLs) in order, shared settings and
    [engine] arguments, and a named strategy."""
    config = tmp_path / "shards.toml"
    config.write_text(
        'strategy = "jump_hash"\nmax_lag_seconds = 3\n[engine]\npool_size = 2\n'
        '[shards.a]\nprimary = "postgresql://u:pw@127.0.0.1:1/a"\n'
        'replicas = ["postgresql://u:pw@127.0.0.1:2/a"]\nmax_lag_seconds = 7\n'
        '[shards]\nb = "postgresql://u:pw@127.0.0.1:3/b"\n'
    )
    with ss.ShardSet.from_config(config) as shard_set:
        assert shard_set.shard_ids == ["a", "b"]
        assert isinstance(shard_set.strategy, ss.JumpHashSharding)
        a, b = shard_set.replica_set("a"), shard_set.replica_set("b")
        assert [n.name for n in a.nodes] == ["primary", "replica1"]
        assert a.monitor is not None and a.monitor.max_lag_seconds == 7
        assert b.primary.engine.pool.size() == 2  # type: ignore[attr-defined]
        assert (a.name, b.name) == ("a", "b")


def test_load_topology_tells_replica_sets_from_shard_sets() -> None:
    """load_topology returns a ShardSet for a [shards] table and a ReplicaSet otherwise,
    ignoring the [status] table beside it."""
    url = "postgresql://u:pw@127.0.0.1:1/a"
    shard_set = load_topology({"strategy": "hash", "shards": {"s0": url}, "status": {}})
    replica_set = load_topology({"replica_set": {"primary": url}, "status": {}})
    assert isinstance(shard_set, ss.ShardSet) and isinstance(replica_set, ss.ReplicaSet)
    shard_set.dispose()
    replica_set.dispose()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"shards": {"s0": "postgresql://u@h/a"}}, "needs a 'strategy'"),
        ({"strategy": "modulo", "shards": {"s0": "postgresql://u@h/a"}}, "unknown strategy"),
        ({"strategy": "hash", "shards": {}}, r"needs a \[shards\] table"),
        ({"strategy": "hash", "shard": {}, "shards": {"s0": "postgresql://u@h/a"}}, "unknown"),
        ({"strategy": "hash", "shards": {"s0": {"replicas": []}}}, "needs a 'primary'"),
        ({"replica_set": {"primary": "postgresql://u@h/a"}, "shard_set": {}}, "holds both"),
    ],
)
def test_bad_shard_set_configuration_is_refused(config: dict[str, Any], message: str) -> None:
    """A ShardSet configuration missing a strategy, shards or a primary, with unknown keys, or
    holding two topologies raises ConfigurationError saying which."""
    with pytest.raises(ss.ConfigurationError, match=message):
        ss.ShardSet.from_config(config)
