"""sqlalchemy-scale: replica routing, sharding and PgBouncer-ready pools for SQLAlchemy 2."""

from importlib.metadata import PackageNotFoundError, version

from .aio import (
    AsyncRoutingSession,
    AsyncShardedSession,
    async_routing_sessionmaker,
    async_sharded_sessionmaker,
)
from .consistency import (
    CausalContext,
    causal_context,
    current_causal_context,
    newer_token,
)
from .decisions import DecisionListener, RoutingDecision
from .errors import (
    CommitOutcomeUnknown,
    ConfigurationError,
    CrossShardQueryError,
    CrossShardWriteError,
    NodeUnavailableError,
    PartialCommitError,
    ReplicaWriteError,
    ScaleError,
    ShardKeyError,
    TransactionPoolingError,
)
from .health import HealthMonitor, NodeHealth
from .policies import LeastBusy, Random, ReplicaPolicy, RoundRobin
from .pooling import (
    PRESET_NAMES,
    PoolingGuardMode,
    PoolingHazard,
    PoolSizing,
    TransactionPoolingWarning,
    check_transaction_pooling,
    guard_transaction_pooling,
    is_guarded,
    pool_preset,
    preset_needs_guard,
    size_pools,
)
from .router import Router
from .routing import RoutingSession, decide_role, routing_sessionmaker, use_primary
from .sharding import (
    DirectorySharding,
    HashSharding,
    JumpHashSharding,
    RangeSharding,
    ShardedSession,
    ShardId,
    ShardingStrategy,
    ShardSet,
    set_shard_id,
    sharded_sessionmaker,
)
from .status import TopologyStatus, topology_status
from .topology import Node, ReplicaSet, Role
from .web import TokenCarrier, role_for_method

try:
    __version__ = version("sqlalchemy-scale")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "PRESET_NAMES",
    "AsyncRoutingSession",
    "AsyncShardedSession",
    "CausalContext",
    "CommitOutcomeUnknown",
    "ConfigurationError",
    "CrossShardQueryError",
    "CrossShardWriteError",
    "DecisionListener",
    "DirectorySharding",
    "HashSharding",
    "HealthMonitor",
    "JumpHashSharding",
    "LeastBusy",
    "Node",
    "NodeHealth",
    "NodeUnavailableError",
    "PartialCommitError",
    "PoolSizing",
    "PoolingGuardMode",
    "PoolingHazard",
    "Random",
    "RangeSharding",
    "ReplicaPolicy",
    "ReplicaSet",
    "ReplicaWriteError",
    "Role",
    "RoundRobin",
    "Router",
    "RoutingDecision",
    "RoutingSession",
    "ScaleError",
    "ShardId",
    "ShardKeyError",
    "ShardSet",
    "ShardedSession",
    "ShardingStrategy",
    "TokenCarrier",
    "TopologyStatus",
    "TransactionPoolingError",
    "TransactionPoolingWarning",
    "__version__",
    "async_routing_sessionmaker",
    "async_sharded_sessionmaker",
    "causal_context",
    "check_transaction_pooling",
    "current_causal_context",
    "decide_role",
    "guard_transaction_pooling",
    "is_guarded",
    "newer_token",
    "pool_preset",
    "preset_needs_guard",
    "role_for_method",
    "routing_sessionmaker",
    "set_shard_id",
    "sharded_sessionmaker",
    "size_pools",
    "topology_status",
    "use_primary",
]
