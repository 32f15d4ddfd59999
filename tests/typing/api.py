"""Type-checked (not run) use of the public API: ``nox -s typing`` runs mypy --strict on it."""

from __future__ import annotations

from sqlalchemy import Engine, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker
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


async def async_routing(primary_url: str, replica_urls: list[str]) -> list[User]:
    replicas = ss.ReplicaSet(primary=primary_url, replicas=replica_urls, read_your_writes="process")
    Session: async_sessionmaker[ss.AsyncRoutingSession] = ss.async_routing_sessionmaker(
        replicas, expire_on_commit=False
    )
    async with Session(causal_token=None) as session:
        with session.use_primary():
            users = list((await session.scalars(select(User))).all())
        written: bool = session.has_written
        token: str | None = session.causal_token
    assert written or token is None
    await replicas.adispose()
    return users


async def async_sharding(shards: ss.ShardSet) -> User | None:
    Session: async_sessionmaker[ss.AsyncShardedSession] = ss.async_sharded_sessionmaker(shards)
    async with Session() as session:
        user: User | None = await session.get(User, 1, shard_key=1)
    await shards.adispose()
    return user


def cross_shard_writes(urls: dict[str, str]) -> list[str]:
    mode: ss.sharding.CrossShardWrites = "best_effort"
    shards = ss.ShardSet(urls, strategy=ss.HashSharding(), cross_shard_writes=mode)
    try:
        with ss.sharded_sessionmaker(shards)() as session:
            session.commit()
    except ss.PartialCommitError as exc:
        return exc.committed + exc.failed + exc.unknown + exc.rolled_back
    return []


def shard_tokens(shards: ss.ShardSet) -> str | None:
    with ss.sharded_sessionmaker(shards)() as session:
        session.commit()
        token: str | None = session.causal_token
    with ss.sharded_sessionmaker(shards, causal_token=token)() as session:
        return session.causal_token


async def async_shard_tokens(shards: ss.ShardSet, token: str | None) -> str | None:
    async with ss.async_sharded_sessionmaker(shards, causal_token=token)() as session:
        return session.causal_token


def node_errors(exc: ss.NodeUnavailableError | ss.CommitOutcomeUnknown) -> str | None:
    return exc.shard or exc.node


def horizontal_shard_drop_in(engines: dict[str, Engine]) -> list[int]:
    def shard_chooser(mapper: object, instance: object, clause: object = None) -> str:
        return "east"

    session = ss.ShardedSession(
        shards=engines,
        shard_chooser=shard_chooser,
        identity_chooser=lambda mapper, primary_key, **kw: list(engines),
        execute_chooser=lambda context: list(engines),
    )
    with session:
        return list(session.scalars(select(User.id)).all())


def routed_by_one_router(replicas: ss.ReplicaSet, shards: ss.ShardSet) -> ss.Role:
    router: ss.Router = ss.RoutingSession(replica_set=replicas).router
    role, reason, kind, writes = router.decide(select(User), call_options={"use_primary": True})
    shard_router: ss.Router = ss.ShardedSession(shard_set=shards).router("s0")
    assert isinstance(reason, str) and isinstance(kind, str) and isinstance(writes, bool)
    assert shard_router.has_written is False and router.causal_token is None
    return role
