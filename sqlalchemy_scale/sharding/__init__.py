"""Sharding: a ShardSet of PostgreSQL servers, strategies that place shard keys, and a
session that routes by key, fans out concurrently and merges like one database.

See ``docs/sharding.md`` for the guide.
"""

from __future__ import annotations

from ._shard_set import CrossShardWrites, ShardSet
from .merge import SortKey, merge_aggregates, merge_ordered
from .planner import FanoutPlan, plan_fanout
from .recovery import (
    PreparedTransaction,
    RecoveryAction,
    RecoveryReport,
    prepared_status,
    prepared_transactions,
    recover_prepared,
)
from .session import ShardedSession, set_shard_id, sharded_sessionmaker
from .strategies import (
    DirectorySharding,
    HashSharding,
    JumpHashSharding,
    RangeSharding,
    ShardId,
    ShardingStrategy,
    jump_hash,
    stable_hash64,
)

__all__ = [
    "CrossShardWrites",
    "DirectorySharding",
    "FanoutPlan",
    "HashSharding",
    "JumpHashSharding",
    "PreparedTransaction",
    "RangeSharding",
    "RecoveryAction",
    "RecoveryReport",
    "ShardId",
    "ShardSet",
    "ShardedSession",
    "ShardingStrategy",
    "SortKey",
    "jump_hash",
    "merge_aggregates",
    "merge_ordered",
    "plan_fanout",
    "prepared_status",
    "prepared_transactions",
    "recover_prepared",
    "set_shard_id",
    "sharded_sessionmaker",
    "stable_hash64",
]
