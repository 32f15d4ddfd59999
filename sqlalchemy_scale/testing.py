"""pytest plugin: real PostgreSQL topologies on 127.0.0.1 for your tests.

Registered as the ``sqlalchemy_scale`` pytest11 entry point, so installing the
package makes two fixtures available:

``scale_cluster`` (session scope)
    A started :class:`~sqlalchemy_scale.local.LocalCluster`: a primary with
    ``--scale-replicas`` streaming replicas, ``--scale-shards`` independent
    shard servers with ``--scale-shard-replicas`` replicas, and PgBouncer in
    ``--scale-pgbouncer`` mode. Stopped when the session ends.
``scale_cluster_factory`` (function scope)
    ``factory(**LocalCluster_kwargs)`` starts an extra, separate cluster for
    tests that would damage the shared one (promotion, a tiny
    ``max_connections``); all of them stop when the test ends.

Each option is also an ini setting (``scale_replicas = 1`` under
``[tool.pytest.ini_options]``); the command line wins. Missing PostgreSQL
binaries fail the tests with :class:`~sqlalchemy_scale.local.ClusterError`
saying what to install: a database test that silently skips proves nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sqlalchemy_scale.local import LocalCluster, PgNode, PoolMode

__all__ = ["scale_cluster", "scale_cluster_factory", "scale_restart", "wait_until"]

_OPTIONS: dict[str, tuple[str, str]] = {
    # name: (default, help)
    "replicas": ("2", "streaming replicas of the primary"),
    "shards": ("4", "independent shard servers besides the primary"),
    "shard_replicas": (
        "0:1",
        "replicas per shard as 'shard:count,...' (0:1: shard0 has one replica), or 'none'",
    ),
    "pgbouncer": ("transaction", "PgBouncer pool mode: transaction, session or none"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sqlalchemy_scale", "sqlalchemy-scale local PostgreSQL topology")
    for name, (default, help_text) in _OPTIONS.items():
        group.addoption(
            f"--scale-{name.replace('_', '-')}",
            dest=f"scale_{name}",
            default=None,
            help=f"{help_text} (default: {default})",
        )
        parser.addini(f"scale_{name}", help=f"{help_text} (default: {default})", default=default)


def pytest_configure(config: pytest.Config) -> None:
    cluster_options(config)  # a bad --scale-* value stops the run before any test


def _option(config: pytest.Config, name: str) -> str:
    value = config.getoption(f"scale_{name}")
    if value is None:
        value = config.getini(f"scale_{name}")
    return str(value).strip()


def cluster_options(config: pytest.Config) -> dict[str, Any]:
    """``LocalCluster`` keyword arguments from the ``--scale-*`` options and ini settings."""
    try:
        replicas = int(_option(config, "replicas"))
        shards = int(_option(config, "shards"))
        shard_replicas = _parse_shard_replicas(_option(config, "shard_replicas"))
    except ValueError as exc:
        raise pytest.UsageError(f"sqlalchemy_scale: {exc}") from exc
    mode = _option(config, "pgbouncer").lower()
    pgbouncer: PoolMode | bool
    if mode in ("none", "off", "false", ""):
        pgbouncer = False
    elif mode == "transaction":
        pgbouncer = "transaction"
    elif mode == "session":
        pgbouncer = "session"
    else:
        raise pytest.UsageError(
            f"sqlalchemy_scale: --scale-pgbouncer must be transaction, session or none, not {mode!r}"
        )
    shard_replicas = {i: n for i, n in shard_replicas.items() if i < shards}
    return {
        "replicas": replicas,
        "shards": shards,
        "shard_replicas": shard_replicas,
        "pgbouncer": pgbouncer,
    }


def _parse_shard_replicas(text: str) -> dict[int, int]:
    if text.lower() in ("", "none"):
        return {}
    counts: dict[int, int] = {}
    for item in text.split(","):
        shard, sep, count = item.partition(":")
        if not sep:
            raise ValueError(f"shard replicas {text!r}: expected 'shard:count', got {item!r}")
        counts[int(shard)] = int(count)
    return counts


@pytest.fixture(scope="session")
def scale_cluster(pytestconfig: pytest.Config) -> Iterator[LocalCluster]:
    """The session's shared topology: primary, replicas, shards and PgBouncer on 127.0.0.1."""
    with LocalCluster(**cluster_options(pytestconfig)) as cluster:
        yield cluster


@pytest.fixture
def scale_cluster_factory() -> Iterator[Callable[..., LocalCluster]]:
    """Start extra, separate clusters (``factory(**LocalCluster kwargs)``), stopped after the test."""
    clusters: list[LocalCluster] = []

    def factory(**kwargs: Any) -> LocalCluster:
        cluster = LocalCluster(**kwargs)
        clusters.append(cluster)
        return cluster.start()

    yield factory
    errors: list[Exception] = []
    for cluster in reversed(clusters):
        try:
            cluster.stop()
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def scale_restart(scale_cluster: LocalCluster) -> Iterator[Callable[[PgNode], None]]:
    """``scale_restart(node)``: after the test the node runs and streams again, whatever the
    test did to it (stop, kill), so the shared topology is whole for the next test."""
    nodes: list[PgNode] = []
    yield nodes.append
    for node in nodes:
        if not node.is_running():
            node.start()
        if node.is_replica:
            node.wait_for_streaming()


def wait_until(
    condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.02
) -> bool:
    """Poll ``condition`` for at most ``timeout`` seconds; return whether it came true.

    A bounded wait for something the servers do in their own time (a replica rejoining,
    replay catching up), not a timing assertion: the timeout only bounds a failing test.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()
