"""Planning a fan-out: how one SELECT run on several shards is pushed down and merged.

:func:`plan_fanout` reads the statement and returns a :class:`FanoutPlan`, or
raises :class:`~sqlalchemy_scale.CrossShardQueryError` before anything runs.
It accepts only the shapes :mod:`.shapes` lists as ``merged``:

* rows, optionally ``ORDER BY`` with ``LIMIT``/``OFFSET``: each shard runs
  the statement with ``LIMIT limit + offset`` and no OFFSET; the sorted
  streams are k-way merged (:func:`~sqlalchemy_scale.sharding.merge.merge_ordered`).
  ORDER BY terms are read from the selected columns (or their labels); a
  statement without ORM entities may also order by other expressions, which
  are added to each shard's columns and dropped after the merge;
  ``SELECT DISTINCT`` of columns keeps DISTINCT on each shard and drops rows
  equal across shards after the merge, before OFFSET and LIMIT;
* ``count``/``sum``/``min``/``max``/``avg`` with or without ``GROUP BY``
  (columns, or selected expressions such as ``date_trunc``, ``lower``,
  ``extract``, by object, equal expression or label): each shard returns
  partial aggregates per group (``avg`` as ``sum`` and ``count``), combined by
  :func:`~sqlalchemy_scale.sharding.merge.merge_aggregates`; ORDER BY, LIMIT
  and OFFSET then apply to the merged groups.

Whether the statement may run on several shards at all (joins, subqueries,
global tables) is proven first by :func:`~sqlalchemy_scale.sharding._proof.prove`.

When *not* to rely on it: it refuses what it cannot prove, so a query shape
missing from :mod:`.shapes` fails loudly rather than slowly; pin such queries
to a shard or run them per shard.

Comparisons made in Python must be PostgreSQL's: a plan records the
:class:`TextCheck` each text comparison needs (the collation of the
expression must be ``C``/``POSIX``, or deterministic for grouping), and the
names of functions it does not know (which must not be aggregates); the
executor verifies both on the servers before any shard runs the statement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Table, func
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine.result import IteratorResult, Result, SimpleResultMetaData
from sqlalchemy.sql import operators, sqltypes
from sqlalchemy.sql.elements import (
    BinaryExpression,
    ClauseList,
    CollationClause,
    ColumnClause,
    ColumnElement,
    FunctionFilter,
    Label,
    Over,
    UnaryExpression,
    WithinGroup,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import CompoundSelect, FromClause, Select
from sqlalchemy.sql.visitors import iterate

from .._sa import is_label_reference, is_textual_label_reference
from ._scopes import int_limit_offset, is_orm, select_parts
from .merge import AggregateKind, SortKey, apply_limit, merge_aggregates, sort_rows
from .shapes import refuse

__all__ = ["FanoutPlan", "OrderTerm", "TextCheck", "plan_fanout", "value_kind"]

_AGGREGATES: Mapping[str, AggregateKind] = {
    "count": "count",
    "sum": "sum",
    "min": "min",
    "max": "max",
    "avg": "avg",
}
#: Collations under which PostgreSQL orders text by code point, as Python does.
C_COLLATIONS = frozenset({"C", "POSIX", "C.UTF-8", "C.utf8", "ucs_basic", "pg_c_utf8"})
# PostgreSQL aggregates whose per-shard results cannot be combined into the one-database
# answer here (named without asking a server; others are looked up in pg_proc).
_UNMERGEABLE = frozenset(
    {
        "any_value",
        "array_agg",
        "bit_and",
        "bit_or",
        "bit_xor",
        "bool_and",
        "bool_or",
        "corr",
        "covar_pop",
        "covar_samp",
        "cume_dist",
        "dense_rank",
        "every",
        "json_agg",
        "json_agg_strict",
        "json_arrayagg",
        "json_object_agg",
        "json_objectagg",
        "jsonb_agg",
        "jsonb_agg_strict",
        "jsonb_object_agg",
        "mode",
        "percent_rank",
        "range_agg",
        "range_intersect_agg",
        "rank",
        "stddev",
        "stddev_pop",
        "stddev_samp",
        "string_agg",
        "var_pop",
        "var_samp",
        "variance",
        "xmlagg",
    }
)
_UNMERGEABLE_PREFIXES = ("percentile_", "regr_", "stddev", "var_", "covar_", "json")
#: Scalar functions known not to be aggregates (no pg_proc lookup needed).
KNOWN_SCALARS = frozenset(
    {
        "abs",
        "btrim",
        "ceil",
        "char_length",
        "coalesce",
        "concat",
        "date_part",
        "date_trunc",
        "floor",
        "greatest",
        "inet_server_port",
        "initcap",
        "least",
        "left",
        "length",
        "lower",
        "ltrim",
        "md5",
        "now",
        "nullif",
        "pg_is_in_recovery",
        "replace",
        "right",
        "round",
        "rtrim",
        "substr",
        "substring",
        "trim",
        "trunc",
        "upper",
    }
)
# Types whose values Python orders and compares as PostgreSQL does, whatever the collation.
_ORDERED_TYPES = (
    sqltypes.Integer,
    sqltypes.Numeric,
    sqltypes.Float,  # not a Numeric since SQLAlchemy 2.1
    sqltypes.Boolean,
    sqltypes.Date,
    sqltypes.DateTime,
    sqltypes.Time,
    sqltypes.Interval,
    sqltypes.Uuid,
    sqltypes.LargeBinary,
)


@dataclass(frozen=True)
class TextCheck:
    """The collation facts a text comparison needs, verified on each shard before running.

    ``ordering``: the expression is sorted or min/max'ed in Python (code point order):
    every collation involved must be a C collation. Otherwise it is grouped: every
    collation must be deterministic (equal means byte-equal).
    """

    what: str
    ordering: bool
    #: collations named in the statement (``COLLATE``, ``String(collation=...)``)
    explicit: frozenset[str] = frozenset()
    #: (schema, table, column) whose DDL collation decides
    columns: frozenset[tuple[str | None, str, str]] = frozenset()
    #: the database's default collation is involved
    default: bool = True


@dataclass(frozen=True)
class OrderTerm:
    """One ORDER BY term: the expression, direction, NULLs placement and, for
    aggregate plans, the output column it sorts by."""

    element: ColumnElement[Any] | str
    descending: bool
    nulls_first: bool | None
    output: int | None = None
    #: index among the plan's hidden sort columns (ORDER BY a column that is not selected)
    hidden: int | None = None


@dataclass
class FanoutPlan:
    """How a fanned-out SELECT is pushed down and merged (see the module docstring)."""

    kind: Literal["rows", "aggregate"]
    statement: Select[Any]
    order: list[OrderTerm]
    limit: int | None
    offset: int | None
    #: per selected column: ("group", i) or ("agg", i); aggregate plans only.
    outputs: list[tuple[str, int]] = field(default_factory=list)
    group_by: list[ColumnElement[Any]] = field(default_factory=list)
    aggregates: list[tuple[AggregateKind, ColumnElement[Any] | None]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    #: rows plans: ORDER BY expressions not selected, added to each shard's columns and
    #: removed from the merged rows (statements without entities only).
    hidden: list[ColumnElement[Any]] = field(default_factory=list)
    #: rows plans: the statement selects no ORM entities, so the merged rows need no ORM loading.
    has_entities: bool = True
    visible: int = 0
    #: collation facts to verify on the servers before running
    text_checks: list[TextCheck] = field(default_factory=list)
    #: names of functions in the merged parts that must not be aggregates (pg_proc)
    functions: set[str] = field(default_factory=set)
    #: rows plans: SELECT DISTINCT (each shard's rows are distinct; rows equal across
    #: shards are dropped after the merge, before OFFSET and LIMIT)
    distinct: bool = False

    def shard_statement(self) -> Select[Any]:
        """The statement each shard runs (LIMIT pushed down, or partial aggregates)."""
        stmt = self.statement
        if self.kind == "rows":
            if self.hidden:
                stmt = stmt.add_columns(
                    *(expr.label(f"_ss_o{i}") for i, expr in enumerate(self.hidden))
                )
            if self.limit is not None:
                return stmt.limit(self.limit + (self.offset or 0)).offset(None)
            return stmt.offset(None) if self.offset else stmt
        columns: list[ColumnElement[Any]] = [
            expr.label(f"_ss_g{i}") for i, expr in enumerate(self.group_by)
        ]
        for i, (kind, arg) in enumerate(self.aggregates):
            if kind == "count":
                part = func.count() if arg is None else func.count(arg)
                columns.append(part.label(f"_ss_a{i}"))
            elif kind == "avg":
                assert arg is not None
                columns.append(func.sum(arg).label(f"_ss_a{i}s"))
                columns.append(func.count(arg).label(f"_ss_a{i}c"))
            else:
                assert arg is not None
                columns.append(getattr(func, kind)(arg).label(f"_ss_a{i}"))
        return (
            # Core: keep the FROM the original columns implied. ORM: let the ORM derive it
            # from the entities (a joined-inheritance subclass is a JOIN, not two tables).
            stmt.with_only_columns(*columns, maintain_column_froms=not is_orm(stmt))
            .group_by(None)
            .group_by(*self.group_by)  # label names would not resolve any more
            .order_by(None)
            .limit(None)
            .offset(None)
        )

    def merge_aggregate_rows(self, partials: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        """Final rows of an aggregate plan, ordered and limited."""
        kinds = [kind for kind, _ in self.aggregates]
        width = len(self.group_by)
        merged = merge_aggregates(partials, width, kinds, grouped=bool(self.group_by))
        rows = [
            tuple(row[i] if what == "group" else row[width + i] for what, i in self.outputs)
            for row in merged
        ]
        if self.order:
            rows = sort_rows(rows, [_output_sort_key(t) for t in self.order])
        return apply_limit(rows, self.limit, self.offset)

    def aggregate_result(self, rows: list[tuple[Any, ...]]) -> Result[Any]:
        return IteratorResult(SimpleResultMetaData(self.keys), iter(rows))


def _output_sort_key(term: OrderTerm) -> SortKey:
    index = term.output
    assert index is not None
    return SortKey(lambda row: row[index], term.descending, term.nulls_first)


def plan_fanout(statement: Any) -> FanoutPlan:
    """Decide how to push down and merge ``statement``; raise CrossShardQueryError if we cannot."""
    if isinstance(statement, CompoundSelect):
        refuse("compound", "a UNION/INTERSECT/EXCEPT across shards")
    if not isinstance(statement, Select):
        refuse("not_a_select", f"a {type(statement).__name__} across shards")
    stmt: Select[Any] = statement
    parts = select_parts(stmt)
    if parts.distinct_on:
        refuse("distinct", "DISTINCT ON across shards")
    if parts.extensions:
        refuse(
            "unknown",
            "a prefix, suffix, hint or syntax extension across shards "
            f"({', '.join(str(part) for part in parts.extensions)})",
        )
    if parts.for_update:
        refuse(
            "for_update",
            "SELECT ... FOR UPDATE/SHARE across shards",
            remedy="lock through the shard key (one shard) or pass execution_options(shard_id=...)",
        )
    if parts.fetch is not None:
        refuse("fetch", "FETCH FIRST across shards")
    if parts.having:
        refuse("having", "HAVING across shards")
    try:
        limit, offset = int_limit_offset(stmt)
    except sa_exc.CompileError as exc:
        refuse("unknown", f"LIMIT/OFFSET across shards that are not plain integers ({exc})")
    selected = list(stmt.selected_columns)
    functions: set[str] = set()
    for element in [*selected, *parts.order_by, *parts.group_by]:
        for node in iterate(element):
            if isinstance(node, Over | WithinGroup):
                refuse("window", "window functions (OVER) and ordered-set aggregates across shards")
            if isinstance(node, FunctionFilter):
                refuse("filter", "an aggregate FILTER clause across shards")
            if _is_unmergeable_aggregate(node):
                name = getattr(node, "name", node)
                refuse(
                    "other_aggregate",
                    f"the aggregate {name}() across shards cannot be merged (only count, sum, "
                    "min, max and avg can)",
                    remedy="pin the query to one shard, or fetch the rows and aggregate in Python",
                )
            if isinstance(node, FunctionElement):
                name = str(getattr(node, "name", "")).lower()
                if name and name not in _AGGREGATES and name not in KNOWN_SCALARS:
                    functions.add(name)
    aggregates: list[tuple[int, AggregateKind, ColumnElement[Any] | None]] = []
    for index, column in enumerate(selected):
        found = _aggregate_of(column)
        if found is not None:
            aggregates.append((index, *found))
        elif any(_is_aggregate_call(n) for n in iterate(column)):
            refuse(
                "aggregate_expression",
                f"the expression {column} combines an aggregate with other operations",
            )
    group_by = [_group_term(stmt, g) for g in parts.group_by]
    if aggregates or group_by:
        if parts.distinct:
            refuse("distinct", "DISTINCT in an aggregate query across shards")
        plan = _aggregate_plan(stmt, selected, aggregates, group_by, limit, offset)
    else:
        plan = FanoutPlan("rows", stmt, [], limit, offset, visible=len(selected))
        plan.has_entities = any(not isinstance(raw, ColumnElement) for raw in parts.columns)
        if parts.distinct:
            if plan.has_entities:
                refuse(
                    "distinct",
                    "DISTINCT of ORM entities across shards",
                    remedy="select the columns, or pin the query",
                )
            plan.distinct = True
            for column in selected:
                _check_comparable(plan, column, f"DISTINCT {column}", ordering=False)
        plan.order = [_order_term(stmt, selected, c, plan=plan) for c in parts.order_by]
    plan.functions = functions
    return plan


def _group_term(stmt: Select[Any], term: Any) -> ColumnElement[Any]:
    """A GROUP BY entry as the expression it groups by (SQLAlchemy stores a function as a
    one-column ClauseList, and a label name as a textual reference)."""
    if isinstance(term, ClauseList) and len(term.clauses) == 1:
        term = term.clauses[0]
    if is_label_reference(term):
        term = term.element
    if is_textual_label_reference(term):
        name = str(term.element)
        for key, column in zip(stmt.selected_columns.keys(), stmt.selected_columns, strict=True):
            if key == name:
                inner = column.element if isinstance(column, Label) else column
                _refuse_input_column_name(stmt, name, inner)
                return inner
        refuse("unknown", f"GROUP BY {name!r}, which names no selected column")
    if isinstance(term, Label):
        term = term.element
    return term  # type: ignore[no-any-return]


def _refuse_input_column_name(stmt: Select[Any], name: str, selected: Any) -> None:
    """PostgreSQL reads a bare name in GROUP BY as a column of the FROM items before a
    selected label: ``SELECT x % 3 AS id ... GROUP BY id`` groups by the table's ``id``."""
    columns = [c for f in stmt.get_final_froms() for c in f.c if c.name == name]
    if not columns:
        return
    if (
        len(columns) == 1
        and isinstance(selected, ColumnClause)
        and selected.name == name
        and _same(selected, columns[0])
    ):
        return  # the label names the column itself
    refuse(
        "group_by_label_named_like_column",
        f"GROUP BY {name!r}, which is both a selected label and a column of the FROM tables",
        remedy="group by the expression itself, or give the label another name",
    )


def _aggregate_plan(
    stmt: Select[Any],
    selected: list[ColumnElement[Any]],
    aggregates: list[tuple[int, AggregateKind, ColumnElement[Any] | None]],
    group_by: list[ColumnElement[Any]],
    limit: int | None,
    offset: int | None,
) -> FanoutPlan:
    parts = select_parts(stmt)
    for raw in parts.columns:
        if isinstance(raw, FromClause) and not isinstance(raw, ColumnElement):
            refuse("entity_aggregate", "an aggregate query that also selects whole entities")
    by_index = {index: (kind, arg) for index, kind, arg in aggregates}
    outputs: list[tuple[str, int]] = []
    agg_list: list[tuple[AggregateKind, ColumnElement[Any] | None]] = []
    for index, column in enumerate(selected):
        if index in by_index:
            outputs.append(("agg", len(agg_list)))
            agg_list.append(by_index[index])
            continue
        inner = column.element if isinstance(column, Label) else column
        match = next((i for i, g in enumerate(group_by) if _same(inner, g)), None)
        if match is None:
            refuse(
                "ungrouped_column",
                f"the selected column {column} is neither aggregated nor one of the GROUP BY "
                "expressions",
            )
        outputs.append(("group", match))
    plan = FanoutPlan(
        "aggregate",
        stmt,
        [],
        limit,
        offset,
        outputs=outputs,
        group_by=group_by,
        aggregates=agg_list,
        keys=[str(k) for k in stmt.selected_columns.keys()],  # noqa: SIM118 (a ColumnCollection)
    )
    for kind, arg in agg_list:
        if kind in ("min", "max") and arg is not None:
            _check_comparable(plan, arg, f"{kind}({arg})", ordering=True)
        if kind in ("sum", "avg") and arg is not None and not _is_number(arg):
            refuse(
                "other_aggregate",
                f"{kind}({arg}) of a {arg.type} across shards: only sums and averages of "
                "numbers are merged (intervals keep months apart in PostgreSQL)",
                remedy="give the expression a numeric type (type_coerce(expr, Numeric)), or "
                "pin the query",
            )
    for term in group_by:
        _check_comparable(plan, term, f"GROUP BY {term}", ordering=False)
    plan.order = [_order_term(stmt, selected, c, plan=None, checks=plan) for c in parts.order_by]
    return plan


# Functions SQLAlchemy leaves untyped, by what their result compares like in Python.
_TEXT_FUNCTIONS = frozenset(
    {"lower", "upper", "trim", "btrim", "ltrim", "rtrim", "initcap", "substr", "substring"}
    | {"left", "right", "replace", "md5", "to_char", "concat", "concat_ws", "lpad", "rpad"}
)
_ORDERED_FUNCTIONS = frozenset(
    {"date_trunc", "make_date", "abs", "round", "floor", "ceil", "ceiling", "trunc"}
    | {"length", "char_length", "octet_length", "date_part", "sign", "mod"}
)
_ARGUMENT_TYPED = frozenset({"coalesce", "greatest", "least", "nullif"})


def value_kind(expr: Any) -> Literal["ordered", "text", "enum"] | None:
    """How Python compares ``expr``'s values: like PostgreSQL ("ordered"), like PostgreSQL
    under a C collation ("text"), never ("enum"), or unknown (None: ARRAY, JSON, an untyped
    function)."""
    if isinstance(expr, Label):
        expr = expr.element
    if isinstance(expr, BinaryExpression) and isinstance(expr.right, CollationClause):
        return "text"
    column_type = getattr(expr, "type", sqltypes.NULLTYPE)
    if isinstance(column_type, sqltypes.Enum):
        return "enum" if column_type.native_enum else "text"
    if isinstance(column_type, _ORDERED_TYPES):
        return "ordered"
    if isinstance(column_type, sqltypes.CHAR):
        return None  # bpchar compares without trailing spaces; padded values do not
    if isinstance(column_type, sqltypes.String):
        return "text"
    if isinstance(column_type, sqltypes.NullType) and isinstance(expr, FunctionElement):
        name = str(getattr(expr, "name", "")).lower()
        if name in _TEXT_FUNCTIONS:
            return "text"
        if name in _ORDERED_FUNCTIONS:
            return "ordered"
        if name in _ARGUMENT_TYPED:
            kinds = {value_kind(arg) for arg in expr.clauses}
            if None in kinds or "enum" in kinds:
                return None
            return "text" if "text" in kinds else "ordered"
    return None


_NUMBER_FUNCTIONS = frozenset(
    {"abs", "round", "floor", "ceil", "ceiling", "trunc", "length", "char_length", "sign", "mod"}
)


def _is_number(expr: Any) -> bool:
    column_type = getattr(expr, "type", sqltypes.NULLTYPE)
    if isinstance(column_type, sqltypes.Integer | sqltypes.Numeric | sqltypes.Float):
        return True
    return (
        isinstance(column_type, sqltypes.NullType)
        and isinstance(expr, FunctionElement)
        and str(getattr(expr, "name", "")).lower() in _NUMBER_FUNCTIONS
    )


def _check_comparable(plan: FanoutPlan, expr: Any, what: str, *, ordering: bool) -> None:
    """Record (or refuse) what comparing ``expr``'s values in Python needs: a native enum is
    refused, text needs its collation verified, types Python may order differently from
    PostgreSQL (arrays, JSON, untyped expressions) are refused."""
    kind = value_kind(expr)
    if ordering and kind == "enum":
        refuse(
            "enum_order",
            f"{what} across shards: a PostgreSQL enum",
            remedy="pin the query, or order by an expression that gives the order "
            "(e.g. array_position())",
        )
    if ordering and kind is None:
        refuse(
            "unknown",
            f"{what} across shards: values of type {getattr(expr, 'type', None)} may not sort "
            "in Python as in PostgreSQL (arrays, JSON, expressions of unknown type)",
            remedy="give the expression a type (type_coerce(expr, Float)), or pin the query",
        )
    if kind == "ordered" and (ordering or not _has_text_columns(expr)):
        return
    if kind == "enum":
        return
    check = text_check(expr, what, ordering=ordering)
    for name in check.explicit:
        if ordering and name not in C_COLLATIONS:
            refuse(
                "collation",
                f"{what} uses collation {name!r}; merged rows are compared by code point, "
                "which matches PostgreSQL only under the C collation",
            )
    plan.text_checks.append(check)


def _has_text_columns(expr: Any) -> bool:
    return any(
        isinstance(node, ColumnClause) and isinstance(node.type, sqltypes.String)
        for node in iterate(expr)
    )


def text_check(expr: Any, what: str, *, ordering: bool) -> TextCheck:
    """The collations PostgreSQL may use for ``expr`` (conservatively: every one involved)."""
    if isinstance(expr, Label):
        expr = expr.element
    if isinstance(expr, BinaryExpression) and isinstance(expr.right, CollationClause):
        name = _collation_name(expr.right)
        return TextCheck(what, ordering, explicit=frozenset({name}), default=False)
    explicit: set[str] = set()
    columns: set[tuple[str | None, str, str]] = set()
    _collect_collations(expr, explicit, columns, depth=0)
    return TextCheck(what, ordering, frozenset(explicit), frozenset(columns), default=True)


def _collect_collations(
    expr: Any, explicit: set[str], columns: set[tuple[str | None, str, str]], *, depth: int
) -> None:
    for node in iterate(expr):
        if isinstance(node, CollationClause):
            explicit.add(_collation_name(node))
        elif isinstance(node, ColumnClause) and node.table is not None:
            collation = getattr(node.type, "collation", None)
            if collation is not None:
                explicit.add(str(collation))
                continue
            if isinstance(node.type, _ORDERED_TYPES) and not isinstance(node.type, sqltypes.Enum):
                continue
            for base in node.base_columns:
                table = getattr(base, "table", None)
                if isinstance(table, Table):
                    columns.add((table.schema, table.name, str(base.name)))
                elif base is not node and depth < 8:
                    _collect_collations(base, explicit, columns, depth=depth + 1)
                else:
                    # A column of something the catalog cannot describe: assume the worst.
                    explicit.add(f"(unknown collation of {node})")


def _collation_name(clause: CollationClause) -> str:
    return str(clause.collation).strip('"')


def _is_unmergeable_aggregate(node: Any) -> bool:
    if not isinstance(node, FunctionElement):
        return False
    name = str(getattr(node, "name", "")).lower()
    return name in _UNMERGEABLE or name.startswith(_UNMERGEABLE_PREFIXES)


def _is_aggregate_call(node: Any) -> bool:
    return isinstance(node, FunctionElement) and getattr(node, "name", "").lower() in _AGGREGATES


def _aggregate_of(column: Any) -> tuple[AggregateKind, ColumnElement[Any] | None] | None:
    inner = column.element if isinstance(column, Label) else column
    if not _is_aggregate_call(inner):
        return None
    kind = _AGGREGATES[inner.name.lower()]
    args = list(inner.clauses)
    for arg in args:
        if isinstance(arg, UnaryExpression) and arg.operator is operators.distinct_op:
            refuse("count_distinct", f"{kind}(DISTINCT ...) across shards")
    if kind == "count" and (not args or _is_star(args[0])):
        return ("count", None)
    if len(args) != 1:
        refuse("unknown", f"{kind}() with {len(args)} arguments across shards")
    for node in iterate(args[0]):
        if _is_aggregate_call(node):
            refuse("aggregate_expression", f"the nested aggregate {column} across shards")
    return (kind, args[0])


def _is_star(arg: Any) -> bool:
    return getattr(arg, "name", None) == "*" or str(arg) == "*"


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a.compare(b))
    except Exception:  # elements of unrelated kinds
        return False


def _order_term(
    stmt: Select[Any],
    selected: list[ColumnElement[Any]],
    clause: Any,
    *,
    plan: FanoutPlan | None,
    checks: FanoutPlan | None = None,
) -> OrderTerm:
    """Resolve an ORDER BY clause to a selected column (or, for rows plans without
    entities, a hidden column added to the shard statement)."""
    descending = False
    nulls_first: bool | None = None
    element = clause
    while True:
        if is_label_reference(element):
            element = element.element
            continue
        if not isinstance(element, UnaryExpression) or element.modifier not in (
            operators.desc_op,
            operators.asc_op,
            operators.nulls_first_op,
            operators.nulls_last_op,
        ):
            break
        if element.modifier is operators.desc_op:
            descending = True
        elif element.modifier is operators.nulls_first_op:
            nulls_first = True
        elif element.modifier is operators.nulls_last_op:
            nulls_first = False
        element = element.element
    keys = [str(k) for k in stmt.selected_columns.keys()]  # noqa: SIM118
    output: int | None = None
    target: ColumnElement[Any] | str
    if is_textual_label_reference(element):
        name = str(element.element)
        output = keys.index(name) if name in keys else None
        target = name
    else:
        target = element
        for i, column in enumerate(selected):
            inner = column.element if isinstance(column, Label) else column
            if _same(element, column) or _same(element, inner):
                output = i
                break
    hidden: int | None = None
    if output is None:
        if (
            plan is None
            or plan.has_entities
            or plan.distinct  # PostgreSQL refuses it; as a hidden column it would be DISTINCT'd
            or not isinstance(target, ColumnElement)
        ):
            refuse(
                "order_unselected",
                f"ORDER BY {clause} across shards: the expression is not one of the selected "
                "columns",
            )
        hidden = len(plan.hidden)
        plan.hidden.append(target)
    expr = selected[output] if output is not None else target
    owner = plan if plan is not None else checks
    assert owner is not None
    _check_comparable(owner, expr, f"ORDER BY {clause}", ordering=True)
    return OrderTerm(target, descending, nulls_first, output, hidden)
