"""The sharded models and helpers that the sharding test modules share.

The ``shtest_*`` models live on the four shard servers of the shared cluster; the
fixtures that create their tables and build ShardSets over them (``primaries``,
``make_shards``, ``seeded_shards``) are in ``tests/conftest.py``. Everything here asks
the servers, never our own bookkeeping: rows are counted through engines separate
from any ShardSet, and loaded rows carry ``inet_server_port()`` and
``pg_is_in_recovery()`` of the server that answered.

Imported by name (``from _sharding_models import Order``): pytest puts ``tests/`` on
``sys.path`` (``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Enum,
    ForeignKey,
    Integer,
    String,
    Table,
    create_engine,
    event,
    func,
    text,
)
from sqlalchemy.engine import Engine as EngineClass
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.sharding import HashSharding, RangeSharding, ShardSet, sharded_sessionmaker

GATE_LOCK = 4242  # advisory lock id the shtest_gate() SQL function waits for
SHARD_IDS = ["s0", "s1", "s2", "s3"]


def range_strategy() -> RangeSharding:
    """Customers 0-2 on s0, 3-5 on s1, 6-7 on s2, 8-9 on s3: seeded rows on every shard."""
    return RangeSharding([0, 3, 6, 8, 10])


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "shtest_orders"
    __shard_key__ = "customer_id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int]
    v: Mapped[int | None]
    served_by: Mapped[int] = column_property(func.inet_server_port())
    in_recovery: Mapped[bool] = column_property(func.pg_is_in_recovery())
    lines: Mapped[list[Line]] = relationship(order_by="Line.id")


class Line(Base):
    __tablename__ = "shtest_lines"
    __shard_key__ = "customer_id"

    customer_id: Mapped[int] = mapped_column(primary_key=True)
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("shtest_orders.id"))
    qty: Mapped[int]


class Country(Base):
    __tablename__ = "shtest_countries"
    __shard__ = "all"

    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str]


class AuditEntry(Base):
    __tablename__ = "shtest_audit"
    __shard__ = "s2"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    message: Mapped[str]


class Note(Base):
    __tablename__ = "shtest_notes"
    __shard_key__ = "customer_id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int]
    body: Mapped[str]
    mood: Mapped[str] = mapped_column(Enum("zeta", "alpha", "mid", name="shtest_mood"))


# A Core table placed through Table.info rather than a model.
events = Table(
    "shtest_events",
    Base.metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("customer_id", Integer, nullable=False),
    info={"shard_key": "customer_id"},
)


# -- building ShardSets over the shared cluster -----------------------------------------------


def shard_targets(
    cluster: LocalCluster,
    shard_ids: list[str],
    url: Callable[[PgNode], str],
    *,
    with_replicas: bool = True,
) -> dict[str, Any]:
    """The i-th shard server for each shard id: a ReplicaSet where it has replicas (and
    ``with_replicas``), else its URL (made by ``url``: direct or through PgBouncer)."""
    targets: dict[str, Any] = {}
    for i, shard_id in enumerate(shard_ids):
        node = cluster.shards[i]
        replicas = cluster.shard_replicas.get(i, []) if with_replicas else []
        if replicas:
            targets[shard_id] = ss.ReplicaSet(
                primary=url(node), replicas=[url(r) for r in replicas], name=shard_id
            )
        else:
            targets[shard_id] = url(node)
    return targets


def node_url(cluster: LocalCluster, driver: str, via: str) -> Callable[[PgNode], str]:
    """URL of a node with ``driver``, ``via`` ``"direct"`` or ``"pgbouncer"`` (transaction mode)."""
    bouncer = cluster.pgbouncer if via == "pgbouncer" else None

    def url(node: PgNode) -> str:
        if bouncer is None:
            return str(node.url(driver))
        return bouncer.url(driver, database=node.name)

    return url


def build_shard_set(
    cluster: LocalCluster,
    *,
    driver: str,
    via: str = "direct",
    shard_ids: list[str] = SHARD_IDS,
    strategy: Any = None,
    with_replicas: bool = True,
    **kw: Any,
) -> ShardSet:
    """A ShardSet over the first ``len(shard_ids)`` shard servers (HashSharding by default);
    ``kw`` goes to ShardSet."""
    url = node_url(cluster, driver, via)
    targets = shard_targets(cluster, shard_ids, url, with_replicas=with_replicas)
    return ShardSet(targets, strategy=strategy or HashSharding(), **kw)


def fresh_tables(
    cluster: LocalCluster,
    metadata: Any,
    shard_ids: list[str] = SHARD_IDS,
    *,
    driver: str = "psycopg2",
) -> dict[str, Engine]:
    """One engine per shard primary, separate from any ShardSet, with ``metadata``'s tables
    dropped and created again."""
    engines = {s: create_engine(cluster.shards[i].url(driver)) for i, s in enumerate(shard_ids)}
    for engine in engines.values():
        metadata.drop_all(engine)
        metadata.create_all(engine)
    return engines


def wait_for_replicas(cluster: LocalCluster) -> None:
    """Every shard replica has replayed what its primary holds now."""
    for index, replicas in cluster.shard_replicas.items():
        # Commit an XID on the primary first: that flushes WAL records written outside a
        # commit (page pruning by a SELECT), which walsenders do not send until flushed and
        # which wait_for_replay() (insert LSN) would otherwise wait for.
        cluster.shards[index].execute("SELECT txid_current()")
        for replica in replicas:
            replica.wait_for_replay()


# -- asking the servers -------------------------------------------------------------------------


def count_rows(primaries: Mapping[str, Engine], table: str) -> dict[str, int]:
    """``count(*)`` of ``table`` on each shard server."""
    counts = {}
    for shard_id, engine in primaries.items():
        with engine.connect() as conn:
            counts[shard_id] = int(conn.scalar(text(f"SELECT count(*) FROM {table}")) or 0)
    return counts


def prepared_count(engine: Engine) -> int:
    """Prepared transactions on the server."""
    with engine.connect() as conn:
        return int(conn.scalar(text("SELECT count(*) FROM pg_prepared_xacts")) or 0)


def shard_of_port(cluster: LocalCluster) -> dict[int, str]:
    """Shard id by the port of its primary server."""
    return {node.port: SHARD_IDS[i] for i, node in enumerate(cluster.shards)}


def seed_orders(shards: ShardSet, n: int = 40) -> list[Order]:
    """``n`` orders of customers 0-9 (``v`` NULL for every 7th), one transaction per shard."""
    orders = [
        Order(id=i, customer_id=i % 10, v=None if i % 7 == 0 else (i * 37) % 23) for i in range(n)
    ]
    by_shard: dict[str, list[Order]] = {}
    for order in orders:
        by_shard.setdefault(shards.shard_for(order.customer_id), []).append(order)
    for group in by_shard.values():  # one transaction per shard: no two-phase commit needed
        with sharded_sessionmaker(shards, expire_on_commit=False)() as session:
            session.add_all(group)
            session.commit()
    return orders


_RECORDERS: list[Callable[..., None]] = []
_HAD_EVENTS: list[bool] = []  # Engine._has_events before the first recorder


def record_servers(cluster: LocalCluster) -> Callable[[], set[str]]:
    """Record which shard servers (primary or replica) receive SELECTs from the next
    statements; the returned function gives them and starts afresh. Removed after the test
    (``forget_server_recorders``)."""
    # Direct connections are told apart by port, PgBouncer ones by database (the node's name).
    where: dict[Any, str] = {}
    for i, node in enumerate(cluster.shards):
        where[node.port] = where[node.name] = SHARD_IDS[i]
    for i, replicas in cluster.shard_replicas.items():
        for replica in replicas:
            where[replica.port] = where[replica.name] = SHARD_IDS[i]
    bouncer = cluster.pgbouncer.port if cluster.pgbouncer is not None else None
    seen: set[str] = set()

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        url = conn.engine.url
        key = url.database if url.port == bouncer else url.port
        if key in where and statement.lstrip().upper().startswith("SELECT"):
            seen.add(where[key])

    if not _RECORDERS:  # SQLAlchemy sets the class's flag and never clears it: we do
        _HAD_EVENTS[:] = [EngineClass._has_events]
    event.listen(EngineClass, "before_cursor_execute", before)
    _RECORDERS.append(before)

    def take() -> set[str]:
        found = set(seen)
        seen.clear()
        return found

    return take


def forget_server_recorders() -> None:
    """Remove every recorder :func:`record_servers` installed."""
    while _RECORDERS:
        event.remove(EngineClass, "before_cursor_execute", _RECORDERS.pop())
    if _HAD_EVENTS:
        # Engines made later get no event dispatch they do not need (a test of the flag,
        # tests/test_sa_contract.py, expects a fresh engine to have none).
        EngineClass._has_events = _HAD_EVENTS.pop()
