"""Differential proof: a ShardedSession over four shards answers as one PostgreSQL database,
or refuses before anything runs.

The same data (customers sharded by key, orders co-located by the same key, a
global ``__shard__ = "all"`` table; NULLs, ties, NaN and +/-Infinity, mixed-case
and non-ASCII text; a column whose DDL collation is ICU while the model does not
say so) is loaded into one database (the cluster's primary, schema
``shdiff``) and, placed by each of the four strategies, into the four shard
servers. Every shape of issue 8's table and of docs/sharding.md's list is run on
both and compared (as multisets, or as ordered lists where ORDER BY makes the
order total); writes run inside a transaction that is rolled back, and compare
the rowcount and the table afterwards. A hypothesis test then generates random
statements (filters, order, limit, aggregates, subqueries, EXISTS, global-table
joins, bulk UPDATE/DELETE) and asserts each is answered exactly as one database
does, or refused with nothing changed on any shard.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from sqlalchemy import (
    Engine,
    Enum,
    Float,
    ForeignKey,
    MetaData,
    Numeric,
    String,
    create_engine,
    delete,
    exists,
    extract,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

import sqlalchemy_scale as ss
from sqlalchemy_scale._sa import select_distinct_on
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.sharding import (
    DirectorySharding,
    HashSharding,
    JumpHashSharding,
    RangeSharding,
    ShardSet,
    sharded_sessionmaker,
)

SCHEMA = "shdiff"


class Base(DeclarativeBase):
    metadata = MetaData(schema=SCHEMA)


class Country(Base):
    __tablename__ = "countries"
    __shard__ = "all"

    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str]


class Customer(Base):
    __tablename__ = "customers"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str]
    country_code: Mapped[str | None] = mapped_column(String(2))
    score: Mapped[float | None] = mapped_column(Float)
    # declared out of alphabetical order: PostgreSQL sorts an enum by declaration
    tier: Mapped[str] = mapped_column(Enum("silver", "gold", "bronze", name="tier", schema=SCHEMA))


class Account(Base):
    __tablename__ = "accounts"
    __shard_key__ = "customer_id"
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "account"}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int]
    kind: Mapped[str]


class Premium(Account):
    """Joined-table inheritance: the subclass table has no shard key column."""

    __tablename__ = "premium_accounts"
    __mapper_args__ = {"polymorphic_identity": "premium"}  # noqa: RUF012

    id: Mapped[int] = mapped_column(ForeignKey(f"{SCHEMA}.accounts.id"), primary_key=True)
    level: Mapped[float | None] = mapped_column(Float)


class Memo(Base):
    """Placed on one shard (``__shard__ = "s2"``)."""

    __tablename__ = "memos"
    __shard__ = "s2"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int]


class Order(Base):
    __tablename__ = "orders"
    __shard_key__ = "customer_id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int]
    amount: Mapped[Decimal | None] = mapped_column(Numeric)
    ratio: Mapped[float | None] = mapped_column(Float)
    note: Mapped[str | None]


class Label(Base):
    """Its column is created ``COLLATE "und-x-icu"`` by DDL; the model does not say so."""

    __tablename__ = "labels"
    __shard_key__ = "customer_id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int]
    body: Mapped[str]


class Stamp(Base):
    """A global table whose ``token`` has a Python default computed per INSERT."""

    __tablename__ = "stamps"
    __shard__ = "all"

    code: Mapped[str] = mapped_column(String(8), primary_key=True)
    token: Mapped[str] = mapped_column(default=lambda: uuid.uuid4().hex)


PREMIUM_TABLE: Any = Premium.__table__
KEYS = range(40)
NO_SHARD_KEY = 100  # outside RangeSharding's ranges and absent from the directory
STRATEGIES: dict[str, Callable[[], Any]] = {
    "hash": HashSharding,
    "range": lambda: RangeSharding([0, 10, 20, 30, 40]),
    "directory": lambda: DirectorySharding({k: f"s{(k * 7) % 4}" for k in KEYS}),
    "jumphash": JumpHashSharding,
}
NAMES = [
    "alice",
    "Bob",
    "bob",
    "Émile",
    "zoë",
    "Zed",
    "ÅSA",
    "ärger",
    "Ölaf",
    "ñandú",
    "Ελλάδα",
    "a b",
]
NOTES = [None, "x", "X", "apple", "Apple", "éclair", "Zebra", "zebra", "ñ", "", "日本"]
FLOATS = [None, 0.0, -0.0, 1.5, 1.5, -3.25, 2.0, float("nan"), float("inf"), float("-inf"), 7.0]
AMOUNTS = [None, Decimal("10.50"), Decimal("10.5"), Decimal("99.99"), Decimal("-4.00")]
AMOUNTS += [
    Decimal("NaN"),
    Decimal("Infinity"),
    Decimal("-Infinity"),
    Decimal("0"),
    Decimal("123456.78"),
]


def _rows() -> dict[type[Base], list[dict[str, Any]]]:
    rng = random.Random(8)
    codes = ["DE", "FR", "AT", "ES", "IT", "PL", "SE", "NO", "DK", "FI", "PT", "GR"]
    countries = [{"code": c, "name": NAMES[i % len(NAMES)] + c} for i, c in enumerate(codes)]
    customers = [
        {
            "id": k,
            "name": rng.choice(NAMES),
            "country_code": rng.choice([*codes[:7], None]),
            "score": rng.choice(FLOATS),
            "tier": rng.choice(["silver", "gold", "bronze"]),
        }
        for k in KEYS
    ]
    orders = [
        {
            "id": i,
            "customer_id": rng.choice(KEYS[:37]),  # customers 37-39 have no orders
            "amount": rng.choice(AMOUNTS),
            "ratio": rng.choice(FLOATS),
            "note": rng.choice(NOTES),
        }
        for i in range(160)
    ]
    labels = [
        {"id": i, "customer_id": rng.choice(KEYS), "body": rng.choice(NAMES)} for i in range(30)
    ]
    memos = [{"id": i, "customer_id": rng.choice(KEYS)} for i in range(8)]
    accounts = [
        {"id": i, "customer_id": rng.choice(KEYS), "kind": "premium" if i % 2 else "account"}
        for i in range(24)
    ]
    premium = [{"id": a["id"], "level": rng.choice(FLOATS)} for a in accounts if a["id"] % 2]
    return {
        Country: countries,
        Customer: customers,
        Order: orders,
        Label: labels,
        Memo: memos,
        Account: accounts,
        PREMIUM_TABLE: premium,  # type: ignore[dict-item]
    }


ROWS = _rows()


@dataclass
class World:
    name: str
    shards: ShardSet
    shard_engines: dict[str, Engine]
    single: Engine

    def sharded(self) -> Session:
        return sharded_sessionmaker(self.shards)()

    def one(self) -> Session:
        return Session(self.single)


def _create(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            text(f'ALTER TABLE {SCHEMA}.labels ALTER COLUMN body TYPE varchar COLLATE "und-x-icu"')
        )
        conn.execute(
            text(f"CREATE AGGREGATE {SCHEMA}.total(float8) (sfunc = float8pl, stype = float8)")
        )


@pytest.fixture(scope="module")
def engines(
    scale_cluster: LocalCluster, shard_urls: dict[str, str], driver: str
) -> Iterator[tuple[dict[str, Engine], Engine]]:
    """One engine per shard server and one for the single database, with the schema."""
    shard_engines = {s: create_engine(url) for s, url in shard_urls.items()}
    single = create_engine(scale_cluster.primary.url(driver))
    for engine in [*shard_engines.values(), single]:
        _create(engine)
    yield shard_engines, single
    for engine in [*shard_engines.values(), single]:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        engine.dispose()


@pytest.fixture(scope="module", params=list(STRATEGIES))
def world(
    request: pytest.FixtureRequest,
    engines: tuple[dict[str, Engine], Engine],
    shard_urls: dict[str, str],
) -> Iterator[World]:
    """The data loaded into the single database and, placed by one strategy, into the shards."""
    shard_engines, single = engines
    shards = ShardSet(
        shard_urls, strategy=STRATEGIES[request.param](), cross_shard_writes="two_phase"
    )
    placed: dict[str, dict[type[Base], list[dict[str, Any]]]] = {s: {} for s in shard_engines}
    for model, rows in ROWS.items():
        for row in rows:
            if model is Country:
                targets = list(shard_engines)
            elif model is Memo:
                targets = ["s2"]
            elif model is PREMIUM_TABLE:
                owner = next(a for a in ROWS[Account] if a["id"] == row["id"])
                targets = [shards.shard_for(owner["customer_id"])]
            else:
                key = row["id"] if model is Customer else row["customer_id"]
                targets = [shards.shard_for(key)]
            for shard_id in targets:
                placed[shard_id].setdefault(model, []).append(row)
    for shard_id, engine in shard_engines.items():
        _load(engine, placed[shard_id])
    _load(single, ROWS)
    yield World(request.param, shards, shard_engines, single)
    shards.dispose()


def _load(engine: Engine, rows: dict[type[Base], list[dict[str, Any]]]) -> None:
    with engine.begin() as conn:
        for model in (PREMIUM_TABLE, Account, Memo, Label, Order, Customer, Country):
            conn.execute(delete(model))
        for model, values in rows.items():
            if values:
                conn.execute(insert(model), values)


# -- comparing answers --------------------------------------------------------------------


def _value(v: Any) -> Any:
    if isinstance(v, Base):
        return (type(v).__name__, v.id if not isinstance(v, Country) else v.code)
    if isinstance(v, float | Decimal):
        if (isinstance(v, Decimal) and v.is_nan()) or (isinstance(v, float) and math.isnan(v)):
            return "NaN"
        if math.isinf(float(v)):
            return float(v)
        # sums and averages of the shards' partials may differ in the last bits; -0.0 and
        # 0.0 are equal in PostgreSQL, and which one a group shows depends on the plan
        return float(f"{float(v):.10g}") + 0.0
    return v


def _rows_of(result: Any) -> list[tuple[Any, ...]]:
    return [tuple(_value(v) for v in row) for row in result]


def _bag(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(rows, key=repr)


Query = Callable[[Session], Any]


def _outcome(world: World, query: Query) -> tuple[Any, Any]:
    """(sharded answer or the CrossShardQueryError, one database's answer), writes rolled back."""
    with world.sharded() as sharded, world.one() as one:
        before = _state(sharded)
        want = query(one)
        try:
            got: Any = query(sharded)
        except (ss.CrossShardQueryError, ss.ShardKeyError) as exc:
            got = exc
            # Refused before anything ran: the data is unchanged on every shard.
            assert _state(sharded) == before, f"refused but changed: {exc}"
        sharded.rollback()
        one.rollback()
    return got, want


def _state(session: Session) -> list[tuple[Any, ...]]:
    """Everything a write may change, read through the session (every shard)."""
    orders = session.execute(select(Order.id, Order.amount, Order.ratio, Order.note)).all()
    countries = session.execute(select(Country.code, Country.name)).all()
    return _bag(_rows_of(orders)) + _bag(_rows_of(countries))


def rows(stmt: Any) -> Query:
    return lambda s: _bag(_rows_of(s.execute(stmt)))


def ordered(stmt: Any) -> Query:
    return lambda s: _rows_of(s.execute(stmt))


def write(stmt: Any) -> Query:
    def run(session: Session) -> Any:
        result = session.execute(stmt)
        return (result.rowcount, _state(session))  # type: ignore[attr-defined]

    return run


o2 = aliased(Order)
grouped = select(Order.customer_id, func.count().label("n")).group_by(Order.customer_id).subquery()
avg_amount = select(func.avg(Order.amount)).scalar_subquery()
correlated_avg = select(func.avg(o2.ratio)).where(o2.customer_id == Order.customer_id)
has_big_order = select(Order.id).where(Order.customer_id == Customer.id, Order.amount > 50)
# data-modifying WITHs: customer 7's orders may live on another shard than customer 3's
cte_7 = delete(Order).where(Order.customer_id == 7).returning(Order.id).cte("d")
countries_cte = update(Country).values(name="w").returning(Country.code).cte("u")
month = func.date_trunc("month", func.make_date(2024, Order.customer_id % 12 + 1, 1))

# ORM bulk statements: rows given as parameters (SQLAlchemy's bulk persistence)
BULK_ORDERS = [  # keys of every shard under each strategy, out of order
    {"id": 900 + i, "customer_id": k, "note": f"b{i}", "ratio": 0.5 * i}
    for i, k in enumerate([13, 2, 38, 7, 21, 0, 30, 5, 17, 26, 11, 34])
]
BULK_STAMPS = [{"code": c, "token": f"t{c}"} for c in ("m", "b", "x", "d")]
BULK_UPSERT = [  # existing orders (their own keys) and new ones, on several shards
    *({"id": o["id"], "customer_id": o["customer_id"], "note": "up"} for o in ROWS[Order][:6]),
    *({"id": 950 + k, "customer_id": k, "note": "new"} for k in (3, 19, 27, 36)),
]
_upsert = pg_insert(Order)
upsert_orders = _upsert.on_conflict_do_update(
    index_elements=[Order.id], set_={"note": _upsert.excluded.note}
)
_upsert_global = pg_insert(Country)
upsert_countries = _upsert_global.on_conflict_do_update(
    index_elements=[Country.code], set_={"name": _upsert_global.excluded.name}
)


def _stamps(session: Session) -> list[tuple[Any, ...]]:
    return _bag(_rows_of(session.execute(select(Stamp.code, Stamp.token))))


BULK_PREMIUM = [
    {"id": 100 + k, "customer_id": k, "kind": "premium", "level": k / 2} for k in (3, 38, 17, 0, 22)
]


def _premium(session: Session) -> list[tuple[Any, ...]]:
    columns = (Premium.id, Premium.customer_id, Premium.kind, Premium.level)
    return _bag(_rows_of(session.execute(select(*columns))))


def _customers(session: Session) -> list[tuple[Any, ...]]:
    return _bag(_rows_of(session.execute(select(Customer.id, Customer.name))))


def bulk(stmt: Any, params: list[dict[str, Any]], state: Query = _state, **options: Any) -> Query:
    """An ORM bulk statement: its result rows (in their order) and the data afterwards."""

    def run(session: Session) -> Any:
        result = session.execute(stmt, params, execution_options=options)
        try:
            rows: Any = _rows_of(result)
        except sa_exc.ResourceClosedError:  # no RETURNING: a result without rows
            rows = "no rows"
        return (rows, state(session))

    return run


def _returned_entities(session: Session) -> Any:
    """RETURNING of entities: their values in order, and that they are the session's
    identity-mapped objects (a later get() of the same row gives the same object)."""
    objects = session.scalars(insert(Order).returning(Order), BULK_ORDERS).all()
    same = [session.get(Order, o.id) is o for o in objects]
    return [(o.id, o.customer_id, o.note) for o in objects], same, _state(session)


SAME: dict[str, Query] = {
    # rows, order, limit
    "rows": rows(select(Order.id, Order.amount, Order.ratio, Order.note)),
    "entities": lambda s: _bag(_rows_of((o,) for o in s.scalars(select(Order)))),
    "order ratio nan inf nulls": ordered(
        select(Order.id, Order.ratio).order_by(Order.ratio, Order.id)
    ),
    "order amount desc": ordered(
        select(Order.id, Order.amount).order_by(Order.amount.desc(), Order.id).limit(25)
    ),
    "order nulls first offset": ordered(
        select(Order.id)
        .order_by(Order.ratio.asc().nulls_first(), Order.id.desc())
        .limit(7)
        .offset(5)
    ),
    "order text C": ordered(
        select(Customer.id, Customer.name).order_by(Customer.name, Customer.id)
    ),
    "order lower(text) C": ordered(
        select(Customer.id, func.lower(Customer.name).label("l")).order_by("l", Customer.id)
    ),
    "order hidden": ordered(select(Order.id).order_by(Order.note.desc(), Order.id).limit(9)),
    "order collate C of ICU column": ordered(
        select(Label.id, Label.body.collate("C").label("b")).order_by("b", Label.id)
    ),
    "entities ordered limited": lambda s: [
        o.id for o in s.scalars(select(Order).order_by(Order.amount, Order.id).limit(11))
    ],
    # aggregates
    "aggregates": rows(
        select(
            func.count(),
            func.count(Order.amount),
            func.sum(Order.ratio),
            func.min(Order.ratio),
            func.max(Order.ratio),
            func.min(Order.amount),
            func.max(Order.amount),
            func.min(Order.note),
            func.max(Customer.name).label("m"),
        )
        .select_from(Order)
        .join(Customer, Customer.id == Order.customer_id)
    ),
    "avg": rows(select(func.avg(Order.ratio), func.sum(Order.amount), func.avg(Order.customer_id))),
    "avg numeric digit for digit": lambda s: sorted(
        tuple(str(v) for v in row)
        for row in s.execute(
            select((Order.customer_id % 5).label("g"), func.avg(Order.amount), func.avg(Order.id))
            .where(Order.amount < 1_000_000, Order.amount > -1_000_000)
            .group_by("g")
        )
    ),
    "avg integers digit for digit": lambda s: str(s.scalar(select(func.avg(Order.customer_id)))),
    "group by nan": rows(select(Order.ratio, func.count()).group_by(Order.ratio)),
    "group by numeric nan": rows(
        select(Order.amount, func.count(), func.max(Order.ratio)).group_by(Order.amount)
    ),
    "group by date_trunc": rows(select(month, func.count()).group_by(month)),
    "group by equal expressions": rows(
        select(func.lower(Order.note), func.count()).group_by(func.lower(Order.note))
    ),
    "group by label": rows(
        select(
            extract("month", func.make_date(2024, Order.customer_id % 12 + 1, 1)).label("m"),
            func.sum(Order.ratio),
        ).group_by("m")
    ),
    "joined inheritance": lambda s: _bag(
        [(p.id, p.customer_id, _value(p.level)) for p in s.scalars(select(Premium))]
    ),
    "joined inheritance pruned": rows(
        select(Premium.id, Premium.level).where(Premium.customer_id.in_([3, 17, 33]))
    ),
    "joined inheritance aggregate": rows(
        select(
            (Premium.customer_id % 3).label("g"), func.count(), func.max(Premium.level)
        ).group_by("g")
    ),
    "group by enum": rows(select(Customer.tier, func.count()).group_by(Customer.tier)),
    "pinned table": rows(select(Memo.id, Country.code).join(Country, Country.code > "S")),
    "group by ICU column": rows(select(Label.body, func.count()).group_by(Label.body)),
    "group order limit": ordered(
        select(Order.customer_id, func.count().label("n"))
        .group_by(Order.customer_id)
        .order_by(func.count().desc(), Order.customer_id)
        .limit(6)
    ),
    # joins and subqueries
    "colocated join": rows(
        select(Order.id, Customer.name).join(Customer, Customer.id == Order.customer_id)
    ),
    "left join, key or null": rows(
        select(Customer.id, Order.id)
        .outerjoin(Order, Order.customer_id == Customer.id)
        .where((Order.customer_id == 5) | Order.customer_id.is_(None))
    ),
    "colocated left join": rows(
        select(Customer.id, Order.id).outerjoin(Order, Order.customer_id == Customer.id)
    ),
    "global join": rows(
        select(Customer.id, Country.name).join(Country, Country.code == Customer.country_code)
    ),
    "sharded left join global": rows(
        select(Customer.id, Country.name).outerjoin(Country, Country.code == Customer.country_code)
    ),
    "correlated exists": rows(select(Customer.id).where(exists(has_big_order))),
    "correlated not exists": rows(select(Customer.id).where(~exists(has_big_order))),
    "correlated scalar": rows(
        select(Order.id).where(Order.ratio > correlated_avg.scalar_subquery())
    ),
    "distinct": rows(select(Order.note).distinct()),
    "distinct nan and nulls": rows(select(Order.ratio, Order.amount).distinct()),
    "distinct ordered limited": ordered(
        select(Order.note, Order.ratio)
        .distinct()
        .order_by(Order.note, Order.ratio)
        .limit(9)
        .offset(2)
    ),
    "query count distinct": lambda s: s.query(Order.note).distinct().count(),
    "semi-join on the key": rows(
        select(Order.id).where(
            Order.customer_id.in_(select(Customer.id).where(Customer.name > "a").distinct())
        )
    ),
    "anti-join on the key": rows(
        select(Order.id).where(
            Order.customer_id.not_in(select(Customer.id).where(Customer.country_code == "DE"))
        )
    ),
    "semi-join on grouped keys": rows(
        select(Customer.id).where(
            Customer.id.in_(
                select(Order.customer_id).group_by(Order.customer_id).having(func.count() > 4)
            )
        )
    ),
    "global subquery": rows(
        select(Customer.id).where(
            Customer.country_code.in_(select(Country.code).where(Country.name > "a"))
        )
    ),
    "pinned subquery": rows(
        select(Order.id).where(
            Order.customer_id == 5,
            Order.ratio > select(func.avg(o2.ratio)).where(o2.customer_id == 5).scalar_subquery(),
        )
    ),
    "plain derived table": rows(
        select(func.count()).select_from(select(Order.id).where(Order.ratio > 0).subquery())
    ),
    # answered
    "exists": rows(select(exists().where(Order.amount > 50_000))),
    "exists and not exists": rows(
        select(exists().where(Order.ratio > 5), ~exists().where(Order.note == "日本"))
    ),
    "not exists": rows(select(~exists().where(Order.ratio > 1e300, Order.ratio < float("inf")))),
    "exists false": rows(select(exists().where(Order.ratio > 1e300, Order.ratio < float("inf")))),
    "query exists": lambda s: s.query(s.query(Order).filter(Order.ratio > 5).exists()).scalar(),
    "query count limit": lambda s: s.query(Order).order_by(Order.id).limit(10).count(),
    "query count group by": lambda s: (
        s.query(Order.customer_id).group_by(Order.customer_id).count()
    ),
    "query count": lambda s: s.query(Order).filter(Order.ratio > 0).count(),
    # keys no shard owns
    "key no shard owns": rows(select(Order.id).where(Order.customer_id == NO_SHARD_KEY)),
    "key in with null": rows(select(Order.id).where(Order.customer_id.in_([5, None]))),
    "get unowned": lambda s: s.get(Customer, NO_SHARD_KEY),
    "get owned": lambda s: _value(s.get(Customer, 7)),
    "count unowned": rows(select(func.count()).where(Order.customer_id == NO_SHARD_KEY)),
    # writes (rolled back)
    "update pruned": write(update(Order).where(Order.customer_id == 3).values(note="w")),
    "update all": write(update(Order).where(Order.ratio > 1).values(note="w")),
    "delete correlated": write(delete(Order).where(Order.ratio > correlated_avg.scalar_subquery())),
    "insert with a subquery on its shard": write(
        insert(Order).values(
            id=500,
            customer_id=5,
            ratio=select(func.max(o2.ratio)).where(o2.customer_id == 5).scalar_subquery(),
        )
    ),
    "update global rowcount": write(update(Country).where(Country.code < "F").values(name="n")),
    "delete global": write(delete(Country).where(Country.code == "GR")),
    # ORM bulk statements (rolled back)
    "orm bulk insert of a global table": bulk(insert(Stamp), BULK_STAMPS, _stamps),
    "orm bulk insert of a global table returning": bulk(
        insert(Stamp).returning(Stamp.code, Stamp.token, sort_by_parameter_order=True),
        BULK_STAMPS,
        _stamps,
    ),
    "orm bulk insert of a global table returning entities": lambda s: (
        [(x.code, x.token) for x in s.scalars(insert(Stamp).returning(Stamp), BULK_STAMPS)],
        _stamps(s),
    ),
    "multi-row VALUES of a global table giving every value": lambda s: (
        s.execute(insert(Stamp).values(BULK_STAMPS)).rowcount,  # type: ignore[attr-defined]
        _stamps(s),
    ),
    "orm bulk upsert of a global table": bulk(
        upsert_countries.returning(Country.code, Country.name, sort_by_parameter_order=True),
        [{"code": "DE", "name": "de"}, {"code": "ZZ", "name": "zz"}],
    ),
    "orm bulk update of a global table by primary key": bulk(
        update(Country), [{"code": "DE", "name": "de"}, {"code": "FR", "name": "fr"}]
    ),
    "orm bulk insert of rows of every shard": bulk(insert(Order), BULK_ORDERS),
    "orm bulk insert returning in parameter order": bulk(
        insert(Order).returning(Order.id, Order.customer_id, sort_by_parameter_order=True),
        BULK_ORDERS,
    ),
    "orm bulk insert returning entities": _returned_entities,
    "orm bulk insert returning without sort_by_parameter_order": bulk(
        insert(Order).returning(Order.id), BULK_ORDERS
    ),
    "orm bulk insert of one row": bulk(insert(Order), BULK_ORDERS[:1]),
    "orm bulk update of no rows": bulk(update(Order), []),
    "orm bulk insert with VALUES for every row": bulk(
        insert(Order).values(note="v"), [{"id": 990 + k, "customer_id": k} for k in (4, 33, 12)]
    ),
    "orm bulk insert of a joined-inheritance subclass returning": bulk(
        insert(Premium).returning(Premium.id, Premium.level, sort_by_parameter_order=True),
        BULK_PREMIUM,
        _premium,
    ),
    "orm bulk upsert of rows of every shard": bulk(upsert_orders, BULK_UPSERT),
    "orm bulk upsert returning in parameter order": bulk(
        upsert_orders.returning(Order.id, Order.note, sort_by_parameter_order=True), BULK_UPSERT
    ),
    "orm bulk update by a primary key holding the shard key": bulk(
        update(Customer),
        [{"id": k, "name": f"n{k}"} for k in (31, 4, 17, 22, 9, 0)],
        _customers,
    ),
    "orm bulk update by primary key with WHERE criteria": bulk(
        update(Order).where(Order.ratio > 0),
        [{"id": o["id"], "note": "w"} for o in ROWS[Order][:20]],
        synchronize_session=False,
    ),
}

REFUSED: dict[str, Query] = {
    "orm bulk update by a primary key without the shard key": bulk(
        update(Order), [{"id": o["id"], "note": "w"} for o in ROWS[Order][:5]]
    ),
    "returning of a bulk upsert that may skip rows, on several shards": bulk(
        pg_insert(Order)
        .on_conflict_do_nothing(index_elements=[Order.id])
        .returning(Order.id, sort_by_parameter_order=True),
        BULK_UPSERT,
    ),
    "multi-row VALUES of rows of several shards": lambda s: (
        s.execute(insert(Order).values(BULK_ORDERS)).rowcount,  # type: ignore[attr-defined]
        _state(s),
    ),
    "delete max": write(
        delete(Order).where(Order.amount == select(func.max(Order.amount)).scalar_subquery())
    ),
    "insert with a global max": write(
        insert(Order).values(
            id=500, customer_id=5, ratio=select(func.max(o2.ratio)).scalar_subquery()
        )
    ),
    "update above avg": write(update(Order).where(Order.amount > avg_amount).values(note="w")),
    "select above avg": rows(select(Order.id).where(Order.amount > avg_amount)),
    "pruned with global avg": rows(
        select(Order.id).where(Order.customer_id == 5, Order.amount > avg_amount)
    ),
    "in top 5": rows(
        select(Order.id).where(Order.id.in_(select(Order.id).order_by(Order.id).limit(5)))
    ),
    "uncorrelated exists": rows(
        select(Customer.id).where(exists(select(Order.id).where(Order.amount > 50_000)))
    ),
    "global in sharded": rows(
        select(Country.code).where(Country.code.in_(select(Customer.country_code)))
    ),
    "global not in sharded": rows(
        select(Country.code).where(Country.code.not_in(select(Customer.country_code)))
    ),
    "global exists sharded": rows(
        select(Country.code).where(exists().where(Customer.country_code == Country.code))
    ),
    "global left join sharded": rows(
        select(Country.code, Customer.id).outerjoin(Customer, Customer.country_code == Country.code)
    ),
    "distinct on": rows(
        select_distinct_on(select(Order.customer_id, Order.id), Order.customer_id).order_by(
            Order.customer_id, Order.id
        )
    ),
    "distinct entities": rows(select(Order).distinct()),
    "order ICU column": ordered(select(Label.id, Label.body).order_by(Label.body, Label.id)),
    "order lower(ICU column)": ordered(
        select(Label.id, func.lower(Label.body).label("l")).order_by("l", Label.id)
    ),
    "min ICU column": rows(select(func.min(Label.body))),
    "window": rows(select(Order.id, func.rank().over(order_by=Order.ratio))),
    "string_agg": rows(select(func.string_agg(Order.note, ","))),
    "having": rows(select(Order.customer_id).group_by(Order.customer_id).having(func.count() > 3)),
    "user-defined aggregate": rows(select(getattr(func, SCHEMA).total(Order.ratio))),
    "user-defined aggregate in a FROM subquery": rows(
        select(func.count()).select_from(
            select(getattr(func, SCHEMA).total(Order.ratio).label("t")).subquery()
        )
    ),
    "user-defined aggregate in EXISTS": rows(
        select(~exists(select(getattr(func, SCHEMA).total(Order.ratio)).where(Order.ratio > 1e300)))
    ),
    "count distinct": rows(select(func.count(Order.note.distinct()))),
    "fetch": rows(select(Order.id).order_by(Order.id).fetch(3)),
    "filter": rows(select(func.count().filter(Order.ratio > 0))),
    "aggregate expression": rows(select(func.count() + 1).select_from(Order)),
    "entity with aggregate": rows(select(Order, func.count()).group_by(Order.id)),
    "ungrouped column": rows(  # PostgreSQL accepts it: name depends on the primary key
        select(Customer.id, Customer.name, func.count(Order.id))
        .join(Order, Order.customer_id == Customer.id)
        .group_by(Customer.id)
    ),
    "order by unselected in entity query": lambda s: [
        o.id for o in s.scalars(select(Order).order_by(Order.ratio + 1, Order.id))
    ],
    "union": rows(select(Order.id).union_all(select(Customer.id))),
    "for update": rows(select(Order.id).with_for_update()),
    "order by enum": ordered(
        select(Customer.id, Customer.tier).order_by(Customer.tier, Customer.id)
    ),
    "text statement": lambda s: s.execute(text(f"SELECT count(*) FROM {SCHEMA}.orders")).all(),
    "derived table that groups": rows(select(func.max(grouped.c.n)).select_from(grouped)),
    "sharded rows with a one-shard table": rows(
        select(Order.id, Memo.id).join(Memo, Memo.customer_id == Order.customer_id)
    ),
    "order by an array": ordered(
        select(Order.id, func.array_agg(Order.ratio).label("a")).group_by(Order.id).order_by("a")
    ),
    "non-colocated join": rows(select(Order.id, o2.id).join(o2, o2.id == Order.id)),
    "delete in a WITH of a pruned select": lambda s: (
        _bag(_rows_of(s.execute(select(Order.id).where(Order.customer_id == 3).add_cte(cte_7)))),
        _state(s),
    ),
    "update of a global table in a WITH": write(
        update(Order).where(Order.customer_id == 3).values(note="x").add_cte(countries_cte)
    ),
    "global write with clock_timestamp()": write(
        update(Country).where(Country.code < "F").values(name=func.clock_timestamp().cast(String))
    ),
    "group by a label named like a column": rows(  # PostgreSQL groups by orders.note
        select(func.lower(Order.note).label("note"), func.count()).group_by("note")
    ),
    "a read of every shard picking global rows by LIMIT": rows(
        select(Customer.id).where(
            Customer.country_code.in_(select(Country.code).where(Country.code > "D").limit(2))
        )
    ),
    "update from a non-colocated table": write(
        update(Order).where(Order.id == Customer.id).values(note="c")
    ),
    "update global from sharded": write(
        update(Country).where(Country.code == Customer.country_code).values(name="n")
    ),
    "delete global using sharded": write(
        delete(Country).where(Country.code == Customer.country_code, Customer.score > 1)
    ),
    "write global from sharded": write(
        update(Country).where(Country.code.in_(select(Customer.country_code))).values(name="n")
    ),
}


#: Which differential cases exercise each row of the planner's table (docs/sharding.md).
COVERAGE: dict[str, list[str]] = {
    "rows": ["rows"],
    "order_by": ["order ratio nan inf nulls", "order text C", "order lower(text) C"],
    "order_by_hidden": ["order hidden"],
    "limit_offset": ["order nulls first offset", "entities ordered limited"],
    "aggregates": ["aggregates", "avg", "avg numeric digit for digit"],
    "group_by_expression": ["group by date_trunc", "group by equal expressions", "group by label"],
    "orm_entities": ["entities", "entities ordered limited"],
    "colocated_join": ["colocated join", "colocated left join", "joined inheritance"],
    "global_join": ["global join", "sharded left join global"],
    "correlated_subquery": ["correlated exists", "correlated scalar", "delete correlated"],
    "key_semi_join": ["semi-join on the key", "anti-join on the key", "semi-join on grouped keys"],
    "global_subquery": ["global subquery"],
    "plain_derived_table": ["plain derived table", "query count"],
    "exists": ["exists", "exists and not exists", "query exists"],
    "count_of_rows": ["query count limit", "query count group by"],
    "global_write": [
        "update global rowcount",
        "delete global",
        "orm bulk insert of a global table",
        "orm bulk insert of a global table returning",
        "orm bulk update of a global table by primary key",
        "orm bulk upsert of a global table",
        "multi-row VALUES of a global table giving every value",
    ],
    "bulk_rows": [
        "orm bulk insert of rows of every shard",
        "orm bulk insert returning in parameter order",
        "orm bulk insert returning entities",
        "orm bulk insert with VALUES for every row",
        "orm bulk insert of a joined-inheritance subclass returning",
        "orm bulk upsert returning in parameter order",
        "orm bulk update by a primary key holding the shard key",
    ],
    "bulk_update_without_key": ["orm bulk update by a primary key without the shard key"],
    "values_of_several_shards": ["multi-row VALUES of rows of several shards"],
    "bulk_returning_skipping_rows": [
        "returning of a bulk upsert that may skip rows, on several shards"
    ],
    "pruned": ["update pruned", "key no shard owns", "key in with null", "pinned table"],
    "pinned_subquery": ["pinned subquery"],
    "uncorrelated_subquery": [
        "select above avg",
        "pruned with global avg",
        "in top 5",
        "delete max",
    ],
    "global_reads_sharded": [
        "global in sharded",
        "global exists sharded",
        "write global from sharded",
        "update global from sharded",
        "delete global using sharded",
    ],
    "global_outer_join": ["global left join sharded"],
    "non_colocated_join": ["non-colocated join", "update from a non-colocated table"],
    "pinned_table_join": ["sharded rows with a one-shard table"],
    "derived_table": ["derived table that groups"],
    "distinct_rows": [
        "distinct",
        "distinct nan and nulls",
        "distinct ordered limited",
        "query count distinct",
    ],
    "distinct": ["distinct on", "distinct entities"],
    "count_distinct": ["count distinct"],
    "window": ["window"],
    "having": ["having"],
    "fetch": ["fetch"],
    "filter": ["filter"],
    "aggregate_expression": ["aggregate expression"],
    "other_aggregate": [
        "string_agg",
        "user-defined aggregate",
        "user-defined aggregate in a FROM subquery",
        "user-defined aggregate in EXISTS",
    ],
    "entity_aggregate": ["entity with aggregate"],
    "ungrouped_column": ["ungrouped column"],
    "order_unselected": ["order by unselected in entity query"],
    "compound": ["union"],
    "for_update": ["for update"],
    "enum_order": ["order by enum"],
    "collation": ["order ICU column", "order lower(ICU column)", "min ICU column"],
    "not_a_select": ["text statement", "insert with a global max"],
    "unknown": [
        "order by an array",
    ],
    "global_write_per_run": ["global write with clock_timestamp()"],
    "global_rows_by_limit": ["a read of every shard picking global rows by LIMIT"],
    "writing_cte": ["delete in a WITH of a pruned select", "update of a global table in a WITH"],
    "group_by_label_named_like_column": ["group by a label named like a column"],
}


def test_every_shape_of_the_planner_is_exercised_here() -> None:
    """Each row of the planner's table (and so of docs/sharding.md) has differential cases, on
    the side its verdict says."""
    from sqlalchemy_scale.sharding.shapes import SHAPES

    assert set(COVERAGE) == set(SHAPES)
    for shape, cases in COVERAGE.items():
        side = REFUSED if SHAPES[shape].verdict == "refused" else SAME
        assert cases and all(case in side for case in cases), shape


@pytest.mark.parametrize("name", list(SAME))
def test_shape_answers_as_one_database(world: World, name: str) -> None:
    """Each shape on the planner's positive list gives one database's answer under every strategy."""
    got, want = _outcome(world, SAME[name])
    assert not isinstance(got, Exception), f"{world.name}: {got}"
    assert got == want


@pytest.mark.parametrize("name", list(REFUSED))
def test_shape_is_refused_before_anything_runs(world: World, name: str) -> None:
    """Each shape that merged wrongly before is refused with the reason, and nothing changed."""
    got, want = _outcome(world, REFUSED[name])
    assert isinstance(got, ss.CrossShardQueryError), (
        f"{world.name}: answered {got!r}, one db {want!r}"
    )
    assert "nothing was run" in str(got)


def test_distinct_ordered_by_an_unselected_column_is_refused_as_postgresql_refuses_it(
    world: World,
) -> None:
    """SELECT DISTINCT ordered by a column it does not select raises on one database, and is
    refused across shards instead of answered with the column added to each shard's DISTINCT."""
    stmt = select(Order.note).distinct().order_by(Order.ratio).limit(5)
    with world.one() as one, pytest.raises(sa_exc.ProgrammingError, match="DISTINCT"):
        one.execute(stmt)
    with world.sharded() as sharded, pytest.raises(ss.CrossShardQueryError, match="nothing was"):
        sharded.execute(stmt)


def test_global_write_picking_rows_by_limit_is_refused(world: World) -> None:
    """A bulk DELETE of a global table whose subquery picks rows with LIMIT is refused before
    anything runs: each shard's copy, stored in its own physical order, would pick others."""
    with world.shard_engines["s0"].begin() as conn:  # same rows, another physical order
        conn.execute(text(f"UPDATE {SCHEMA}.countries SET name = name WHERE code < 'F'"))
    stmt = delete(Country).where(Country.code.in_(select(Country.code).limit(2)))
    with world.sharded() as sharded:
        before = _state(sharded)
        with pytest.raises(ss.CrossShardQueryError, match="LIMIT"):
            sharded.execute(stmt)
        assert _state(sharded) == before
        copies = {
            shard_id: sorted(
                sharded.scalars(select(Country.code).execution_options(shard_id=shard_id))
            )
            for shard_id in world.shard_engines
        }
        sharded.rollback()
    assert len({tuple(codes) for codes in copies.values()}) == 1, copies


def test_fanout_with_a_global_subquery_picking_rows_by_limit_is_refused(world: World) -> None:
    """A read of every shard filtered by a subquery over a global table with LIMIT (not ordered
    by its primary key) is refused: each shard's copy, in its own physical order, would pick
    other rows; ordered by the primary key it answers as one database."""
    with world.shard_engines["s0"].begin() as conn:  # same rows, another physical order
        conn.execute(text(f"UPDATE {SCHEMA}.countries SET name = name WHERE code < 'F'"))
    picked = select(Country.code).where(Country.code > "D")
    unordered = select(Customer.id).where(Customer.country_code.in_(picked.limit(2)))
    with world.sharded() as sharded, pytest.raises(ss.CrossShardQueryError, match="LIMIT"):
        sharded.execute(unordered)
    got, want = _outcome(
        world,
        rows(
            select(Customer.id).where(
                Customer.country_code.in_(picked.order_by(Country.code.desc()).limit(2))
            )
        ),
    )
    assert got == want


def test_global_insert_leaving_a_column_to_a_computed_default_is_refused(world: World) -> None:
    """A bulk INSERT of a global table that leaves a column to a default computed per run (a
    Python callable here) is refused before anything runs: each shard's copy would get its
    own value; given the value (in VALUES or by every executemany row), every copy holds the
    same rows."""
    table: Any = Stamp.__table__
    with world.sharded() as sharded:
        with pytest.raises(ss.CrossShardQueryError, match="token"):
            sharded.execute(insert(Stamp).values(code="a"))
        with pytest.raises(ss.CrossShardQueryError, match="token"):
            sharded.execute(insert(table), [{"code": "a", "token": "t"}, {"code": "z"}])
        sharded.execute(insert(Stamp).values(code="b", token="t"))
        sharded.execute(insert(table), [{"code": "c", "token": "u"}, {"code": "d", "token": "v"}])
        copies = {
            shard_id: sharded.execute(
                select(Stamp.code, Stamp.token).execution_options(shard_id=shard_id)
            ).all()
            for shard_id in world.shard_engines
        }
        sharded.rollback()
    want = [("b", "t"), ("c", "u"), ("d", "v")]
    assert all(sorted(rows) == want for rows in copies.values()), copies


def test_orm_bulk_insert_of_a_global_table_writes_every_copy(world: World) -> None:
    """session.execute(insert(Stamp), rows) writes the same rows into every shard's copy and
    returns one copy's RETURNING rows; leaving the per-run default to the database is
    refused before anything runs, in the ORM form as in the Core form."""
    with world.sharded() as sharded:
        with pytest.raises(ss.CrossShardQueryError, match="token"):
            sharded.execute(insert(Stamp), [{"code": "a", "token": "t"}, {"code": "z"}])
        returned = sharded.execute(
            insert(Stamp).returning(Stamp.code, Stamp.token, sort_by_parameter_order=True),
            BULK_STAMPS,
        ).all()
        copies = {
            shard_id: sharded.execute(
                select(Stamp.code, Stamp.token, func.inet_server_port()).execution_options(
                    shard_id=shard_id
                )
            ).all()
            for shard_id in world.shard_engines
        }
        sharded.rollback()
    want = [(row["code"], row["token"]) for row in BULK_STAMPS]
    assert [tuple(row) for row in returned] == want
    for shard_id, rows in copies.items():
        assert sorted((code, token) for code, token, _ in rows) == sorted(want), shard_id
        assert {port for _, _, port in rows} == {world.shard_engines[shard_id].url.port}


def test_orm_bulk_insert_places_each_row_on_its_own_shard(world: World) -> None:
    """Each row of an ORM bulk INSERT with rows of several shards is on the server of its own
    shard key's shard, and on no other (asked of the servers), inside the session's
    transaction: after its rollback no server has them."""
    with world.sharded() as sharded:
        sharded.execute(insert(Order), BULK_ORDERS)
        found = [
            (order_id, port)
            for shard_id in world.shard_engines
            for order_id, port in sharded.execute(
                select(Order.id, func.inet_server_port())
                .where(Order.id >= 900)
                .execution_options(shard_id=shard_id)
            )
        ]
        sharded.rollback()
    want = [
        (row["id"], world.shard_engines[world.shards.shard_for(row["customer_id"])].url.port)
        for row in BULK_ORDERS
    ]
    assert sorted(found) == sorted(want)
    for engine in world.shard_engines.values():
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).where(Order.id >= 900)) == 0


def test_orm_bulk_rows_without_a_shard_key_or_changing_it_are_refused(world: World) -> None:
    """An ORM bulk INSERT with a row that has no shard key, and an ORM bulk UPDATE by
    primary key that sets the shard key, raise ShardKeyError with nothing written."""
    with world.sharded() as sharded:
        before = _state(sharded)
        with pytest.raises(ss.ShardKeyError, match="customer_id"):
            sharded.execute(insert(Order), [*BULK_ORDERS[:3], {"id": 990, "note": "n"}])
        with pytest.raises(ss.ShardKeyError, match="customer_id"):
            sharded.execute(update(Order), [{"id": 1, "customer_id": 3}])
        assert _state(sharded) == before
        sharded.rollback()


def test_orm_bulk_insert_of_several_shards_is_refused_without_cross_shard_writes(
    world: World, shard_urls: dict[str, str]
) -> None:
    """With cross_shard_writes="refuse", an ORM bulk INSERT whose rows belong to several shards
    raises CrossShardWriteError before any shard runs it; rows of one shard are inserted."""
    shards = ShardSet(shard_urls, strategy=STRATEGIES[world.name]())
    try:
        with sharded_sessionmaker(shards)() as session:
            before = _state(session)
            with pytest.raises(ss.CrossShardWriteError, match="nothing was run"):
                session.execute(insert(Order), BULK_ORDERS)
            assert _state(session) == before
            owner = shards.shard_for(BULK_ORDERS[0]["customer_id"])
            mine = [r for r in BULK_ORDERS if shards.shard_for(r["customer_id"]) == owner]
            session.execute(insert(Order), mine)
            assert sorted(session.scalars(select(Order.id).where(Order.id >= 900))) == sorted(
                r["id"] for r in mine
            )
            session.rollback()
    finally:
        shards.dispose()


def test_one_shard_table_read_with_a_subquery_pruned_to_its_shard(world: World) -> None:
    """A table placed on s2, filtered by a subquery whose WHERE fixes a key owned by s2, runs
    there and answers as one database; a key owned elsewhere is refused."""
    here = next(k for k in KEYS if world.shards.shard_for(k) == "s2")
    elsewhere = next(k for k in KEYS if world.shards.shard_for(k) != "s2")
    for key, answered in ((here, True), (elsewhere, False)):
        sub = select(Order.customer_id).where(Order.customer_id == key)
        got, want = _outcome(world, rows(select(Memo.id).where(Memo.customer_id.in_(sub))))
        assert got == want if answered else isinstance(got, ss.CrossShardQueryError)


def test_a_key_no_shard_owns_is_read_as_absent_and_refused_for_writes(world: World) -> None:
    """With a key no shard owns, get() (also with shard_key=) finds nothing; an insert or a bulk
    write with it raises ShardKeyError and nothing is written."""
    if world.name in ("hash", "jumphash"):
        return  # every key has an owner under a hash
    with world.sharded() as session:
        assert session.get(Order, 1, shard_key=NO_SHARD_KEY) is None
        assert session.get(Customer, NO_SHARD_KEY) is None
        before = _state(session)
        with pytest.raises(ss.ShardKeyError, match=f"customer_id = {NO_SHARD_KEY}"):
            session.execute(update(Order).where(Order.customer_id == NO_SHARD_KEY).values(note="w"))
        session.add(Order(id=999, customer_id=NO_SHARD_KEY))
        with pytest.raises(ss.ShardKeyError, match=f"customer_id = {NO_SHARD_KEY}"):
            session.flush()
        session.rollback()
        assert _state(session) == before


# -- random statements -----------------------------------------------------------------------

_columns = st.sampled_from([Order.amount, Order.ratio, Order.note, Order.customer_id])
_numbers = st.sampled_from([Decimal("0"), Decimal("10.5"), Decimal("99"), Decimal("NaN")])
_keys = st.sampled_from([0, 5, 13, 22, 38, NO_SHARD_KEY])


@st.composite
def _filters(draw: st.DrawFn) -> list[Any]:
    terms: list[Any] = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(
            st.sampled_from(["cmp", "ratio", "note", "key", "keys", "exists", "avg", "global"])
        )
        if kind == "cmp":
            terms.append(Order.amount > draw(_numbers))
        elif kind == "ratio":
            terms.append(
                Order.ratio <= draw(st.sampled_from([0.0, 2.0, float("inf"), float("nan")]))
            )
        elif kind == "note":
            terms.append(Order.note.ilike(draw(st.sampled_from(["%a%", "z%", "x"]))))
        elif kind == "key":
            key = Order.customer_id == draw(_keys)
            terms.append(key | Order.customer_id.is_(None) if draw(st.booleans()) else key)
        elif kind == "keys":
            terms.append(Order.customer_id.in_(draw(st.lists(st.none() | _keys, max_size=3))))
        elif kind == "exists":
            correlated = draw(st.booleans())
            sub = select(Customer.id).where(Customer.name > draw(st.sampled_from(["a", "Z", "é"])))
            if correlated:
                sub = sub.where(Customer.id == Order.customer_id)
            terms.append(exists(sub))
        elif kind == "avg":
            sub = select(func.avg(o2.ratio))
            if draw(st.booleans()):
                sub = sub.where(o2.customer_id == Order.customer_id)
            terms.append(Order.ratio >= sub.scalar_subquery())
        else:
            terms.append(
                Order.customer_id.in_(
                    select(Customer.id).where(
                        Customer.country_code.in_(select(Country.code).where(Country.code > "E"))
                    )
                    if draw(st.booleans())
                    else select(Customer.id).where(Customer.id == Order.customer_id)
                )
            )
    return terms


@st.composite
def _bulk_statements(draw: st.DrawFn) -> Query:
    """An ORM bulk INSERT, upsert (existing orders with their own keys, and new ones) or
    UPDATE by primary key, with rows of random shards (or of a key no shard owns)."""
    keys = draw(st.lists(_keys, min_size=1, max_size=6))
    new = [{"id": 2000 + i, "customer_id": k, "note": f"h{i}"} for i, k in enumerate(keys)]
    kind = draw(st.sampled_from(["insert", "upsert", "update"]))
    if kind == "update":
        ids = draw(st.lists(st.sampled_from(list(KEYS)), min_size=1, max_size=5, unique=True))
        return bulk(update(Customer), [{"id": k, "name": f"u{k}"} for k in ids], _customers)
    if kind == "insert":
        stmt: Any = insert(Order)
        params = new
    else:
        old = draw(st.lists(st.sampled_from(ROWS[Order][:40]), max_size=4, unique_by=id))
        params = [{"id": o["id"], "customer_id": o["customer_id"], "note": "up"} for o in old]
        params = draw(st.permutations([*params, *new]))
        stmt = upsert_orders
    if draw(st.booleans()):
        stmt = stmt.returning(Order.id, Order.note, sort_by_parameter_order=True)
    return bulk(stmt, params)


@st.composite
def _queries(draw: st.DrawFn) -> Query:
    where = draw(_filters())
    shape = draw(
        st.sampled_from(
            [
                "rows",
                "ordered",
                "aggregate",
                "group",
                "exists",
                "count",
                "global join",
                "global read",
                "distinct",
                "left join",
                "text",
                "update",
                "delete",
                "bulk",
            ]
        )
    )
    if shape == "rows":
        return rows(select(Order.id, Order.ratio).where(*where))
    if shape == "text":
        table = draw(st.sampled_from(["customers", "labels"]))
        if table == "customers":
            text_column: Any = Customer.name
            key: Any = Customer.id
        else:
            text_column, key = Label.body, Label.id
        expr = draw(
            st.sampled_from(
                [
                    text_column,
                    func.lower(text_column),
                    func.upper(text_column),
                    func.trim(text_column),
                ]
            )
        ).label("t")
        how = draw(st.sampled_from(["order", "min", "group"]))
        if how == "order":
            stmt = select(key, expr).order_by(expr.desc() if draw(st.booleans()) else expr, key)
            return ordered(stmt.limit(draw(st.none() | st.integers(0, 10))))
        if how == "min":
            return rows(select(func.min(expr), func.max(expr), func.count()))
        return rows(select(expr, func.count()).group_by(expr))
    if shape == "left join":
        stmt = select(Customer.id, Order.id).outerjoin(Order, Order.customer_id == Customer.id)
        return rows(stmt.where(*where))
    if shape == "distinct":
        column = draw(_columns)
        stmt = select(column, Order.customer_id % 2).where(*where).distinct()
        if draw(st.booleans()):
            stmt = stmt.order_by(column, Order.customer_id % 2).limit(draw(st.integers(0, 9)))
            return ordered(stmt)
        return rows(stmt)
    if shape == "global join":
        outer = draw(st.booleans())
        stmt = select(Order.id, Customer.name, Country.name).join(
            Customer, Customer.id == Order.customer_id
        )
        stmt = stmt.join(Country, Country.code == Customer.country_code, isouter=outer)
        return rows(stmt.where(*where))
    if shape == "global read":
        sub = select(Customer.country_code).join(Order, Order.customer_id == Customer.id)
        sub = sub.where(*where)
        if draw(st.booleans()):
            return rows(select(Country.code).where(Country.code.in_(sub)))
        return rows(
            select(Country.code).where(
                Country.code.not_in(sub.where(Customer.country_code.is_not(None)))
            )
        )
    if shape == "ordered":
        column = draw(_columns)
        term = column.desc() if draw(st.booleans()) else column.asc()
        if draw(st.booleans()):
            term = term.nulls_first() if draw(st.booleans()) else term.nulls_last()
        stmt = select(Order.id, column).where(*where).order_by(term, Order.id)
        return ordered(
            stmt.limit(draw(st.none() | st.integers(0, 12))).offset(
                draw(st.none() | st.integers(0, 5))
            )
        )
    if shape == "aggregate":
        column = draw(_columns)
        name = draw(st.sampled_from(["count", "sum", "min", "max", "avg"]))
        if name in ("sum", "avg") and column is Order.note:
            column = Order.ratio
        return rows(select(getattr(func, name)(column)).where(*where))
    if shape == "group":
        key = draw(
            st.sampled_from(
                [Order.customer_id % 3, Order.ratio, func.lower(Order.note), Order.amount]
            )
        )
        return rows(
            select(key.label("g"), func.count(), func.max(Order.ratio)).where(*where).group_by("g")
        )
    if shape == "exists":
        return rows(select(exists().where(*where)) if where else select(exists(select(Order.id))))
    if shape == "count":
        inner = select(Order.id).where(*where)
        if draw(st.booleans()):
            inner = inner.order_by(Order.id).limit(draw(st.integers(0, 30)))
        return rows(select(func.count()).select_from(inner.subquery()))
    if shape == "bulk":
        return draw(_bulk_statements())
    if shape == "update":
        return write(update(Order).where(*where).values(note=literal("u")))
    return write(delete(Order).where(*where))


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(query=_queries())
def test_random_statements_answer_as_one_database_or_are_refused(
    world: World, query: Query
) -> None:
    """A generated statement is answered exactly as one database answers it, or refused before
    anything runs (for writes: every shard's data unchanged; a write with a key no shard owns
    raises ShardKeyError)."""
    try:
        got, want = _outcome(world, query)
    except (sa_exc.DBAPIError, sa_exc.InvalidRequestError) as exc:
        if isinstance(exc, ss.ScaleError):
            raise
        reject()  # not valid SQL for one database either (a generated EXISTS without FROM)
    if isinstance(got, ss.CrossShardQueryError | ss.ShardKeyError):
        return
    assert got == want
