"""Local PostgreSQL topologies (primary, replicas, shards, PgBouncer) on 127.0.0.1.

Used by the test suite, :mod:`sqlalchemy_scale.testing` and the demo; needs the
PostgreSQL server programs (see :func:`find_binaries`) and, for pooling,
PgBouncer. Not for production databases: servers run with ``fsync=off``.
"""

from __future__ import annotations

from sqlalchemy_scale.local._runtime import ClusterError, PoolMode, StopMode
from sqlalchemy_scale.local.binaries import PgBinaries, find_binaries, find_pgbouncer
from sqlalchemy_scale.local.cluster import LocalCluster, reap_leaked_clusters
from sqlalchemy_scale.local.pgbouncer import PgBouncerNode
from sqlalchemy_scale.local.postgres import PgNode

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
