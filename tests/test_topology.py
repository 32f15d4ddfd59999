"""ReplicaSet construction, configuration errors and password hygiene (no server contacted,
except by the bare-URL test, which connects to prove the driver it picked works)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster

URL = "postgresql+psycopg2://app:s3cret-pw@127.0.0.1:1/app"
REPLICA = "postgresql+psycopg2://app:s3cret-pw@127.0.0.1:2/app"


def test_repr_and_errors_hide_passwords() -> None:
    """Reprs of ReplicaSet and Node mask the password."""
    with ss.ReplicaSet(primary=URL, replicas=[REPLICA]) as replica_set:
        text = repr(replica_set) + repr(replica_set.nodes) + replica_set.primary.url
    assert "s3cret-pw" not in text and "***" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"primary": "not a url"}, "cannot parse the URL"),
        ({"primary": "mysql://app:s3cret-pw@127.0.0.1/app"}, "is not a PostgreSQL URL"),
        ({"primary": URL, "replicas": REPLICA}, "not a single URL"),
        ({"primary": URL, "replicas": {"primary": REPLICA}}, "node names must be unique"),
        ({"primary": URL, "policy": "fastest"}, "unknown replica policy 'fastest'"),
        ({"primary": 42}, "expected a URL string"),
    ],
    ids=["unparsable", "not-postgresql", "single-replica-url", "duplicate-name", "policy", "type"],
)
def test_misconfiguration_raises_at_construction(kwargs: dict[str, object], message: str) -> None:
    """A bad topology raises ConfigurationError naming the problem, without the password."""
    with pytest.raises(ss.ConfigurationError, match=message) as caught:
        ss.ReplicaSet(**kwargs)  # type: ignore[arg-type]
    assert "s3cret-pw" not in str(caught.value)
    assert isinstance(caught.value, ss.ScaleError)


def test_routing_session_needs_a_replica_set() -> None:
    """RoutingSession refuses a missing replica set or an unknown default role."""
    with pytest.raises(ss.ConfigurationError, match="replica_set=ReplicaSet"):
        ss.RoutingSession(replica_set="postgresql://x")  # type: ignore[arg-type]
    with ss.ReplicaSet(primary=URL) as replica_set, pytest.raises(ss.ConfigurationError):
        ss.RoutingSession(replica_set=replica_set, default_role="writer")  # type: ignore[arg-type]


def test_from_config_reads_toml(tmp_path: Path) -> None:
    """from_config() builds the same topology from a TOML file, engine options included."""
    config = tmp_path / "scale.toml"
    config.write_text(
        f'[replica_set]\nprimary = "{URL}"\nreplicas = ["{REPLICA}"]\npolicy = "random"\n'
        "[replica_set.engine]\npool_size = 3\n"
    )
    with ss.ReplicaSet.from_config(config, section="replica_set") as replica_set:
        assert [n.name for n in replica_set.nodes] == ["primary", "replica1"]
        assert isinstance(replica_set.policy, ss.Random)
        assert replica_set.primary.engine.pool.size() == 3  # type: ignore[attr-defined]
    with pytest.raises(ss.ConfigurationError, match="unknown ReplicaSet configuration keys"):
        ss.ReplicaSet.from_config({"primary": URL, "replica": []})
    with pytest.raises(ss.ConfigurationError, match="does not exist"):
        ss.ReplicaSet.from_config(tmp_path / "missing.toml")


def test_round_robin_is_fair_across_threads() -> None:
    """RoundRobin shared by threads hands out each replica equally often."""
    policy = ss.RoundRobin()
    nodes = ["a", "b", "c"]
    counts = {n: 0 for n in nodes}
    lock = threading.Lock()

    def work() -> None:
        local = {n: 0 for n in nodes}
        for _ in range(3000):
            local[policy(nodes)] += 1  # type: ignore[arg-type, index]
        with lock:
            for n, c in local.items():
                counts[n] += c

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert counts == {"a": 4000, "b": 4000, "c": 4000}


def test_a_bare_url_works_with_the_installed_driver(scale_cluster: LocalCluster) -> None:
    """A bare postgresql:// URL connects even when SQLAlchemy's default driver (psycopg 3 on
    SQLAlchemy 2.1) is not installed: psycopg2, which the package installs, is used."""
    url = make_url(scale_cluster.primary.url()).set(drivername="postgresql")
    script = (
        "import sys\n"
        "sys.modules['psycopg'] = None  # as on a machine without psycopg 3\n"
        "from sqlalchemy import text\n"
        "import sqlalchemy_scale as ss\n"
        f"with ss.ReplicaSet(primary={url.render_as_string(hide_password=False)!r}) as rs:\n"
        "    with rs.primary.engine.connect() as conn:\n"
        "        port = conn.scalar(text('SELECT inet_server_port()'))\n"
        "    print(rs.primary.engine.dialect.driver, port)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["psycopg2", str(scale_cluster.primary.port)]


def test_node_counters_are_exact_across_threads() -> None:
    """Statements counted from several threads at once (without the node's lock) all show
    in stats(), fallbacks apart, and reset_stats() starts again from zero."""
    with ss.ReplicaSet(primary=URL, replicas=[REPLICA], monitor=False) as replica_set:
        node = replica_set.replicas[0]

        def count() -> None:
            for i in range(20_000):
                node.count_statement()
                if i % 1000 == 0:
                    node.count(fallback=True)

        threads = [threading.Thread(target=count) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert node.stats()["statements"] == 4 * (20_000 + 20)
        assert node.stats()["fallbacks"] == 4 * 20
        node.reset_stats()
        node.count_statement()
        assert node.stats() == {
            "statements": 1,
            "fallbacks": 0,
            "retries": 0,
            "breaker_openings": 0,
        }
