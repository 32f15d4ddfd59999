"""Fan-out merging and planning: pure logic, no server (the servers are in test_sharding.py)."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Integer, String, func, literal_column, select, union_all
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_scale._sa import select_distinct_on
from sqlalchemy_scale.errors import CrossShardQueryError
from sqlalchemy_scale.sharding import SortKey, merge_aggregates, merge_ordered, plan_fanout
from sqlalchemy_scale.sharding.merge import apply_limit, sort_rows

PG = postgresql.dialect()  # type: ignore[no-untyped-call]
# The default driver is psycopg2 on SQLAlchemy 2.0 and psycopg on 2.1; SQL text compared
# below is compiled for one of them, so both versions render the same casts.
PSYCOPG = postgresql.psycopg.dialect()


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "merge_items"
    __shard_key__ = "owner"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[int]
    v: Mapped[int | None] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String)


def _reference_key(descending: bool, nulls_first: bool | None) -> Any:
    first = descending if nulls_first is None else nulls_first

    def key(row: tuple[Any, ...]) -> tuple[int, Any]:
        value = row[0]
        if value is None:
            return (0 if first else 2, 0)
        return (1, -value if descending else value)

    return key


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("nulls_first", [None, True, False])
def test_merge_ordered_equals_sorting_everything(
    descending: bool, nulls_first: bool | None
) -> None:
    """A k-way merge of sorted shard streams equals sorting all rows, NULLs placed as PostgreSQL does."""
    rng = random.Random(7)
    rows = [(rng.choice([None, *range(10)]), i) for i in range(200)]
    ref = _reference_key(descending, nulls_first)
    # Break ties by the second column so the expected order is total.
    keys = [SortKey(lambda r: r[0], descending, nulls_first), SortKey(lambda r: r[1])]
    streams = [
        sorted([r for r in rows if r[1] % 4 == s], key=lambda r: (ref(r), r[1])) for s in range(4)
    ]
    expected = sorted(rows, key=lambda r: (ref(r), r[1]))
    merged = merge_ordered(streams, keys)
    assert [row for _, row in merged] == expected
    assert [row for _, row in merge_ordered(streams, keys, limit=7, offset=5)] == expected[5:12]


def test_merge_ordered_reports_the_stream_of_each_row() -> None:
    """Each merged row carries the index of the shard stream it came from."""
    merged = merge_ordered([[1, 4], [2, 3]], [SortKey(lambda r: r)])
    assert merged == [(0, 1), (1, 2), (1, 3), (0, 4)]


def test_merge_without_order_concatenates_in_shard_order() -> None:
    """Without ORDER BY the streams are concatenated and LIMIT/OFFSET apply once."""
    assert [r for _, r in merge_ordered([[1, 2], [3], [4, 5]], [], limit=3, offset=1)] == [2, 3, 4]


def test_nulls_default_to_last_ascending_and_first_descending() -> None:
    """PostgreSQL's defaults: NULLS LAST for ASC, NULLS FIRST for DESC."""
    rows = [(2,), (None,), (1,)]
    assert sort_rows(rows, [SortKey(lambda r: r[0])]) == [(1,), (2,), (None,)]
    assert sort_rows(rows, [SortKey(lambda r: r[0], descending=True)]) == [(None,), (2,), (1,)]
    assert sort_rows(rows, [SortKey(lambda r: r[0], True, False)]) == [(2,), (1,), (None,)]


def test_apply_limit() -> None:
    """OFFSET skips, LIMIT bounds, None means unbounded."""
    assert apply_limit(range(10), 3, 2) == [2, 3, 4]
    assert apply_limit(range(3), None, None) == [0, 1, 2]
    assert apply_limit(range(3), 0, None) == []


def test_merge_aggregates_without_group_by() -> None:
    """count and sum add up, min/max take the extreme, avg divides the summed parts."""
    partials = [(3, 10, 1, 7, 10, 3), (0, None, None, None, None, 0), (2, 5, 2, 3, 5, 2)]
    rows = merge_aggregates(partials, 0, ["count", "sum", "min", "max", "avg"], grouped=False)
    assert rows == [(5, 15, 1, 7, Decimal(3))]


def test_merge_aggregates_with_no_rows_anywhere() -> None:
    """Without GROUP BY, no rows still give one row: count 0 and NULL elsewhere."""
    assert merge_aggregates([], 0, ["count", "sum", "avg"], grouped=False) == [(0, None, None)]
    assert merge_aggregates([], 1, ["count"], grouped=True) == []


def test_merge_aggregates_by_group() -> None:
    """Partial rows of the same group from different shards combine into one row."""
    partials = [("a", 2, 1.5, 2), ("b", 1, 4.0, 1), ("a", 1, 3.0, 1), (None, 1, None, 0)]
    rows = merge_aggregates(partials, 1, ["count", "avg"], grouped=True)
    assert {r[0]: r[1:] for r in rows} == {"a": (3, 1.5), "b": (1, 4.0), None: (1, None)}
    assert len(rows) == 3


def test_plan_pushes_limit_plus_offset_down() -> None:
    """Each shard runs LIMIT limit+offset without OFFSET; the merge applies both."""
    plan = plan_fanout(select(Item).order_by(Item.v.desc()).limit(3).offset(2))
    assert (plan.kind, plan.limit, plan.offset) == ("rows", 3, 2)
    shard_sql = str(
        plan.shard_statement().compile(dialect=PG, compile_kwargs={"literal_binds": True})
    )
    assert "LIMIT 5" in shard_sql
    assert "OFFSET" not in shard_sql
    assert plan.order[0].descending


def test_plan_rewrites_avg_into_sum_and_count() -> None:
    """avg() is pushed down as sum() and count(), GROUP BY kept, ORDER BY/LIMIT removed."""
    stmt = (
        select(Item.owner, func.avg(Item.v).label("mean"))
        .group_by(Item.owner)
        .order_by(literal_column("mean"))
        .limit(2)
    )
    plan = plan_fanout(select(Item.owner, func.avg(Item.v)).group_by(Item.owner).limit(2))
    assert plan.kind == "aggregate"
    shard_sql = str(plan.shard_statement().compile(dialect=PG))
    assert "sum(merge_items.v)" in shard_sql
    assert "count(merge_items.v)" in shard_sql
    assert "GROUP BY merge_items.owner" in shard_sql
    assert "LIMIT" not in shard_sql
    with pytest.raises(CrossShardQueryError, match="not one of the selected columns"):
        plan_fanout(stmt)


def test_plan_orders_aggregates_by_label_and_by_expression() -> None:
    """ORDER BY an aggregate's label or the aggregate itself resolves to its output column."""
    count = func.count().label("n")
    plan = plan_fanout(select(Item.owner, count).group_by(Item.owner).order_by(count.desc()))
    assert plan.order[0].output == 1 and plan.order[0].descending
    plan = plan_fanout(select(Item.owner, func.max(Item.v)).group_by(Item.owner).order_by("owner"))
    assert plan.order[0].output == 0


@pytest.mark.parametrize(
    ("stmt", "reason"),
    [
        (select(Item).distinct(), "DISTINCT of ORM entities"),
        (select_distinct_on(select(Item.v), Item.v), "DISTINCT ON"),
        (select(Item.v).prefix_with("SQL_NO_CACHE"), "prefix, suffix, hint or syntax"),
        (select(func.count(Item.v.distinct())), "DISTINCT"),
        (select(Item.id, func.row_number().over(order_by=Item.v)), "window functions"),
        (select(Item.owner, func.count()).group_by(Item.owner).having(func.count() > 1), "HAVING"),
        (select(Item).order_by(Item.v + 1), "not one of the selected columns"),
        (select(Item.owner, func.count()).group_by(Item.owner).order_by(Item.v), "not one of"),
        (select(func.count() + 1), "combines an aggregate"),
        (select(Item, func.count()).group_by(Item.id), "whole entities"),
        (
            select(Item.owner, func.count()).group_by(Item.id),
            "neither aggregated nor one of the GROUP BY",
        ),
        (union_all(select(Item.id), select(Item.id)), "UNION"),
        (select(Item.id).fetch(3), "FETCH FIRST"),
        (
            select(func.avg(func.make_interval(0, 0, 0, Item.v))),
            "only sums and averages of numbers",
        ),
    ],
)
def test_unmergeable_shapes_are_refused_with_the_reason(stmt: Any, reason: str) -> None:
    """Shapes whose merged result could be wrong raise CrossShardQueryError saying why."""
    with pytest.raises(CrossShardQueryError, match=reason):
        plan_fanout(stmt)


def test_order_by_text_with_a_non_c_collation_is_refused() -> None:
    """Merged text is compared by code point, so ORDER BY under a non-C collation is refused."""
    collated = Item.name.collate("en_US").label("n")
    with pytest.raises(CrossShardQueryError, match="collation 'en_US'"):
        plan_fanout(select(Item.id, collated).order_by(collated))
    c_collated = Item.name.collate("C").label("n")
    (check,) = plan_fanout(select(Item.id, c_collated).order_by(c_collated)).text_checks
    assert (check.explicit, check.columns, check.default) == ({"C"}, set(), False)
    # Without an explicit collation the column's DDL collation and the database's own are
    # checked on each shard at run time, also through functions such as lower().
    for expr in (Item.name, func.lower(Item.name), func.trim(func.lower(Item.name))):
        (check,) = plan_fanout(select(Item.id, expr.label("x")).order_by("x")).text_checks
        assert check.columns == {(None, "merge_items", "name")} and check.default


def test_columns_only_statement_orders_by_hidden_columns() -> None:
    """Without ORM entities, ORDER BY an unselected expression is pushed down as an extra column."""
    plan = plan_fanout(select(Item.id).order_by((Item.v + 1).desc(), Item.name).limit(2))
    assert not plan.has_entities and plan.visible == 1 and len(plan.hidden) == 2
    shard_sql = str(plan.shard_statement().compile(dialect=PSYCOPG))
    assert "merge_items.v + %(v_1)s::INTEGER AS _ss_o0" in shard_sql
    assert "merge_items.name AS _ss_o1" in shard_sql
    assert [t.hidden for t in plan.order] == [0, 1] and plan.order[0].descending


def test_nan_sorts_above_every_number_and_is_one_group() -> None:
    """Float and numeric NaN sort after +Infinity (before it descending), group together, are
    the max, and min() skips them unless all are NaN, as in PostgreSQL; Decimal NaN does not crash."""
    nan, inf = float("nan"), float("inf")
    shard_a = [(-inf,), (1.0,), (nan,)]
    shard_b = [(None,), (inf,), (float("nan"),)]
    asc = merge_ordered(
        [sorted(shard_a, key=lambda r: (r[0] != r[0], r[0])), shard_b[1:] + shard_b[:1]],
        [SortKey(lambda r: r[0])],
    )
    values = [row[0] for _, row in asc]
    assert values[:3] == [-inf, 1.0, inf] and all(v != v for v in values[3:5]) and values[5] is None
    desc = sort_rows(
        [(Decimal("NaN"),), (Decimal("Infinity"),), (Decimal(2),), (None,)],
        [SortKey(lambda r: r[0], descending=True)],
    )
    assert (
        desc[0] == (None,)
        and desc[1][0].is_nan()
        and desc[2:] == [(Decimal("Infinity"),), (Decimal(2),)]
    )
    partials = [(nan, 1, 1.0, 1.0), (float("nan"), 2, nan, nan), (2.0, 1, nan, nan)]
    merged = merge_aggregates(partials, 1, ["count", "min", "max"], grouped=True)
    by_group = {("nan" if g != g else g): (n, lo, hi) for g, n, lo, hi in merged}
    assert set(by_group) == {"nan", 2.0} and by_group["nan"][:2] == (3, 1.0)
    assert by_group["nan"][2] != by_group["nan"][2]  # max is NaN
    assert by_group[2.0][1] != by_group[2.0][1]  # min of only NaN is NaN
    (total,) = merge_aggregates(
        [(Decimal("Infinity"),), (Decimal("-Infinity"),)], 0, ["sum"], grouped=False
    )
    assert total[0].is_nan()
    (big,) = merge_aggregates(
        [(Decimal("1" * 40),), (Decimal("0." + "1" * 40),)], 0, ["sum"], grouped=False
    )
    assert big[0] == Decimal("1" * 40 + "." + "1" * 40)  # numeric sums are exact
