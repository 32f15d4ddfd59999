"""sqlalchemy-scale: replica routing, sharding and PgBouncer-ready pools for SQLAlchemy 2."""

from importlib.metadata import PackageNotFoundError, version

from .consistency import (
    CausalContext,
    causal_context,
    current_causal_context,
    newer_token,
)
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
from .health import HealthMonitor, NodeHealth
from .policies import LeastBusy, Random, ReplicaPolicy, RoundRobin
from .routing import RoutingSession, decide_role, routing_sessionmaker, use_primary
from .topology import Node, ReplicaSet, Role

try:
    __version__ = version("sqlalchemy-scale")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "CausalContext",
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "CrossShardQueryError",
    "CrossShardWriteError",
    "HealthMonitor",
    "LeastBusy",
    "Node",
    "NodeHealth",
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
    "causal_context",
    "current_causal_context",
    "decide_role",
    "newer_token",
    "routing_sessionmaker",
    "use_primary",
]
