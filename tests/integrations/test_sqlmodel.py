"""SQLModel's sessions over the routing session: ``exec()`` routes, sync and async."""

from __future__ import annotations

import asyncio

from sqlalchemy import func
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import sessionmaker
from sqlmodel import select

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.sqlmodel import AsyncRoutingSQLModelSession, RoutingSQLModelSession

WHERE = select(func.inet_server_port(), func.pg_is_in_recovery())


def test_exec_routes_like_a_routing_session(
    replicas: ss.ReplicaSet, scale_cluster: LocalCluster
) -> None:
    """session.exec() reads on a replica; per-call and statement options and use_primary()
    send it to the primary, as with RoutingSession.execute()."""
    Session = sessionmaker(class_=RoutingSQLModelSession, replica_set=replicas)
    replica_ports = {r.port for r in scale_cluster.replicas}
    with Session() as session:
        assert isinstance(session, ss.RoutingSession)
        port, in_recovery = session.exec(WHERE).one()
        assert port in replica_ports and in_recovery
        per_call = session.exec(WHERE, execution_options={"use_primary": True}).one()
        statement = session.exec(WHERE.execution_options(use_primary=True)).one()
        with session.use_primary():
            pinned = session.exec(WHERE).one()
    assert per_call == statement == pinned == (scale_cluster.primary.port, False)


def test_async_exec_routes_like_a_routing_session(
    async_replicas: ss.ReplicaSet, scale_cluster: LocalCluster
) -> None:
    """await session.exec() on AsyncRoutingSQLModelSession reads on a replica, and on the
    primary when pinned; a write transaction then reads its own rows from the primary."""
    Session = async_sessionmaker(class_=AsyncRoutingSQLModelSession, replica_set=async_replicas)
    replica_ports = {r.port for r in scale_cluster.replicas}

    async def run() -> tuple[tuple[int, bool], ...]:
        async with Session() as session:
            assert isinstance(session.sync_session, RoutingSQLModelSession)
            read = (await session.exec(WHERE)).one()
            with session.sync_session.use_primary():
                pinned = (await session.exec(WHERE)).one()
            await session.exec(select(func.txid_current()))  # a writing function: primary
            after_write = (await session.exec(WHERE)).one()
            return read, pinned, after_write

    read, pinned, after_write = asyncio.run(run())
    assert read[0] in replica_ports and read[1]
    assert pinned == after_write == (scale_cluster.primary.port, False)
