"""The planner's list of statement shapes: what runs across shards, and what is refused.

The planner decides by proof: a statement runs on several shards only when
every part of it is one of the ``merged`` or ``answered`` shapes below; any
other part raises :class:`~sqlalchemy_scale.CrossShardQueryError` naming the
``refused`` shape it matched (or "not on the list of shapes known to merge")
before any shard runs anything. ``docs/sharding.md`` carries this table;
``tests/test_sharding_planner.py`` checks that every entry is there, word for
word, so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, NoReturn

from ..errors import CrossShardQueryError

__all__ = ["SHAPES", "Shape", "refuse"]

Verdict = Literal["merged", "answered", "one shard", "refused"]

REMEDY: Final = (
    "pin it to one shard with execution_options(shard_key=...) or "
    "execution_options(shard_id=...), or run it once per shard"
)


@dataclass(frozen=True)
class Shape:
    """One row of the planner's table: a statement part, the verdict and how (or why)."""

    name: str
    verdict: Verdict
    part: str
    how: str

    def doc_row(self) -> str:
        """The row as docs/sharding.md writes it."""
        return f"| {self.part} | {self.verdict} | {self.how} |"


_TABLE: Final = [
    # -- merged: each shard runs the statement, the results are combined exactly
    Shape("rows", "merged", "rows of a sharded table, no ORDER BY", "concatenated"),
    Shape(
        "order_by",
        "merged",
        "`ORDER BY` selected columns, labels or selected expressions, `ASC`/`DESC`, `NULLS FIRST/LAST`",
        "each shard sorts; k-way merge in PostgreSQL's order (NULLs last for ASC, first for DESC; float/numeric NaN above every number)",
    ),
    Shape(
        "order_by_hidden",
        "merged",
        "`ORDER BY` an expression that is not selected, in a statement without ORM entities",
        "added to each shard's columns, merged on, dropped from the result",
    ),
    Shape(
        "limit_offset",
        "merged",
        "`LIMIT n OFFSET m` (plain integers)",
        "each shard runs `LIMIT n + m` without OFFSET; OFFSET and LIMIT apply once after the merge",
    ),
    Shape(
        "distinct_rows",
        "merged",
        "`SELECT DISTINCT` of columns (not ORM entities), with ORDER BY/LIMIT",
        "each shard's distinct rows, merged; rows equal across shards kept once (NaN equals NaN), then OFFSET and LIMIT",
    ),
    Shape(
        "aggregates",
        "merged",
        "`count(*)`, `count(x)`, `sum`, `min`, `max`, `avg`, with or without `GROUP BY`",
        "partial aggregates per shard (`avg` as `sum` and `count`), combined per group; then ORDER BY, LIMIT, OFFSET",
    ),
    Shape(
        "group_by_expression",
        "merged",
        "`GROUP BY` a selected expression (`func.date_trunc('month', col)`, `func.lower(name)`, `extract(...)`, a label), written once or twice",
        "grouped on each shard, groups combined by value (NaN is one group)",
    ),
    Shape(
        "orm_entities",
        "merged",
        "ORM entities (`select(Order)`), `selectinload()`",
        "loaded per shard with that shard's identity token, in the merged order",
    ),
    Shape(
        "colocated_join",
        "merged",
        "a join of sharded tables whose ON or WHERE equates their shard keys (any join type)",
        "joined rows live on one shard: each shard joins its own rows",
    ),
    Shape(
        "global_join",
        "merged",
        'a sharded table joined with a global (`__shard__ = "all"`) table: inner join, or an outer join that keeps the sharded side',
        "every shard holds the whole global table",
    ),
    Shape(
        "correlated_subquery",
        "merged",
        "a subquery, `EXISTS` or `IN (SELECT ...)` over sharded tables correlated with the outer row on the shard key",
        "the rows it reads live on the outer row's shard",
    ),
    Shape(
        "key_semi_join",
        "merged",
        "`outer.key IN (SELECT inner.key ...)` and `NOT IN` on shard keys (the subquery may filter, be DISTINCT, or group by its key, not LIMIT)",
        "the inner rows that can match live on the outer row's shard",
    ),
    Shape(
        "global_subquery",
        "merged",
        "a subquery that reads only global tables (or none)",
        "every shard has the same answer",
    ),
    Shape(
        "plain_derived_table",
        "merged",
        "a FROM subquery that only filters and projects sharded rows",
        "its rows are partitioned like the table's",
    ),
    Shape(
        "bulk_rows",
        "merged",
        "ORM bulk `INSERT` of a sharded table (`session.execute(insert(Model), [rows])`, also `postgresql.insert(Model).on_conflict_do_update(...)`), and bulk `UPDATE` by a primary key that includes the shard key, with rows of several shards",
        "each row runs on its own shard key's shard; `RETURNING` rows come back in the order of the parameter sets (SQLAlchemy's `sort_by_parameter_order=True`)",
    ),
    # -- answered: a cheap exact answer instead of a merge of rows
    Shape(
        "exists",
        "answered",
        "`select(exists().where(...))`, `session.query(q.exists()).scalar()`",
        "each shard answers; the result is the OR of the answers, one row",
    ),
    Shape(
        "count_of_rows",
        "answered",
        "`Query.count()` (`SELECT count(*) FROM (...)`) of a statement that merges",
        "the count of the merged rows (inner `GROUP BY`/`LIMIT`/`OFFSET` are merged first)",
    ),
    Shape(
        "global_write",
        "answered",
        "bulk `INSERT`/`UPDATE`/`DELETE` of a global table, not reading sharded tables",
        "run on every shard (two-phase commit); the result and rowcount are one copy's",
    ),
    # -- one shard: runs on the one shard that holds everything it reads
    Shape(
        "pruned",
        "one shard",
        "a statement whose WHERE fixes the shard key (`==`, `IN`, through `AND`/`OR`) to one shard",
        "runs there; a key no shard owns (range gap, directory miss, NULL) matches no row",
    ),
    Shape(
        "pinned_subquery",
        "one shard",
        "a subquery over sharded tables whose own WHERE fixes its shard key to the shard the statement runs on",
        "runs with the statement on that shard",
    ),
    # -- refused: raises CrossShardQueryError before any shard runs it
    Shape(
        "uncorrelated_subquery",
        "refused",
        "a subquery, `EXISTS` or `IN (SELECT ...)` over sharded tables that is not correlated on the shard key (a global average, a top-5 list)",
        "each shard would answer it from its own rows only",
    ),
    Shape(
        "global_reads_sharded",
        "refused",
        "a read or write of a global table that depends on sharded rows (`IN`/`EXISTS`/`NOT IN` subquery, a derived table, `UPDATE ... FROM`/`DELETE ... USING` a sharded table)",
        "the home shard holds only its own part of the sharded rows",
    ),
    Shape(
        "global_write_per_run",
        "refused",
        "a write of a global table that calls a function whose value may differ per run (`now()`, `random()`, `nextval()`, a function the planner does not know), leaves a column to a default computed per run (a Python callable or SQL expression, a sequence or identity), or picks its rows by `LIMIT`/`OFFSET`/`FETCH`/`DISTINCT ON`",
        "it runs once per shard, and the copies would end up different",
    ),
    Shape(
        "bulk_update_without_key",
        "refused",
        "ORM bulk `UPDATE` by primary key (`session.execute(update(Model), [rows])`) of a sharded table whose primary key does not include the shard key, without WHERE criteria or `shard_key=`",
        "which shard holds each row is unknown, and SQLAlchemy's check that every row was found would fail on the other shards",
    ),
    Shape(
        "bulk_returning_skipping_rows",
        "refused",
        "`RETURNING` of an ORM bulk `INSERT ... ON CONFLICT DO NOTHING` (or `DO UPDATE ... WHERE`) with rows of several shards",
        "rows a conflict skips return nothing, so the shards' rows cannot be put back in parameter order",
    ),
    Shape(
        "values_of_several_shards",
        "refused",
        "a multi-row `INSERT ... VALUES` (`insert(Model).values([{...}, {...}])`) of a sharded table with rows of several shards",
        "one statement runs on one shard; rows passed as parameters (`session.execute(insert(Model), [rows])`) are placed row by row",
    ),
    Shape(
        "global_rows_by_limit",
        "refused",
        "a subquery over global tables that picks rows by `LIMIT`/`OFFSET`/`FETCH`/`DISTINCT ON` not ordered by their primary keys, in a statement run on several shards",
        "each shard's copy may pick other rows",
    ),
    Shape(
        "writing_cte",
        "refused",
        "a data-modifying `WITH` (`INSERT`/`UPDATE`/`DELETE ... RETURNING` as a CTE)",
        "it would write on the shards the rest of the statement reads, not where its rows live",
    ),
    Shape(
        "global_outer_join",
        "refused",
        "an outer join that keeps the global side (`Country LEFT JOIN Customer`), or a FULL join with a global table",
        "unmatched global rows would come back once per shard",
    ),
    Shape(
        "non_colocated_join",
        "refused",
        "a join of sharded tables whose shard keys are not equated",
        "the matching rows may live on other shards",
    ),
    Shape(
        "pinned_table_join",
        "refused",
        'a table placed on one shard (`__shard__ = "s2"`) read with sharded rows of other shards, or with a table on another shard',
        "the other shards do not have it",
    ),
    Shape(
        "derived_table",
        "refused",
        "a FROM subquery or CTE over sharded tables that aggregates, groups, limits or is DISTINCT (other than `Query.count()`)",
        "each shard would compute it from its own rows only",
    ),
    Shape(
        "distinct",
        "refused",
        "`DISTINCT ON`, DISTINCT of ORM entities or in an aggregate query",
        "the same row may come from several shards; select columns, or use GROUP BY",
    ),
    Shape(
        "count_distinct",
        "refused",
        "`count(DISTINCT x)` and other aggregates of DISTINCT",
        "the same value may be counted on several shards",
    ),
    Shape(
        "window",
        "refused",
        "window functions (`OVER`), ordered-set aggregates",
        "each shard sees its own rows only",
    ),
    Shape("having", "refused", "`HAVING`", "a group's rows are spread over shards"),
    Shape("fetch", "refused", "`FETCH FIRST`", "use LIMIT"),
    Shape("filter", "refused", "aggregate `FILTER (WHERE ...)`", "not merged"),
    Shape(
        "aggregate_expression",
        "refused",
        "expressions over aggregates (`count(*) + 1`), nested aggregates",
        "select the aggregate itself and compute the rest after the query",
    ),
    Shape(
        "other_aggregate",
        "refused",
        "aggregates other than count/sum/min/max/avg (`string_agg`, `array_agg`, `bool_and`, `stddev_pop`, user-defined aggregates...)",
        "their partial results cannot be combined here",
    ),
    Shape(
        "entity_aggregate",
        "refused",
        "an aggregate query that also selects whole entities or tables",
        "select the grouped columns and the aggregates",
    ),
    Shape(
        "ungrouped_column",
        "refused",
        "a selected column that is neither aggregated nor grouped by (PostgreSQL accepts it when grouped by a primary key)",
        "select it through GROUP BY",
    ),
    Shape(
        "order_unselected",
        "refused",
        "`ORDER BY` an expression that is not selected, in a statement with ORM entities, with `SELECT DISTINCT` or in an aggregate query",
        "select it (with a label)",
    ),
    Shape("compound", "refused", "`UNION`, `INTERSECT`, `EXCEPT` across shards", "not merged"),
    Shape(
        "for_update",
        "refused",
        "`SELECT ... FOR UPDATE/SHARE` across shards",
        "row locks on several shards at once can deadlock",
    ),
    Shape(
        "enum_order",
        "refused",
        "`ORDER BY`, `min()`, `max()` of a PostgreSQL enum",
        "PostgreSQL sorts it by declaration order",
    ),
    Shape(
        "group_by_label_named_like_column",
        "refused",
        "`GROUP BY` a name that is both a selected label and a column of the FROM tables",
        "PostgreSQL groups by the column, not by the label's expression",
    ),
    Shape(
        "collation",
        "refused",
        "`ORDER BY`, `min()`, `max()` of text whose collation is not `C`/`POSIX` (the column's declared or DDL collation, the database default, inherited by `lower()`, `trim()`...), `GROUP BY` text under a nondeterministic collation",
        "merged text is compared by code point, PostgreSQL's order only under C",
    ),
    Shape(
        "not_a_select",
        "refused",
        "`text()`, `INSERT ... SELECT` into a sharded table, or another statement the planner cannot read",
        "nothing says which shards it needs",
    ),
    Shape(
        "unknown",
        "refused",
        "anything else: a part that is not on this list",
        "not known to merge exactly",
    ),
]

#: The planner's shapes by name (the order is the documentation's).
SHAPES: Final[dict[str, Shape]] = {shape.name: shape for shape in _TABLE}


def refuse(name: str, detail: str, *, remedy: str = REMEDY) -> NoReturn:
    """Raise CrossShardQueryError for the refused shape ``name``, with what was found."""
    shape = SHAPES[name]
    assert shape.verdict == "refused", name
    raise CrossShardQueryError(f"{detail}: {shape.how}; nothing was run. To run it, {remedy}")
