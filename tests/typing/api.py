"""Type-checked (not run) use of the public API: ``nox -s typing`` runs mypy --strict on it."""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import sqlalchemy_scale as ss


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)


def routing(primary_url: str, replica_urls: list[str]) -> list[User]:
    replicas = ss.ReplicaSet(primary=primary_url, replicas=replica_urls, policy="least_busy")
    Session: sessionmaker[ss.RoutingSession] = ss.routing_sessionmaker(replicas)
    with Session() as session, session.use_primary():
        users = list(session.scalars(select(User)).all())
        session.execute(text("SELECT 1").execution_options(use_replica=True))
        token: str | None = session.causal_token
    with ss.causal_context(token) as ctx:
        newest: str | None = ctx.token
    assert ss.newer_token(newest, token) is not None
    stats: dict[str, dict[str, int]] = replicas.stats()
    health: list[ss.NodeHealth] = replicas.health()
    assert stats and health
    return users


@ss.use_primary()
def pinned(x: int) -> str:
    return str(x)


text_result: str = pinned(1)


def observed(replicas: ss.ReplicaSet, shards: ss.ShardSet) -> bool:
    """A plain function is a DecisionListener; on_decision returns it (a decorator)."""

    def listener(decision: ss.RoutingDecision) -> None:
        reason: str = decision.reason
        node: ss.Node = decision.node
        assert reason and node.name

    same: ss.DecisionListener = replicas.on_decision(listener)
    replicas.remove_decision_listener(same)
    status: ss.TopologyStatus = ss.topology_status(shards, pgbouncer_admin=None)
    from_file: ss.ShardSet = ss.ShardSet.from_config("topology.toml", section="shard_set")
    return status.is_healthy and bool(from_file.shard_ids)
