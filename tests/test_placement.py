"""Shard keys are placed by the value PostgreSQL stores, or refused before anything is written.

The pure rules of :func:`~sqlalchemy_scale.sharding._stored_key.stored_key` are
checked without a server; the property runs against the four real shard servers:
for generated values of every key column type (integer, bigint, numeric(10, 2),
varchar(8), char(4), uuid, date), written through ``session.add()`` and a bulk
``insert()``, either :class:`~sqlalchemy_scale.ShardKeyError` is raised and no shard
holds the row, or the row is stored on exactly the shard the strategy gives for the
value the server stored (read back from each shard), ``session.get(..., shard_key=)``,
``execution_options(shard_key=)`` and a WHERE on the original value find it, and
the WHERE answers what the shards queried directly answer together.
"""

from __future__ import annotations

import datetime
import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from _sharding_models import fresh_tables
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    CHAR,
    BigInteger,
    Column,
    Date,
    DateTime,
    Engine,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Table,
    Uuid,
    insert,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import DeclarativeBase, mapped_column

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.sharding import HashSharding, ShardSet, sharded_sessionmaker
from sqlalchemy_scale.sharding._stored_key import stored_key


class Base(DeclarativeBase):
    pass


def _model(name: str, type_: Any) -> type[Base]:
    return type(
        name,
        (Base,),
        {
            "__tablename__": f"plc_{name.lower()}",
            "__shard_key__": "k",
            "id": mapped_column(Integer, primary_key=True, autoincrement=False),
            "k": mapped_column(type_, nullable=False),
        },
    )


IntKey = _model("IntKey", Integer)
BigKey = _model("BigKey", BigInteger)
NumKey = _model("NumKey", Numeric(10, 2))
TextKey = _model("TextKey", String(8))
CharKey = _model("CharKey", CHAR(4))
UuidKey = _model("UuidKey", Uuid)
DateKey = _model("DateKey", Date)

SHARD_IDS = ["s0", "s1", "s2", "s3"]
_IDS = itertools.count(1)


# -- the rules, without a server ------------------------------------------------------------


def _col(type_: Any) -> Column[Any]:
    return Table("t", MetaData(), Column("k", type_)).c.k


@pytest.mark.parametrize(
    ("type_", "value", "stored"),
    [
        (Integer(), 7, 7),
        (Integer(), 7.0, 7),
        (Integer(), Decimal("7.00"), 7),
        (Integer(), " -7\n", -7),
        (Integer(), 2**31 - 1, 2**31 - 1),
        (BigInteger(), 2**40, 2**40),
        (SmallInteger(), -(2**15), -(2**15)),
        (Numeric(10, 2), Decimal("1.005"), Decimal("1.01")),
        (Numeric(10, 2), Decimal("-1.005"), Decimal("-1.01")),
        (Numeric(10, 2), 1.005, Decimal("1.01")),
        (Numeric(10, 2), "2.5e1", Decimal("25.00")),
        (Numeric(10), Decimal("2.5"), Decimal("3")),
        (Numeric(), 0.1, Decimal("0.1")),
        (String(3), "abc", "abc"),
        (String(), 12, "12"),
        (CHAR(3), "ab ", "ab"),
        (
            Uuid(),
            "{A0EEBC99-9C0B4EF8-BB6D6BB9-BD380A11}",
            uuid.UUID(int=0xA0EEBC999C0B4EF8BB6D6BB9BD380A11),
        ),
        (
            Uuid(as_uuid=False),
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            uuid.UUID(int=0xA0EEBC999C0B4EF8BB6D6BB9BD380A11),
        ),
        (Date(), datetime.datetime(2024, 2, 29), datetime.date(2024, 2, 29)),
        (Date(), "2024-02-29", datetime.date(2024, 2, 29)),
        (
            DateTime(timezone=True),
            datetime.datetime(2024, 1, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
            datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
        ),
    ],
)
def test_stored_value_is_what_postgresql_stores(type_: Any, value: Any, stored: Any) -> None:
    """A key is converted to the value PostgreSQL stores for it in a column of that type."""
    result = stored_key(value, _col(type_))
    assert result == stored and type(result) is type(stored)


@pytest.mark.parametrize(
    ("type_", "value"),
    [
        (Integer(), 1.5),
        (Integer(), Decimal("10.2")),
        (Integer(), "1.0"),
        (Integer(), "1_000"),
        (Integer(), "\u0663"),  # an Arabic-Indic digit: Python reads it, PostgreSQL does not
        (Integer(), 2**31),
        (Integer(), float("nan")),
        (Integer(), True),
        (SmallInteger(), 2**15),
        (BigInteger(), 2**63),
        (Numeric(10, 2), Decimal("1e8")),
        (Numeric(10, 2), float("inf")),
        (Numeric(10, 2), 0.1 + 0.2),  # 17 significant digits: the drivers disagree
        (Numeric(10, 2), "NaN"),
        (String(3), "abcd"),
        (String(3), "ab\x00"),
        (String(), 1.5),
        (Uuid(), "urn:uuid:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (Uuid(), "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        (Uuid(), "a0eebc99-9c0b4-ef8-bb6d-6bb9bd380a11"),
        (Date(), datetime.datetime(2024, 1, 1, 12)),
        (Date(), "20240101"),
        (DateTime(), datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)),
        (DateTime(timezone=True), datetime.datetime(2024, 1, 1)),
    ],
)
def test_values_postgresql_would_store_differently_are_refused(type_: Any, value: Any) -> None:
    """A value PostgreSQL would refuse, or store differently per driver or session, is refused."""
    with pytest.raises((ValueError, TypeError, ArithmeticError)):
        stored_key(value, _col(type_))


def test_shard_key_error_names_model_column_and_value() -> None:
    """shard_for() turns a refused value into a ShardKeyError naming model, column and value."""
    shards = ShardSet({"a": "postgresql://u@127.0.0.1/x"}, strategy=HashSharding())
    with pytest.raises(ss.ShardKeyError, match=r"Order\.customer_id = 1\.5 .*fractions") as info:
        shards.shard_for(1.5, model="Order", column="customer_id", key_column=_col(Integer()))
    assert (info.value.model, info.value.column, info.value.value) == ("Order", "customer_id", 1.5)
    shards.dispose()


# -- against the shards ---------------------------------------------------------------------


@dataclass
class World:
    shards: ShardSet
    direct: dict[str, Engine]  # each shard's primary, outside any ShardSet


@pytest.fixture(scope="module")
def world(scale_cluster: LocalCluster) -> Iterator[World]:
    """The key tables on the four shards, a ShardSet over them with the suite's driver, and
    a plain engine per shard to ask each server what it stores."""
    import os

    driver = os.environ.get("SQLALCHEMY_SCALE_TEST_DRIVER", "psycopg2")
    direct = fresh_tables(scale_cluster, Base.metadata, SHARD_IDS, driver=driver)
    shards = ShardSet(
        {s: node.url(driver) for s, node in zip(SHARD_IDS, scale_cluster.shards, strict=True)},
        strategy=HashSharding(),
    )
    yield World(shards, direct)
    shards.dispose()
    for engine in direct.values():
        Base.metadata.drop_all(engine)
        engine.dispose()


def _holders(world: World, model: Any, id_: int) -> dict[str, Any]:
    """shard id -> the key value that shard's server stored for row ``id_``."""
    table = model.__table__
    found = {}
    for shard_id, engine in world.direct.items():
        with engine.connect() as conn:
            stored = conn.scalar(select(table.c.k).where(table.c.id == id_))
        if stored is not None:
            found[shard_id] = stored
    return found


def _direct_where(world: World, model: Any, value: Any) -> set[int] | None:
    """The ids the shards, queried directly, return together for ``k = value`` (None: error)."""
    table = model.__table__
    ids: set[int] = set()
    for engine in world.direct.values():
        try:
            with engine.connect() as conn:
                ids |= set(conn.scalars(select(table.c.id).where(table.c.k == value)))
        except (DBAPIError, StatementError):
            return None
    return ids


def _check_write(world: World, model: Any, value: Any, write: Callable[[Any, int], None]) -> None:
    id_ = next(_IDS)
    Session = sharded_sessionmaker(world.shards)
    with Session() as session:
        try:
            write(session, id_)
            session.commit()
        except ss.ShardKeyError as exc:
            assert exc.column == "k" and exc.value is value
            assert _holders(world, model, id_) == {}, "a refused key must write nothing"
            return
    holders = _holders(world, model, id_)
    assert len(holders) == 1, f"row {id_} with key {value!r} is on {sorted(holders)}"
    ((shard_id, stored),) = holders.items()
    # (char(n) comes back padded; PostgreSQL compares it without the padding)
    owner = world.shards.shard_for(stored, key_column=model.__table__.c.k)
    assert owner == shard_id, (
        f"{value!r} was stored as {stored!r} on {shard_id}, which does not own it"
    )
    with Session() as session:
        assert session.get(model, id_, shard_key=value) is not None
        by_option = session.scalars(
            select(model.id).where(model.id == id_).execution_options(shard_key=value)
        ).all()
        assert by_option == [id_]
        found = set(session.scalars(select(model.id).where(model.k == stored)))
        assert id_ in found
    expected = _direct_where(world, model, value)
    with Session() as session:
        try:
            got: set[int] | None = set(session.scalars(select(model.id).where(model.k == value)))
        except (DBAPIError, StatementError):
            got = None  # the servers refuse the comparison (text = integer)
    assert got == expected, f"WHERE k = {value!r}: sharded {got}, the shards directly {expected}"


def _orm_add(model: Any, value: Any) -> Callable[[Any, int], None]:
    return lambda session, id_: session.add(model(id=id_, k=value))


def _bulk_insert(model: Any, value: Any) -> Callable[[Any, int], None]:
    return lambda session, id_: session.execute(insert(model).values(id=id_, k=value))


numbers = st.one_of(
    st.integers(-(2**65), 2**65),
    st.integers(-20, 20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-100, 100).map(lambda f: round(f, 1)),
    st.decimals(
        allow_nan=False, allow_infinity=False, places=3, min_value=-(10**9), max_value=10**9
    ),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.integers(-(2**40), 2**40).map(str),
    st.sampled_from(["1.5", " 7 ", "+3", "0x10", "1_0", "\u0663", "1e3", "-0", "2.5e1", ".5"]),
)
texts = st.one_of(
    st.text(max_size=10),
    st.text(alphabet=" ab", max_size=6),
    st.integers(-999, 99999),
    st.floats(-10, 10),
)
uuids = st.uuids().flatmap(
    lambda u: st.sampled_from(
        [
            u,
            str(u),
            str(u).upper(),
            "{" + str(u) + "}",
            u.hex,
            "urn:uuid:" + str(u),
            "{" + u.hex,
            str(u)[:9] + "-" + str(u)[9:],
        ]
    )
)
dates = st.one_of(
    st.dates(),
    st.datetimes(),
    st.dates().map(lambda d: datetime.datetime.combine(d, datetime.time())),
    st.dates().map(lambda d: d.isoformat()),
    st.dates().map(lambda d: d.strftime("%Y%m%d")),
    st.datetimes(timezones=st.just(datetime.UTC)),
)

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

CASES: list[tuple[Any, Any]] = [
    (IntKey, numbers),
    (BigKey, numbers),
    (NumKey, numbers),
    (TextKey, texts),
    (CharKey, texts),
    (UuidKey, uuids),
    (DateKey, dates),
]


@pytest.mark.parametrize(("model", "values"), CASES, ids=[m.__name__ for m, _ in CASES])
@pytest.mark.parametrize("how", ["add", "insert"])
def test_keys_are_stored_on_the_shard_of_their_stored_value(
    world: World, model: Any, values: Any, how: str
) -> None:
    """Every generated key is refused with nothing written, or stored on the shard that owns
    the value the server stored and found by get(), shard_key= and WHERE, as one database would."""
    write = _orm_add if how == "add" else _bulk_insert

    @SETTINGS
    @given(value=values)
    def check(value: Any) -> None:
        _check_write(world, model, value, write(model, value))

    check()


def test_non_integral_keys_of_the_issue_are_refused_on_every_path(world: World) -> None:
    """1.5, 2.5, 7.6, Decimal('10.2') and 12.5 for an integer key are refused by add, insert,
    get, shard_key= and WHERE, and nothing is written."""
    Session = sharded_sessionmaker(world.shards)
    for value in (1.5, 2.5, 7.6, Decimal("10.2"), 12.5):
        id_ = next(_IDS)
        with Session() as session:
            session.add(IntKey(id=id_, k=value))
            with pytest.raises(ss.ShardKeyError, match="fractions"):
                session.flush()
            session.rollback()
            with pytest.raises(ss.ShardKeyError):
                session.execute(insert(IntKey).values(id=id_, k=value))
            session.rollback()
            with pytest.raises(ss.ShardKeyError):
                session.get(IntKey, id_, shard_key=value)
            with pytest.raises(ss.ShardKeyError):
                session.scalars(select(IntKey).execution_options(shard_key=value)).all()
            with pytest.raises(ss.ShardKeyError):
                session.scalars(select(IntKey).where(IntKey.k == value)).all()
        assert _holders(world, IntKey, id_) == {}
        for engine in world.direct.values():
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM pg_prepared_xacts")) == 0
