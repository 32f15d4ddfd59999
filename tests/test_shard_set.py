"""ShardSet construction: quiet start-up without replicas, and the TOML configuration."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import func, select

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.sharding import (
    JumpHashSharding,
    RangeSharding,
    ShardSet,
    sharded_sessionmaker,
)


def test_shards_without_replicas_log_nothing_at_their_first_reads(
    scale_cluster: LocalCluster, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ShardSet of plain URLs reads from each shard's primary without a WARNING (or any
    line) per shard, and the reads are answered by each shard's own server."""
    urls = {f"s{i}": node.url(driver) for i, node in enumerate(scale_cluster.shards)}
    caplog.set_level(logging.DEBUG, logger="sqlalchemy_scale.topology")
    ports = set()
    shards = ShardSet(urls, strategy=JumpHashSharding())
    with shards, sharded_sessionmaker(shards)() as session:
        for shard_id in shards.shard_ids:
            ports.add(
                session.scalar(
                    select(func.inet_server_port()), bind_arguments={"shard_id": shard_id}
                )
            )
    assert ports == {node.port for node in scale_cluster.shards}
    assert [r.getMessage() for r in caplog.records if r.name.startswith("sqlalchemy_scale")] == []


def test_a_replica_set_without_replicas_still_warns_once_on_its_own(
    scale_cluster: LocalCluster, driver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Outside a ShardSet, a ReplicaSet with no replicas keeps its one WARNING (reads go to
    the primary), so only the shards' start-up is quiet."""
    caplog.set_level(logging.WARNING, logger="sqlalchemy_scale.topology")
    with ss.ReplicaSet(primary=scale_cluster.primary.url(driver), name="alone") as replica_set:
        Session = ss.routing_sessionmaker(replica_set)
        for _ in range(3):
            with Session() as session:
                session.scalar(select(func.inet_server_port()))
    warnings = [
        r.getMessage() for r in caplog.records if "reads go to the primary" in r.getMessage()
    ]
    assert warnings == ["alone: reads go to the primary because no replicas are configured"]


def test_from_config_reads_shards_strategy_and_replica_sets(tmp_path: Path) -> None:
    """ShardSet.from_config builds URL shards and ReplicaSet shards, the strategy and two_phase."""
    config = tmp_path / "topology.toml"
    config.write_text(
        "[sharding]\n"
        "strategy = { range = [0, 10, 20] }\n"
        'cross_shard_writes = "two_phase"\n'
        "[sharding.engine]\n"
        "pool_size = 3\n"
        "[sharding.shards]\n"
        's0 = "postgresql+psycopg2://u:secret@127.0.0.1:1/a"\n'
        's1 = { primary = "postgresql+psycopg2://u:secret@127.0.0.1:2/a", '
        'replicas = ["postgresql+psycopg2://u:secret@127.0.0.1:3/a"] }\n'
    )
    with ShardSet.from_config(config, section="sharding") as shards:
        assert shards.shard_ids == ["s0", "s1"] and shards.two_phase
        assert isinstance(shards.strategy, RangeSharding) and shards.shard_for(15) == "s1"
        assert [n.name for n in shards.replica_set("s1").nodes] == ["primary", "replica1"]
        assert shards.replica_set("s1").name == "s1"
        assert shards.replica_set("s0").primary.engine.pool.size() == 3  # type: ignore[attr-defined]
        assert "secret" not in repr(shards.replica_set("s1"))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({}, "holds no topology"),
        ({"shards": {"s0": "postgresql://u@h/a"}}, "needs a 'strategy'"),
        ({"shards": {"s0": "postgresql://u@h/a"}, "strategy": "modulo"}, "strategy"),
        (
            {"shards": {"s0": "postgresql://u@h/a"}, "strategy": "hash", "shard_key": "x"},
            "unknown ShardSet configuration keys",
        ),
        ({"shards": {"s0": 5}, "strategy": "hash"}, "expected a URL or a table"),
    ],
)
def test_from_config_refuses_bad_configuration(config: dict[str, object], message: str) -> None:
    """A configuration error names what is wrong, at construction."""
    with pytest.raises(ss.ConfigurationError, match=message):
        ShardSet.from_config(config)
