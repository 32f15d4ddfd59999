"""Fixtures for the web integrations: the shared topology, lagging replicas, async engines.

Lag is made deterministic with ``pg_wal_replay_pause()`` on every replica; the fixture
always resumes replay and waits for the replicas to catch up, so later tests see a whole
topology.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster

# The async driver paired with the suite's sync driver.
ASYNC_DRIVERS = {"psycopg2": "asyncpg", "psycopg": "psycopg_async"}


@pytest.fixture
def paused_replicas(scale_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """Every replica of the primary with WAL replay paused for the test, resumed after it."""
    paused = []
    try:
        for replica in scale_cluster.replicas:
            replica.pause_replay()
            paused.append(replica)
        yield scale_cluster
    finally:
        for replica in paused:
            replica.resume_replay()
        for replica in paused:
            replica.wait_for_replay()


@pytest.fixture
def async_replicas(scale_cluster: LocalCluster, driver: str) -> Iterator[ss.ReplicaSet]:
    """A ReplicaSet over async engines of the shared primary and its replicas.

    Built from ``create_async_engine(...).sync_engine`` and without the background monitor,
    whose blocking probes cannot run on async engines yet (issue 10, asyncio part): replicas
    stay in rotation and a token-carrying read asks a replica for its position on demand.
    Unpooled, because each TestClient runs its own event loop and asyncio connections
    belong to the loop that opened them.
    """
    async_driver = ASYNC_DRIVERS[driver]
    engines = [
        create_async_engine(node.url(async_driver), poolclass=NullPool).sync_engine
        for node in (scale_cluster.primary, *scale_cluster.replicas)
    ]
    replica_set = ss.ReplicaSet(primary=engines[0], replicas=engines[1:], monitor=False)
    yield replica_set
    replica_set.dispose()
