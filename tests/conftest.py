"""Shared fixtures for the test suite.

The real topology (``scale_cluster``, ``scale_cluster_factory``) comes from the
``sqlalchemy_scale.testing`` plugin, registered through the package's pytest11
entry point. ``nox -s tests`` runs the suite once per driver; the driver under
test is read from ``SQLALCHEMY_SCALE_TEST_DRIVER``.

The sharding fixtures (``primaries``, ``make_shards``, ``seeded_shards``) build on
the ``shtest_*`` models of ``tests/_sharding_models.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _sharding_models import (
    GATE_LOCK,
    build_shard_set,
    forget_server_recorders,
    fresh_tables,
    range_strategy,
    seed_orders,
    wait_for_replicas,
)
from _sharding_models import Base as ShardedBase
from sqlalchemy import Engine, text

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.router import pinned
from sqlalchemy_scale.sharding import ShardSet

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


# -- sharding: the shtest_* models on the four shard servers -------------------------------------


@pytest.fixture
def primaries(scale_cluster: LocalCluster) -> Iterator[dict[str, Engine]]:
    """One engine per shard primary, separate from any ShardSet, with fresh ``shtest_*``
    tables and the ``shtest_gate()`` function (it waits for an advisory lock a test holds)."""
    engines = fresh_tables(scale_cluster, ShardedBase.metadata)
    for engine in engines.values():
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE OR REPLACE FUNCTION shtest_gate() RETURNS boolean LANGUAGE plpgsql "
                    f"VOLATILE AS $$ BEGIN PERFORM pg_advisory_xact_lock_shared({GATE_LOCK}); "
                    "RETURN true; END $$"
                )
            )
    wait_for_replicas(scale_cluster)
    yield engines
    for engine in engines.values():
        ShardedBase.metadata.drop_all(engine)
        with engine.begin() as conn:
            conn.execute(text("DROP FUNCTION IF EXISTS shtest_gate()"))
        engine.dispose()


@pytest.fixture(
    params=[("psycopg2", "direct"), ("psycopg", "direct"), ("psycopg2", "pgbouncer")],
    ids=["psycopg2", "psycopg", "psycopg2-pgbouncer"],
)
def make_shards(
    request: pytest.FixtureRequest, scale_cluster: LocalCluster, primaries: dict[str, Engine]
) -> Iterator[Callable[..., ShardSet]]:
    """``make_shards(strategy=None, *, two_phase=False)`` builds ShardSets over the four shards
    (each driver, direct and through PgBouncer in transaction mode; HashSharding by default);
    shard s0 is a ReplicaSet with its replica."""
    driver, via = request.param
    made: list[ShardSet] = []

    def factory(strategy: Any = None, *, two_phase: bool = False) -> ShardSet:
        shard_set = build_shard_set(
            scale_cluster,
            driver=driver,
            via=via,
            strategy=strategy,
            cross_shard_writes="two_phase" if two_phase else "refuse",
        )
        made.append(shard_set)
        return shard_set

    yield factory
    for shard_set in made:
        shard_set.dispose()


@pytest.fixture
def seeded_shards(make_shards: Callable[..., ShardSet], scale_cluster: LocalCluster) -> ShardSet:
    """A ShardSet placing customers by ``range_strategy()`` (rows on every shard) that holds
    the 40 orders of ``seed_orders()``, with every shard replica caught up."""
    shards = make_shards(range_strategy())
    seed_orders(shards)
    wait_for_replicas(scale_cluster)
    return shards


@pytest.fixture(autouse=True)
def _forget_server_recorders() -> Iterator[None]:
    """Remove the server recorders (``record_servers()``) a test installed."""
    yield
    forget_server_recorders()
