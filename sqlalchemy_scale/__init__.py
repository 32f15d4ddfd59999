"""sqlalchemy-scale: replica routing, sharding and PgBouncer-ready pools for SQLAlchemy 2."""

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    CommitOutcomeUnknown,
    ConfigurationError,
    CrossShardQueryError,
    CrossShardWriteError,
    NodeUnavailableError,
    ReplicaWriteError,
    ScaleError,
    ShardKeyError,
)
from .policies import LeastBusy, Random, ReplicaPolicy, RoundRobin
from .routing import RoutingSession, decide_role, routing_sessionmaker, use_primary
from .topology import Node, ReplicaSet, Role

try:
    __version__ = version("sqlalchemy-scale")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "CrossShardQueryError",
    "CrossShardWriteError",
    "LeastBusy",
    "Node",
    "NodeUnavailableError",
    "Random",
    "ReplicaPolicy",
    "ReplicaSet",
    "ReplicaWriteError",
    "Role",
    "RoundRobin",
    "RoutingSession",
    "ScaleError",
    "ShardKeyError",
    "__version__",
    "decide_role",
    "routing_sessionmaker",
    "use_primary",
]
