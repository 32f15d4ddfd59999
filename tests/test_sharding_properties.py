"""Property: a query over four shards returns what one database returns for the same rows.

Hypothesis generates rows and ORDER BY / LIMIT / OFFSET / aggregate / GROUP BY
queries; each example loads the rows into the four shard servers (placed by
the shard key) and into the cluster's primary (the single database), runs the
query through a ShardedSession and a plain Session, and compares. Text is
compared under the servers' C collation, NULL placement included.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from _sharding_models import fresh_tables
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, String, create_engine, delete, func, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.sharding import HashSharding, ShardSet, sharded_sessionmaker


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "shprop_items"
    __shard_key__ = "k"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    k: Mapped[int]
    g: Mapped[int | None]
    v: Mapped[int | None]
    s: Mapped[str] = mapped_column(String)


@dataclass
class World:
    shards: ShardSet
    shard_engines: dict[str, Engine]
    single: Engine


@pytest.fixture(scope="module")
def world(scale_cluster: LocalCluster) -> Iterator[World]:
    """Tables on the four shards and on the primary, which plays the single database."""
    shard_ids = [f"s{i}" for i in range(len(scale_cluster.shards))]
    shard_engines = fresh_tables(scale_cluster, Base.metadata, shard_ids)
    single = create_engine(scale_cluster.primary.url())
    Base.metadata.drop_all(single)
    Base.metadata.create_all(single)
    shards = ShardSet(dict(shard_engines), strategy=HashSharding())
    yield World(shards, shard_engines, single)
    shards.dispose()
    for engine in [*shard_engines.values(), single]:
        Base.metadata.drop_all(engine)
        engine.dispose()


texts = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=4
)
rows_strategy = st.lists(
    st.tuples(
        st.integers(0, 30),  # k: the shard key
        st.none() | st.integers(0, 4),  # g: a small group domain with NULLs
        st.none() | st.integers(-50, 50),  # v
        texts,  # s
    ),
    max_size=40,
)
limits = st.none() | st.integers(0, 12)
offsets = st.none() | st.integers(0, 8)
directions = st.tuples(st.booleans(), st.sampled_from([None, True, False]))


def _load(world: World, rows: list[tuple[int, int | None, int | None, str]]) -> None:
    items = [{"id": i, "k": k, "g": g, "v": v, "s": s} for i, (k, g, v, s) in enumerate(rows)]
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_shard.setdefault(world.shards.shard_for(item["k"]), []).append(item)
    for shard_id, engine in world.shard_engines.items():
        with engine.begin() as conn:
            conn.execute(delete(Item))
            if by_shard.get(shard_id):
                conn.execute(insert(Item), by_shard[shard_id])
    with world.single.begin() as conn:
        conn.execute(delete(Item))
        if items:
            conn.execute(insert(Item), items)


def _ordered(column: Any, descending: bool, nulls_first: bool | None) -> Any:
    term = column.desc() if descending else column.asc()
    if nulls_first is True:
        term = term.nulls_first()
    elif nulls_first is False:
        term = term.nulls_last()
    return term


def _both(world: World, stmt: Any) -> tuple[list[Any], list[Any]]:
    with sharded_sessionmaker(world.shards)() as sharded, Session(world.single) as single:
        return [tuple(r) for r in sharded.execute(stmt).all()], [
            tuple(r) for r in single.execute(stmt).all()
        ]


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return abs(float(a) - float(b)) < 1e-9


SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(
    rows=rows_strategy,
    keys=st.lists(st.sampled_from(["g", "v", "s"]), unique=True, max_size=3),
    dirs=st.lists(directions, min_size=4, max_size=4),
    limit=limits,
    offset=offsets,
    select_all=st.booleans(),
)
def test_order_by_limit_offset_equals_one_database(
    world: World,
    rows: list[tuple[int, int | None, int | None, str]],
    keys: list[str],
    dirs: list[tuple[bool, bool | None]],
    limit: int | None,
    offset: int | None,
    select_all: bool,
) -> None:
    """Random ORDER BY (NULLS FIRST/LAST, ASC/DESC, selected or not) with LIMIT/OFFSET gives the
    single database's rows."""
    _load(world, rows)
    terms = [_ordered(getattr(Item, key), *dirs[i]) for i, key in enumerate(keys)]
    terms.append(_ordered(Item.id, dirs[3][0], None))  # a unique last key: one correct order
    columns = (Item.id, Item.k, Item.g, Item.v, Item.s) if select_all else (Item.id,)
    stmt = select(*columns).order_by(*terms)
    stmt = stmt.limit(limit).offset(offset)
    sharded, single = _both(world, stmt)
    assert sharded == single


@SETTINGS
@given(rows=rows_strategy, descending=st.booleans(), limit=limits, offset=offsets)
def test_orm_entities_ordered_and_limited_equal_one_database(
    world: World,
    rows: list[tuple[int, int | None, int | None, str]],
    descending: bool,
    limit: int | None,
    offset: int | None,
) -> None:
    """``select(Item)`` ordered and limited loads the same objects, in order, as one database."""
    _load(world, rows)
    stmt = (
        select(Item)
        .order_by(_ordered(Item.v, descending, None), Item.id)
        .limit(limit)
        .offset(offset)
    )
    with sharded_sessionmaker(world.shards)() as sharded, Session(world.single) as single:
        got = [(o.id, o.k, o.v, o.s) for o in sharded.scalars(stmt).all()]
        want = [(o.id, o.k, o.v, o.s) for o in single.scalars(stmt).all()]
    assert got == want


@SETTINGS
@given(rows=rows_strategy)
def test_aggregates_without_group_by_equal_one_database(
    world: World, rows: list[tuple[int, int | None, int | None, str]]
) -> None:
    """count(*), count(v), sum, min, max and avg over all shards equal one database's (avg to 1e-9)."""
    _load(world, rows)
    stmt = select(
        func.count(),
        func.count(Item.v),
        func.sum(Item.v),
        func.min(Item.v),
        func.max(Item.v),
        func.min(Item.s),
        func.avg(Item.v),
    )
    (sharded,), (single,) = _both(world, stmt)
    assert sharded[:6] == single[:6]
    assert _close(sharded[6], single[6])


@SETTINGS
@given(
    rows=rows_strategy,
    direction=directions,
    by_aggregate=st.booleans(),
    limit=limits,
    offset=offsets,
)
def test_group_by_aggregates_equal_one_database(
    world: World,
    rows: list[tuple[int, int | None, int | None, str]],
    direction: tuple[bool, bool | None],
    by_aggregate: bool,
    limit: int | None,
    offset: int | None,
) -> None:
    """GROUP BY with aggregates, ordered by the group or an aggregate, then limited, equals one database."""
    _load(world, rows)
    total = func.count().label("n")
    stmt = select(
        Item.g, total, func.sum(Item.v), func.min(Item.v), func.max(Item.v), func.avg(Item.v)
    ).group_by(Item.g)
    if by_aggregate:
        stmt = stmt.order_by(_ordered(total, *direction), _ordered(Item.g, False, True))
    else:
        stmt = stmt.order_by(_ordered(Item.g, *direction))
    stmt = stmt.limit(limit).offset(offset)
    sharded, single = _both(world, stmt)
    assert [r[:5] for r in sharded] == [r[:5] for r in single]
    assert all(_close(a[5], b[5]) for a, b in zip(sharded, single, strict=True))
