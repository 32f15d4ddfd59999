"""Shared fixtures for the test suite.

The real topology (``scale_cluster``, ``scale_cluster_factory``) comes from the
``sqlalchemy_scale.testing`` plugin, registered through the package's pytest11
entry point. ``nox -s tests`` runs the suite once per driver; the driver under
test is read from ``SQLALCHEMY_SCALE_TEST_DRIVER``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.router import pinned

DRIVERS = ("psycopg2", "psycopg")


@pytest.fixture(scope="session")
def driver() -> str:
    """The SQLAlchemy driver name the suite runs with (psycopg2 unless nox says otherwise)."""
    name = os.environ.get("SQLALCHEMY_SCALE_TEST_DRIVER", "psycopg2")
    if name not in DRIVERS:
        raise pytest.UsageError(
            f"SQLALCHEMY_SCALE_TEST_DRIVER must be one of {DRIVERS}, got {name!r}"
        )
    return name


@pytest.fixture(autouse=True)
def _no_leftover_pins() -> Iterator[None]:
    """Every test starts and ends with no use_primary() pin in its context."""
    assert pinned() == ()
    yield
    assert pinned() == ()


@pytest.fixture
def replicas(scale_cluster: LocalCluster, driver: str) -> Iterator[ss.ReplicaSet]:
    """A ReplicaSet over the shared primary and its replicas, with a fast (50 ms) monitor
    so tests wait little for it, and fresh counters."""
    replica_set = ss.ReplicaSet(
        primary=scale_cluster.primary.url(driver),
        replicas=[r.url(driver) for r in scale_cluster.replicas],
        monitor_interval=0.05,
    )
    yield replica_set
    replica_set.dispose()


@pytest.fixture(scope="session")
def shard_urls(scale_cluster: LocalCluster, driver: str) -> dict[str, str]:
    """The shard servers' primaries by shard id (``s0``, ``s1``...), for the driver under test."""
    return {f"s{i}": node.url(driver) for i, node in enumerate(scale_cluster.shards)}


@pytest.fixture
def paused(scale_cluster: LocalCluster) -> Iterator[Callable[[PgNode], None]]:
    """pause(node) pauses WAL replay on a replica; every paused replica resumes and catches up."""
    nodes: list[PgNode] = []

    def pause(node: PgNode) -> None:
        node.pause_replay()
        nodes.append(node)

    yield pause
    for node in nodes:
        node.resume_replay()
        node.wait_for_replay()
