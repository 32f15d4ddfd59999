"""The shard planner's proofs: which shards a statement needs, or a refusal naming why.

Pure logic: no server runs anything here (nothing connects until a statement runs,
so the ShardSet's URLs are unreachable on purpose). That the answers are then
exactly one database's is proven against real servers in
``tests/test_sharding_differential.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    ForeignKey,
    String,
    delete,
    exists,
    func,
    insert,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, aliased, mapped_column

from sqlalchemy_scale.errors import CrossShardQueryError, ShardKeyError
from sqlalchemy_scale.sharding import RangeSharding, ShardSet
from sqlalchemy_scale.sharding._proof import prove
from sqlalchemy_scale.sharding._scopes import scopes_of
from sqlalchemy_scale.sharding.shapes import SHAPES


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "plan_customers"
    __shard_key__ = "id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String)
    country_code: Mapped[str | None] = mapped_column(ForeignKey("plan_countries.code"))


class Order(Base):
    __tablename__ = "plan_orders"
    __shard_key__ = "customer_id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int]
    amount: Mapped[float | None]


class Country(Base):
    __tablename__ = "plan_countries"
    __shard__ = "all"

    code: Mapped[str] = mapped_column(String(2), primary_key=True)


class Tag(Base):
    """Sharded by a text key: the same value as text and as a number is placed differently."""

    __tablename__ = "plan_tags"
    __shard_key__ = "customer_code"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_code: Mapped[str]


class Audit(Base):
    __tablename__ = "plan_audit"
    __shard__ = "s2"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


URLS = {f"s{i}": f"postgresql+psycopg2://u:p@127.0.0.1:1/db{i}" for i in range(4)}
ALL = list(URLS)
# Keys 0-9 on s0, 10-19 on s1, 20-29 on s2, 30-39 on s3; 40 and above on no shard.
SHARDS = ShardSet(URLS, strategy=RangeSharding([0, 10, 20, 30, 40]))
DOCS = Path(__file__).resolve().parents[1] / "docs" / "sharding.md"


def shards(statement: Any, params: dict[str, Any] | None = None) -> list[str]:
    return prove(statement, SHARDS, params).shards


avg_amount = select(func.avg(Order.amount)).scalar_subquery()
o2 = aliased(Order)


@pytest.mark.parametrize(
    ("statement", "reason"),
    [
        (
            select(Order.id).where(Order.amount > avg_amount),
            "subquery over plan_orders is not correlated",
        ),
        (
            delete(Order).where(Order.amount == select(func.max(Order.amount)).scalar_subquery()),
            "not correlated",
        ),
        (update(Order).where(Order.amount > avg_amount).values(amount=0), "not correlated"),
        (
            select(Order).where(Order.customer_id == 5, Order.amount > avg_amount),
            "not correlated",
        ),
        (
            select(Order.id).where(Order.id.in_(select(Order.id).order_by(Order.amount).limit(5))),
            "not correlated",
        ),
        (
            select(Order.id).where(
                Order.customer_id.in_(select(o2.customer_id).order_by(o2.amount).limit(5))
            ),
            "not correlated",
        ),
        (
            select(Order.id).where(
                Order.customer_id.in_(
                    select(Customer.id).group_by(Customer.name, Customer.id).limit(3)
                )
            ),
            "not correlated",
        ),
        (
            select(Order.id).where(
                Order.customer_id.in_(
                    select(Customer.id)
                    .group_by(Customer.name)
                    .having(func.count() > 1)
                    .with_only_columns(func.min(Customer.id))
                )
            ),
            "not correlated",
        ),
        (
            select(Customer.id).where(exists(select(Order.id).where(Order.amount > 5))),
            "not correlated",
        ),
        (
            select(Country.code).where(Country.code.in_(select(Customer.country_code))),
            "global tables only reads the sharded table",
        ),
        (
            select(Country.code).where(~Country.code.in_(select(Customer.country_code))),
            "global tables only reads",
        ),
        (
            select(Country.code).where(exists().where(Customer.country_code == Country.code)),
            "global tables only reads",
        ),
        (
            update(Country)
            .where(Country.code.in_(select(Customer.country_code)))
            .values(code="XX"),
            "global tables only reads",
        ),
        (
            select(Country.code, Customer.id).outerjoin(
                Customer, Customer.country_code == Country.code
            ),
            "keeps unmatched rows of a global table",
        ),
        (
            select(Order.id, Customer.id).join(Customer, Customer.name == literal_column("'x'")),
            "without equating their shard keys",
        ),
        (select(Order.id, Audit.id), "are read with a table or subquery on shard 's2'"),
        (
            select(Tag.id, Customer.id).join(Customer, Customer.id == Tag.customer_code),
            "without equating their shard keys",
        ),
        (
            select(func.count())
            .select_from(
                select(Order.customer_id, func.count().label("n"))
                .group_by(Order.customer_id)
                .subquery()
            )
            .where(literal_column("n") > 1),
            "FROM subquery",
        ),
        (
            select(exists().where(Order.amount > select(func.avg(o2.amount)).scalar_subquery())),
            "not correlated",
        ),
        (
            insert(Order).from_select(["id", "customer_id"], select(Order.id, Order.customer_id)),
            "INSERT ... SELECT",
        ),
    ],
)
def test_unproven_shapes_are_refused_naming_the_part(statement: Any, reason: str) -> None:
    """Every shape of issue 8's table that gave a wrong answer is refused, saying which part and
    what to do instead."""
    with pytest.raises(CrossShardQueryError, match=re.escape(reason)) as info:
        prove(statement, SHARDS, None)
    assert "nothing was run" in str(info.value) and "shard_key=" in str(info.value)


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        # correlated on the shard key: the subquery reads the outer row's shard
        (
            select(Customer.id).where(
                exists(select(Order.id).where(Order.customer_id == Customer.id, Order.amount > 5))
            ),
            ALL,
        ),
        (
            select(Order.id).where(
                Order.amount
                > select(func.avg(o2.amount))
                .where(o2.customer_id == Order.customer_id)
                .scalar_subquery()
            ),
            ALL,
        ),
        # a semi-join on the shard key: the matching rows live on the outer row's shard
        (
            select(Order.id).where(
                Order.customer_id.in_(select(Customer.id).where(Customer.name == "bob"))
            ),
            ALL,
        ),
        (
            select(Order.id).where(
                Order.customer_id.not_in(select(Customer.id).where(Customer.id == 5))
            ),
            ALL,
        ),
        (
            select(Customer.id).where(
                Customer.id.in_(
                    select(Order.customer_id).group_by(Order.customer_id).having(func.count() > 3)
                )
            ),
            ALL,
        ),
        # co-located join, global join, global subquery
        (select(Order.id, Customer.name).join(Customer, Customer.id == Order.customer_id), ALL),
        (
            select(Customer.id, Country.code).outerjoin(
                Country, Country.code == Customer.country_code
            ),
            ALL,
        ),
        (select(Customer.id).where(Customer.country_code.in_(select(Country.code))), ALL),
        # pruned, and a subquery pruned to the same shard
        (select(Order).where(Order.customer_id == 25), ["s2"]),
        (
            select(Order).where(
                Order.customer_id == 25,
                Order.amount
                > select(func.avg(o2.amount)).where(o2.customer_id == 21).scalar_subquery(),
            ),
            ["s2"],
        ),
        # a global read pruned by a subquery pinned to one shard runs on that shard
        (
            select(Country.code).where(
                Country.code.in_(select(Customer.country_code).where(Customer.id == 35))
            ),
            ["s3"],
        ),
        # global tables: read from the home shard, written everywhere
        (select(Country), ["s0"]),
        (update(Country).values(code="XX"), ALL),
        (
            select(Audit).where(Audit.id.in_(select(Order.id).where(Order.customer_id == 22))),
            ["s2"],
        ),
        # keys no shard owns match no row: any one shard answers (no rows)
        (select(Order).where(Order.customer_id == 400), ["s0"]),
        (select(Order).where(Order.customer_id.in_([15, None, 400])), ["s1"]),
        # IS NULL is not pruned: an outer join makes NULL keys of rows stored elsewhere
        (select(Order).where(Order.customer_id.is_(None)), ALL),
        (
            select(Customer.id, Order.id)
            .outerjoin(Order, Order.customer_id == Customer.id)
            .where((Order.customer_id == 5) | Order.customer_id.is_(None)),
            ALL,
        ),
    ],
)
def test_proven_shapes_run_on_the_shards_they_need(statement: Any, expected: list[str]) -> None:
    """Shapes on the positive list are placed on exactly the shards whose rows they read."""
    assert shards(statement) == expected


def test_exists_and_count_are_answered_not_refused() -> None:
    """select(exists()) over shards is answered as an OR; Query.count() of a statement that must
    be merged counts its merged rows; a global write reports one copy."""
    proof = prove(select(exists().where(Order.amount > 5)), SHARDS, None)
    assert proof.exists and proof.shards == ALL
    inner = select(Order.customer_id).group_by(Order.customer_id).subquery()
    proof = prove(select(func.count()).select_from(inner), SHARDS, None)
    assert proof.count_of is not None and proof.shards == ALL
    limited = select(Order.id).order_by(Order.id).limit(5).subquery()
    assert prove(select(func.count()).select_from(limited), SHARDS, None).count_of is not None
    plain = select(Order.id).where(Order.amount > 1).subquery()
    proof = prove(select(func.count()).select_from(plain), SHARDS, None)
    assert proof.count_of is None and proof.shards == ALL  # counts pushed down and summed
    assert prove(delete(Country), SHARDS, None).global_write


def test_writes_with_a_key_no_shard_owns_raise() -> None:
    """An UPDATE/DELETE pruned by a key no shard owns raises ShardKeyError, as inserts do."""
    with pytest.raises(ShardKeyError, match=r"plan_orders\.customer_id = 400"):
        prove(delete(Order).where(Order.customer_id == 400), SHARDS, None)
    with pytest.raises(ShardKeyError, match="'x' cannot be placed as a INTEGER key"):
        prove(select(Order).where(Order.customer_id == "x"), SHARDS, None)


def test_text_statements_are_not_placed() -> None:
    """text() names no table: the planner cannot prove where it runs."""
    with pytest.raises(CrossShardQueryError, match="a TextClause names no table"):
        prove(text("SELECT 1"), SHARDS, None)


def test_correlation_is_what_sqlalchemy_compiles() -> None:
    """The scopes read SQLAlchemy's own correlation: a subquery on the outer table alone is not
    correlated, one naming a second table is (contract test for _scopes' compiler hook)."""
    top = scopes_of(select(Order.id).where(Order.amount > avg_amount))
    (child,) = top.children
    assert [f.name for f in child.froms] == ["plan_orders"]  # type: ignore[attr-defined]
    correlated = select(Order.id).where(Order.customer_id == Customer.id).exists()
    top = scopes_of(select(Customer.id).where(correlated))
    (child,) = top.children
    assert [f.name for f in child.froms] == ["plan_orders"]  # type: ignore[attr-defined]
    assert [f.name for f in top.froms] == ["plan_customers"]  # type: ignore[attr-defined]


def test_docs_list_every_shape_of_the_planner() -> None:
    """docs/sharding.md carries the planner's table of shapes row for row, so they cannot drift."""
    docs = DOCS.read_text()
    missing = [shape.doc_row() for shape in SHAPES.values() if shape.doc_row() not in docs]
    assert missing == []


def test_values_python_may_sort_differently_are_refused() -> None:
    """ORDER BY or max() of arrays, JSON or untyped expressions is refused before anything runs;
    typed expressions and known functions merge."""
    from sqlalchemy import CHAR, Float, type_coerce
    from sqlalchemy.dialects.postgresql import ARRAY, JSONB

    from sqlalchemy_scale.sharding import plan_fanout

    tags = literal_column("ARRAY[1, 2]", ARRAY(Order.id.type)).label("t")
    doc = literal_column("'{}'::jsonb", JSONB).label("d")
    for statement in (
        select(Order.id, tags).order_by(tags),
        select(func.max(doc)),
        select(Order.id, func.mystery(Order.amount).label("m")).order_by("m"),
        select(func.min(literal_column("'a'", CHAR(3)))),
    ):
        with pytest.raises(CrossShardQueryError, match="may not sort in Python"):
            plan_fanout(statement)
    typed = type_coerce(func.mystery(Order.amount), Float).label("m")
    assert plan_fanout(select(Order.id, typed).order_by("m")).functions == {"mystery"}
    rounded = func.round(Order.amount).label("r")
    assert plan_fanout(select(Order.id, rounded).order_by("r")).text_checks == []


def test_sqlalchemy_internals_the_planner_reads_still_exist() -> None:
    """Contract test for _scopes' named doors into SQLAlchemy internals (fails by name when an
    upgrade renames one): a Select's clauses, LIMIT/OFFSET, deannotation, type affinity."""
    from sqlalchemy_scale.sharding._scopes import (
        deannotated,
        int_limit_offset,
        is_orm,
        same_type_affinity,
        select_parts,
    )

    stmt = (
        select(Order.customer_id, func.count())
        .group_by(Order.customer_id)
        .having(func.count() > 1)
        .order_by(Order.customer_id)
        .distinct()
        .limit(3)
        .offset(2)
        .with_for_update()
    )
    parts = select_parts(stmt)
    assert parts.distinct and parts.for_update and not parts.only_filters
    assert (len(parts.columns), len(parts.group_by), len(parts.having), len(parts.order_by)) == (
        2,
        1,
        1,
        1,
    )
    assert int_limit_offset(stmt) == (3, 2)
    assert select_parts(select(Order).where(Order.id > 1)).only_filters
    annotated = Order.customer_id.__clause_element__().table  # type: ignore[attr-defined]
    assert deannotated(annotated) is Order.__table__
    assert same_type_affinity(Order.id, Order.customer_id)
    assert not same_type_affinity(Order.id, Tag.customer_code)
    assert is_orm(select(Order.id)) and not is_orm(select(Order.__table__.c.id))


def test_insert_subqueries_must_read_the_rows_shard() -> None:
    """An INSERT placed by its row's key may read, in a subquery, only that shard's rows."""
    on_key = select(func.max(o2.amount)).where(o2.customer_id == 5).scalar_subquery()
    stmt = insert(Order).values(id=1, customer_id=5, amount=on_key)
    assert prove(stmt, SHARDS, None, rows_on=["s0"]).shards == ["s0"]
    everywhere = select(func.max(o2.amount)).scalar_subquery()
    with pytest.raises(CrossShardQueryError, match="in an INSERT into plan_orders on shard 's0'"):
        prove(
            insert(Order).values(id=1, customer_id=5, amount=everywhere),
            SHARDS,
            None,
            rows_on=["s0"],
        )


class Party(Base):
    __tablename__ = "plan_parties"
    __shard_key__ = "customer_id"
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "party"}  # noqa: RUF012

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int]
    kind: Mapped[str]


class Person(Party):
    """Joined-table inheritance: its table has no shard key column of its own."""

    __tablename__ = "plan_people"
    __mapper_args__ = {"polymorphic_identity": "person"}  # noqa: RUF012

    id: Mapped[int] = mapped_column(ForeignKey("plan_parties.id"), primary_key=True)
    nickname: Mapped[str]


def test_joined_inheritance_rows_are_colocated() -> None:
    """A subclass table joined to its base on the primary key is one row on one shard, so it
    fans out, and is pruned by the base's key."""
    assert shards(select(Person).where(Person.nickname == "x")) == ALL
    assert shards(select(Person).where(Person.customer_id == 12)) == ["s1"]
    other = aliased(Person)
    with pytest.raises(CrossShardQueryError, match="without equating their shard keys"):
        shards(select(Person.id, other.id).join(other, other.nickname == Person.nickname))
    with pytest.raises(CrossShardQueryError, match="without equating their shard keys"):
        shards(select(Order.id, Person.nickname).join(Person, Person.id == Order.id))
