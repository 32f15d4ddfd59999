"""Local PostgreSQL topologies (primary, replicas, shards, PgBouncer) on 127.0.0.1.

Used by the test suite, :mod:`sqlalchemy_scale.testing` and the demo; needs the
PostgreSQL server programs (see :func:`find_binaries`) and, for pooling,
PgBouncer. Not for production databases: servers run with ``fsync=off``.
"""

from __future__ import annotations

from sqlalchemy_scale.local.binaries import PgBinaries, find_binaries, find_pgbouncer
from sqlalchemy_scale.local.cluster import (
    ClusterError,
    LocalCluster,
    PgBouncerNode,
    PgNode,
    PoolMode,
    StopMode,
    reap_leaked_clusters,
)

__all__ = [
    "ClusterError",
    "LocalCluster",
    "PgBinaries",
    "PgBouncerNode",
    "PgNode",
    "PoolMode",
    "StopMode",
    "find_binaries",
    "find_pgbouncer",
    "reap_leaked_clusters",
]
