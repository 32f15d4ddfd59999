"""Asyncio sessions: SQLAlchemy's AsyncSession over the same routing and sharding sessions.

:class:`AsyncRoutingSession` is an :class:`~sqlalchemy.ext.asyncio.AsyncSession`
whose ``sync_session_class`` is :class:`~sqlalchemy_scale.RoutingSession`, and
:class:`AsyncShardedSession` one whose ``sync_session_class`` is
:class:`~sqlalchemy_scale.ShardedSession`: SQLAlchemy runs the sync session in a
greenlet on the event loop, so every routing rule, causal token, retry and
health decision is the sync session's own, not a copy. They need a
:class:`~sqlalchemy_scale.ReplicaSet` (or a :class:`~sqlalchemy_scale.ShardSet`
of them) built from async URLs (``postgresql+asyncpg://``,
``postgresql+psycopg_async://``) or :class:`~sqlalchemy.ext.asyncio.AsyncEngine`
objects.

What differs from sync, and why it stays correct:

* nothing on the routing path blocks the loop: the bounded wait for a caught-up
  replica (``max_wait``) is awaited (:mod:`sqlalchemy_scale._async_bridge`);
* the health monitor's thread cannot use an async driver; it probes each node
  with a sync driver on the same URL (asyncpg -> psycopg2, psycopg async ->
  psycopg), so credentials must be in the URL;
* a fan-out across shards runs each shard's statement as its own task on the
  event loop, concurrently (:mod:`sqlalchemy_scale.sharding._async_fanout`);
* close engines on their loop: ``await replica_set.adispose()`` (or
  ``async with ss.ReplicaSet(...)``).

When *not* to use it: a sync application; the sync sessions are simpler and a
little faster.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from .errors import ConfigurationError
from .routing import RoutingSession, use_primary
from .sharding._shard_set import ShardSet
from .sharding.session import ShardedSession
from .sharding.strategies import ShardId
from .topology import ReplicaSet, Role

__all__ = [
    "AsyncRoutingSession",
    "AsyncShardedSession",
    "async_routing_sessionmaker",
    "async_sharded_sessionmaker",
]

_UNKNOWN: Any = object()


def _require_async(what: str, is_async: bool, name: str) -> None:
    if not is_async:
        raise ConfigurationError(
            f"{what} {name!r} has sync engines; an async session needs async URLs "
            "(postgresql+asyncpg://, postgresql+psycopg_async://) or AsyncEngines. Use "
            "routing_sessionmaker()/sharded_sessionmaker() for sync engines"
        )


class AsyncRoutingSession(AsyncSession):
    """An :class:`~sqlalchemy.ext.asyncio.AsyncSession` that routes like
    :class:`~sqlalchemy_scale.RoutingSession` (its ``sync_session``).

    :param replica_set: an async :class:`~sqlalchemy_scale.ReplicaSet`.
    :param default_role: as for :class:`~sqlalchemy_scale.RoutingSession`.
    :param causal_token: as for :class:`~sqlalchemy_scale.RoutingSession`.

    Other keyword arguments are :class:`~sqlalchemy.ext.asyncio.AsyncSession`'s.
    Build it with :func:`async_routing_sessionmaker`.

    .. versionadded:: 0.2
    """

    sync_session_class = RoutingSession
    sync_session: RoutingSession

    def __init__(
        self,
        bind: AsyncEngine | Engine | Connection | None = None,
        *,
        replica_set: ReplicaSet,
        default_role: Role = "replica",
        causal_token: str | None = None,
        **kw: Any,
    ) -> None:
        if isinstance(replica_set, ReplicaSet):
            _require_async("ReplicaSet", replica_set.is_async, replica_set.name)
        super().__init__(
            bind,  # type: ignore[arg-type]
            replica_set=replica_set,
            default_role=default_role,
            causal_token=causal_token,
            **kw,
        )

    @property
    def replica_set(self) -> ReplicaSet:
        return self.sync_session.replica_set

    @property
    def has_written(self) -> bool:
        """True once the current transaction has sent a write (or lock) to the primary."""
        return self.sync_session.has_written

    @property
    def causal_token(self) -> str | None:
        """The newest causal token this session honours (see ``RoutingSession.causal_token``)."""
        return self.sync_session.causal_token

    def use_primary(self) -> use_primary:
        """Pin this session's statements to the primary: ``with session.use_primary(): ...``
        (also a decorator of functions and coroutine functions)."""
        return self.sync_session.use_primary()


class AsyncShardedSession(AsyncSession):
    """An :class:`~sqlalchemy.ext.asyncio.AsyncSession` over
    :class:`~sqlalchemy_scale.ShardedSession` (its ``sync_session``).

    :param shard_set: a :class:`~sqlalchemy_scale.ShardSet` of async engines.
    :param default_role: as for :class:`~sqlalchemy_scale.ShardedSession`.
    :param causal_token: as for :class:`~sqlalchemy_scale.ShardedSession` (one token
        covering every shard).

    Fan-out SELECTs run concurrently on the event loop, one task per shard.
    ``await session.get(Model, pk, shard_key=...)`` routes a primary-key get.
    Build it with :func:`async_sharded_sessionmaker`.

    .. versionadded:: 0.2
    """

    sync_session_class = ShardedSession
    sync_session: ShardedSession

    def __init__(
        self,
        bind: AsyncEngine | Engine | Connection | None = None,
        *,
        shard_set: ShardSet,
        default_role: Role = "replica",
        causal_token: str | None = None,
        **kw: Any,
    ) -> None:
        if isinstance(shard_set, ShardSet):
            _require_async("ShardSet", shard_set.is_async, ",".join(shard_set.shard_ids))
        super().__init__(
            bind,  # type: ignore[arg-type]
            shard_set=shard_set,
            default_role=default_role,
            causal_token=causal_token,
            **kw,
        )

    @property
    def causal_token(self) -> str | None:
        """The newest causal token this session honours, covering every shard it wrote to
        (see ``ShardedSession.causal_token``)."""
        return self.sync_session.causal_token

    @property
    def shard_set(self) -> ShardSet:
        return self.sync_session.shard_set

    @property
    def written_shards(self) -> list[ShardId]:
        """The shards the current transaction has written to."""
        return self.sync_session.written_shards

    def use_primary(self) -> use_primary:
        """Pin this session's reads to each shard's primary (a ``with`` block or decorator)."""
        return self.sync_session.use_primary()

    async def get(self, entity: Any, ident: Any, *, shard_key: Any = _UNKNOWN, **kw: Any) -> Any:
        """``AsyncSession.get()``, plus ``shard_key=`` to name the shard that holds the row."""
        if shard_key is _UNKNOWN:
            return await super().get(entity, ident, **kw)

        def get(session: Session) -> Any:
            assert isinstance(session, ShardedSession)
            return session.get(entity, ident, shard_key=shard_key, **kw)

        return await self.run_sync(get)


def async_routing_sessionmaker(
    replica_set: ReplicaSet, *, default_role: Role = "replica", **kw: Any
) -> async_sessionmaker[AsyncRoutingSession]:
    """An :class:`~sqlalchemy.ext.asyncio.async_sessionmaker` of :class:`AsyncRoutingSession`
    over an async ``replica_set``.

    Keyword arguments are ``async_sessionmaker``'s (``expire_on_commit=False`` is the
    usual choice with asyncio, where a lazy load after commit cannot run implicitly).
    Raises :class:`~sqlalchemy_scale.ConfigurationError` for a sync ReplicaSet.

    .. versionadded:: 0.2
    """
    _check_set(replica_set, ReplicaSet)
    _require_async("ReplicaSet", replica_set.is_async, replica_set.name)
    return async_sessionmaker(
        class_=AsyncRoutingSession, replica_set=replica_set, default_role=default_role, **kw
    )


def async_sharded_sessionmaker(
    shard_set: ShardSet,
    *,
    default_role: Role = "replica",
    causal_token: str | None = None,
    **kw: Any,
) -> async_sessionmaker[AsyncShardedSession]:
    """An :class:`~sqlalchemy.ext.asyncio.async_sessionmaker` of :class:`AsyncShardedSession`
    over an async ``shard_set``.

    .. versionadded:: 0.2

    .. versionchanged:: 0.3 ``causal_token``.
    """
    _check_set(shard_set, ShardSet)
    _require_async("ShardSet", shard_set.is_async, ",".join(shard_set.shard_ids))
    return async_sessionmaker(
        class_=AsyncShardedSession,
        shard_set=shard_set,
        default_role=default_role,
        causal_token=causal_token,
        **kw,
    )


def _check_set(value: object, expected: type) -> None:
    if not isinstance(value, expected):
        raise ConfigurationError(f"expected a {expected.__name__}(...), got {type(value).__name__}")
