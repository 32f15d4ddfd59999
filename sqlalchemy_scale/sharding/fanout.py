"""Fan-out: one SELECT run on several shards at once, merged into one database's answer.

:func:`plan_fanout` reads the statement and decides how its result can be
merged, raising :class:`~sqlalchemy_scale.CrossShardQueryError` (with the
reason) for shapes that cannot be merged correctly, before anything runs:

* rows, optionally ``ORDER BY`` with ``LIMIT``/``OFFSET``: each shard runs
  the statement with ``LIMIT limit + offset`` and no OFFSET; the sorted
  streams are k-way merged (:func:`~sqlalchemy_scale.sharding.merge.merge_ordered`).
  ORDER BY terms are read from the selected columns (or their labels); a
  statement without ORM entities may also order by other expressions, which
  are added to each shard's columns and dropped after the merge;
* ``count``/``sum``/``min``/``max``/``avg`` with or without ``GROUP BY``:
  each shard returns partial aggregates per group (``avg`` as ``sum`` and
  ``count``), combined by :func:`~sqlalchemy_scale.sharding.merge.merge_aggregates`;
  ORDER BY, LIMIT and OFFSET then apply to the merged groups;
* refused: ``DISTINCT``, ``DISTINCT ON``, ``count(DISTINCT ...)``, window
  functions (``OVER``), ``HAVING``, ``FETCH FIRST``, aggregate ``FILTER``,
  expressions over aggregates, UNION and other compound selects, ORDER BY an
  expression that is not selected in a statement with ORM entities or in an
  aggregate query, aggregates other than the five above (``string_agg``,
  ``array_agg``, ``bool_and``, ``stddev_pop``...), ``FOR UPDATE/SHARE``,
  ORDER BY/``min``/``max`` of a native enum (PostgreSQL sorts it by declaration
  order), and ORDER BY/``min``/``max`` of text under a collation other than
  ``C``/``POSIX`` (Python compares code points; a database whose
  ``datlocprovider`` is ICU or builtin is refused whatever its ``datcollate``).

:func:`run_concurrently` runs one job per shard on the ShardSet's thread
pool, each shard on its own connection; latency follows the slowest shard,
not the sum. When one shard fails, the statements still running on the others
are cancelled (the driver's cancel request, like Ctrl-C in psql) and the
error is raised with the shard's name in its message and ``shard_id``
attribute. An exception in the waiting thread (``KeyboardInterrupt``) cancels
and waits for every job before it propagates, so the connections are free.

Not handled (the statement runs, and the result is only right if the schema
makes it right): joins between tables that are not co-located by the same
shard key, and subqueries in FROM whose own LIMIT or aggregate spans shards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import func
from sqlalchemy.engine import Connection
from sqlalchemy.engine.cursor import CursorResult
from sqlalchemy.engine.result import IteratorResult, Result, SimpleResultMetaData
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.sql import operators, sqltypes
from sqlalchemy.sql.elements import (
    ColumnElement,
    FunctionFilter,
    Label,
    Over,
    UnaryExpression,
    WithinGroup,
    _label_reference,
    _textual_label_reference,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import FromClause, Select
from sqlalchemy.sql.visitors import iterate

from ..errors import CrossShardQueryError
from ._async_fanout import is_async_connection, run_concurrently_on_loop
from ._shard_set import ShardSet
from .merge import (
    AggregateKind,
    SortKey,
    apply_limit,
    merge_aggregates,
    merge_ordered,
    sort_rows,
)
from .strategies import ShardId

__all__ = ["FanoutPlan", "OrderTerm", "execute_fanout", "plan_fanout", "run_concurrently"]

T = TypeVar("T")

_AGGREGATES: Mapping[str, AggregateKind] = {
    "count": "count",
    "sum": "sum",
    "min": "min",
    "max": "max",
    "avg": "avg",
}
_C_COLLATIONS = frozenset({"C", "POSIX", "C.UTF-8", "C.utf8", "ucs_basic"})
# PostgreSQL aggregates whose per-shard results cannot be combined into the one-database
# answer here (each shard would return its own row, or the combination needs more state).
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
        "json_object_agg_strict",
        "json_object_agg_unique",
        "json_object_agg_unique_strict",
        "json_objectagg",
        "jsonb_agg",
        "jsonb_agg_strict",
        "jsonb_object_agg",
        "jsonb_object_agg_strict",
        "jsonb_object_agg_unique",
        "jsonb_object_agg_unique_strict",
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
_UNMERGEABLE_PREFIXES = ("percentile_", "regr_", "stddev", "var_", "covar_")


@dataclass(frozen=True)
class OrderTerm:
    """One ORDER BY term: the expression, direction, NULLs placement and, for
    aggregate plans, the output column it sorts by."""

    element: ColumnElement[Any] | str
    descending: bool
    nulls_first: bool | None
    output: int | None = None
    is_text: bool = False
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

    #: aggregate plans: a min()/max() of text is merged by comparing code points.
    compares_text: bool = False

    @property
    def needs_c_collation(self) -> bool:
        return self.compares_text or any(term.is_text for term in self.order)

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
            stmt.with_only_columns(*columns, maintain_column_froms=True)
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
    if not isinstance(statement, Select):
        raise CrossShardQueryError(
            f"a {type(statement).__name__} across shards cannot be merged (only plain SELECTs "
            "can); pin it to one shard with the shard key or execution_options(shard_id=...)"
        )
    stmt: Select[Any] = statement
    if stmt._distinct or stmt._distinct_on:
        raise CrossShardQueryError(
            "DISTINCT across shards cannot be merged correctly here; use GROUP BY on the "
            "columns instead, or pin the query to one shard"
        )
    if stmt._for_update_arg is not None:
        raise CrossShardQueryError(
            "SELECT ... FOR UPDATE/SHARE across shards is refused: row locks taken on several "
            "shards at once can deadlock and hold fan-out threads; lock through the shard key "
            "(one shard) or pass execution_options(shard_id=...)"
        )
    if stmt._fetch_clause is not None:
        raise CrossShardQueryError("FETCH FIRST across shards is not supported; use LIMIT")
    if stmt._having_criteria:
        raise CrossShardQueryError(
            "HAVING across shards cannot be pushed down (a group's rows are spread over "
            "shards); filter the merged rows in Python or pin the query"
        )
    try:
        limit, offset = stmt._limit, stmt._offset
    except sa_exc.CompileError as exc:
        raise CrossShardQueryError(
            f"LIMIT/OFFSET must be plain integers across shards: {exc}"
        ) from exc
    selected = list(stmt.selected_columns)
    for element in [*selected, *stmt._order_by_clauses]:
        for node in iterate(element):
            if isinstance(node, Over | WithinGroup):
                raise CrossShardQueryError(
                    "window functions (OVER) and ordered-set aggregates across shards cannot "
                    "be merged: each shard would compute its window over its own rows only"
                )
            if isinstance(node, FunctionFilter):
                raise CrossShardQueryError(
                    "aggregate FILTER clauses across shards are not supported"
                )
            if _is_unmergeable_aggregate(node):
                name = getattr(node, "name", node)
                raise CrossShardQueryError(
                    f"the aggregate {name}() across shards cannot be merged (only count, sum, "
                    "min, max and avg can); pin the query to one shard, or fetch the rows and "
                    "aggregate in Python"
                )
    aggregates: list[tuple[int, AggregateKind, ColumnElement[Any] | None]] = []
    for index, column in enumerate(selected):
        found = _aggregate_of(column)
        if found is not None:
            aggregates.append((index, *found))
        elif any(_is_aggregate_call(n) for n in iterate(column)):
            raise CrossShardQueryError(
                f"the expression {column} combines an aggregate with other operations; "
                "select the aggregate itself and compute the rest after the query"
            )
    group_by = list(stmt._group_by_clauses)
    if aggregates or group_by:
        return _aggregate_plan(stmt, selected, aggregates, group_by, limit, offset)
    plan = FanoutPlan("rows", stmt, [], limit, offset, visible=len(selected))
    plan.has_entities = any(not isinstance(raw, ColumnElement) for raw in stmt._raw_columns)
    plan.order = [_order_term(stmt, selected, c, plan=plan) for c in stmt._order_by_clauses]
    return plan


def _aggregate_plan(
    stmt: Select[Any],
    selected: list[ColumnElement[Any]],
    aggregates: list[tuple[int, AggregateKind, ColumnElement[Any] | None]],
    group_by: list[Any],
    limit: int | None,
    offset: int | None,
) -> FanoutPlan:
    for raw in stmt._raw_columns:
        if isinstance(raw, FromClause) and not isinstance(raw, ColumnElement):
            raise CrossShardQueryError(
                "an aggregate query that also selects whole entities or tables cannot be "
                "merged; select the grouped columns and the aggregates"
            )
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
            raise CrossShardQueryError(
                f"the selected column {column} is neither aggregated nor in GROUP BY"
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
            plan.compares_text |= _compares_as_text(arg.type, f"{kind}({arg})")
    plan.order = [_order_term(stmt, selected, c, plan=None) for c in stmt._order_by_clauses]
    return plan


def _compares_as_text(column_type: Any, what: str) -> bool:
    """Whether merging ``what`` compares text by code point (right only under the C
    collation); raise for values Python cannot compare as PostgreSQL does."""
    if isinstance(column_type, sqltypes.Enum) and column_type.native_enum:
        raise CrossShardQueryError(
            f"{what} across shards: a PostgreSQL enum sorts by the order its labels were "
            "declared, and merged rows would be compared by label; pin the query or order "
            "by an expression that gives the order (e.g. array_position())"
        )
    if not isinstance(column_type, sqltypes.String):
        return False
    collation = getattr(column_type, "collation", None)
    if collation is None:
        return True  # the database's default collation: checked on each shard
    if collation not in _C_COLLATIONS:
        raise CrossShardQueryError(
            f"{what} uses collation {collation!r}; merged rows are compared by "
            "code point, which matches PostgreSQL only under the C collation"
        )
    return False


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
            raise CrossShardQueryError(
                f"{kind}(DISTINCT ...) across shards cannot be merged: the same value may "
                "be counted on several shards"
            )
    if kind == "count" and (not args or _is_star(args[0])):
        return ("count", None)
    if len(args) != 1:
        raise CrossShardQueryError(f"{kind}() with {len(args)} arguments is not supported")
    for node in iterate(args[0]):
        if _is_aggregate_call(node):
            raise CrossShardQueryError("nested aggregates cannot be merged across shards")
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
    stmt: Select[Any], selected: list[ColumnElement[Any]], clause: Any, *, plan: FanoutPlan | None
) -> OrderTerm:
    """Resolve an ORDER BY clause to a selected column (or, for rows plans without
    entities, a hidden column added to the shard statement)."""
    descending = False
    nulls_first: bool | None = None
    element = clause
    while True:
        if isinstance(element, _label_reference):
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
    if isinstance(element, _textual_label_reference):
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
        if plan is None or plan.has_entities or not isinstance(target, ColumnElement):
            raise CrossShardQueryError(
                f"ORDER BY {clause} across shards: the expression is not one of the selected "
                "columns, so the merged rows cannot be ordered by it; select it (e.g. with a label)"
            )
        hidden = len(plan.hidden)
        plan.hidden.append(target)
    column_type = selected[output].type if output is not None else target.type  # type: ignore[union-attr]
    is_text = _compares_as_text(column_type, f"ORDER BY {clause}")
    return OrderTerm(target, descending, nulls_first, output, is_text, hidden)


def sort_keys_for(
    plan: FanoutPlan, result: CursorResult[Any], selected_keys: Sequence[str]
) -> list[SortKey]:
    """Getters that read each ORDER BY term from ``result``'s rows."""
    keys: list[SortKey] = []
    for term in plan.order:
        getter: Callable[[Any], Any] | None = None
        if term.hidden is not None:
            getter = result._getter(f"_ss_o{term.hidden}", raiseerr=False)
        elif not isinstance(term.element, str):
            getter = result._getter(term.element, raiseerr=False)
        if getter is None and term.output is not None:
            getter = result._getter(selected_keys[term.output], raiseerr=False)
        if getter is None:
            raise CrossShardQueryError(
                f"ORDER BY {term.element} across shards: cannot find it in the result columns"
            )
        keys.append(SortKey(getter, term.descending, term.nulls_first))
    return keys


def is_c_collation(collation: str) -> bool:
    return collation in _C_COLLATIONS


class _Job:
    """One shard's part of a fan-out: its connection and what to run on it."""

    def __init__(self, shard_id: ShardId, connection: Connection, fn: Callable[[Connection], Any]):
        self.shard_id = shard_id
        self.connection = connection
        self.fn = fn
        self.dbapi_connection = connection.connection.dbapi_connection


def run_concurrently(
    executor: ThreadPoolExecutor,
    jobs: Sequence[tuple[ShardId, Connection, Callable[[Connection], T]]],
) -> dict[ShardId, T]:
    """Run each ``fn(connection)`` on the pool at once; return results by shard id.

    Each job gets its own connection and no two jobs share one, so no
    connection is ever used by two threads at a time (the caller waits). If a
    job fails, jobs still running are cancelled and the first error is raised
    with the shard id added to its message and as ``shard_id``.
    """
    prepared = [_Job(shard_id, conn, fn) for shard_id, conn, fn in jobs]
    if len(prepared) == 1:
        job = prepared[0]
        try:
            return {job.shard_id: job.fn(job.connection)}
        except BaseException as exc:
            raise _with_shard(exc, job.shard_id) from None
    futures: dict[Future[T], _Job] = {}
    try:
        for job in prepared:
            futures[executor.submit(job.fn, job.connection)] = job
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    except BaseException:
        # KeyboardInterrupt (or any error) in this thread: the jobs must end before the
        # caller may use, roll back or close their connections.
        _cancel_and_wait(futures)
        raise
    failed = [f for f in done if f.exception() is not None]
    if failed:
        _cancel_and_wait({f: futures[f] for f in pending})
        # Report the failure that came first in shard order, not a cancellation it caused.
        first = min(failed, key=lambda f: [j.shard_id for j in prepared].index(futures[f].shard_id))
        error = first.exception()
        assert error is not None
        raise _with_shard(error, futures[first].shard_id) from None
    return {futures[f].shard_id: f.result() for f in futures}


def _cancel_and_wait(futures: Mapping[Future[Any], _Job]) -> None:
    running = {f for f in futures if not f.cancel()}
    # Repeat the cancel request until each job ends: a job may be between starting and
    # sending its statement, when a single request would find nothing to cancel.
    while running:
        for future in running:
            _cancel(futures[future].dbapi_connection)
        _, running = wait(running, timeout=0.05)


def _cancel(dbapi_connection: Any) -> None:
    # psycopg2 and psycopg 3 both offer cancel(); it sends a cancel request on a separate
    # socket, so it is safe from another thread while the query runs.
    cancel = getattr(dbapi_connection, "cancel_safe", None) or getattr(
        dbapi_connection, "cancel", None
    )
    if cancel is not None:
        with contextlib.suppress(Exception):  # the query may have finished meanwhile
            cancel()


def _with_shard(exc: BaseException, shard_id: ShardId) -> BaseException:
    note = f"on shard {shard_id!r}"
    if isinstance(exc, sa_exc.StatementError):
        exc.add_detail(note)
    elif isinstance(exc, sa_exc.SQLAlchemyError):
        exc.args = (f"{exc.args[0] if exc.args else exc} ({note})", *exc.args[1:])
    else:
        exc.add_note(note)
    exc.shard_id = shard_id  # type: ignore[attr-defined]
    return exc


def execute_fanout(
    orm_context: ORMExecuteState,
    shard_ids: list[ShardId],
    shard_set: ShardSet,
    bind_arguments_for: Callable[[ShardId], dict[str, Any]],
) -> Result[Any]:
    """Run an ORM execution's SELECT on ``shard_ids`` concurrently and merge the results.

    Each shard runs on the session's connection for that shard (from
    ``session.connection(bind_arguments=bind_arguments_for(shard_id))``), so the
    reads belong to the session's transaction. ORM entities are loaded per shard
    with the shard id as identity token, then put in the merged order.
    """
    session = orm_context.session
    statement = orm_context.statement
    plan = plan_fanout(statement)  # raises before anything runs
    compile_state_cls = orm_context._compile_state_cls
    if compile_state_cls is None or orm_context.load_options._autoflush:
        session._autoflush()
    shard_statement = plan.shard_statement()
    params = dict(orm_context.parameters or {})  # type: ignore[arg-type]
    # Statements without ORM entities (columns only) need no ORM loading: their Core rows
    # are already what the ORM would return.
    orm_rows = plan.kind == "rows" and compile_state_cls is not None and plan.has_entities
    jobs = []
    contexts: dict[ShardId, tuple[Mapping[str, Any], dict[str, Any]]] = {}
    for shard_id in shard_ids:
        bind_arguments = bind_arguments_for(shard_id)
        bind_arguments["clause"] = statement
        conn = session.connection(bind_arguments=bind_arguments)
        options: Mapping[str, Any] = orm_context.execution_options
        if orm_rows:
            load_options = orm_context.load_options + {"_identity_token": shard_id}
            options = options.union({"_sa_orm_load_options": load_options})  # type: ignore[attr-defined]
        contexts[shard_id] = (options, bind_arguments)
        fetch = functools.partial(
            _fetch, shard_set, shard_id, shard_statement, params, options, plan
        )
        jobs.append((shard_id, conn, fetch))
    if plan.needs_c_collation:
        # Here, before any job is submitted: a refused statement runs nowhere.
        for shard_id, conn, _ in jobs:
            _check_collation(shard_set, shard_id, conn)
    if is_async_connection(jobs[0][1]):  # AsyncShardedSession: tasks on the event loop
        results = run_concurrently_on_loop(jobs, _with_shard)
    else:
        results = run_concurrently(shard_set.executor, jobs)
    if plan.kind == "aggregate":
        partials = [row for s in shard_ids for row in results[s][1]]
        return plan.aggregate_result(plan.merge_aggregate_rows(partials))
    first = results[shard_ids[0]][0]
    compile_state = getattr(first.context.compiled, "compile_state", None)
    if (plan.limit is not None or plan.offset) and getattr(
        compile_state, "multi_row_eager_loaders", False
    ):
        raise CrossShardQueryError(
            "LIMIT/OFFSET across shards with a joined eager load of a collection cannot be "
            "merged (rows are per child, the limit is per parent); use selectinload() instead"
        )
    keys = sort_keys_for(plan, first, [str(k) for k in statement.selected_columns.keys()])  # type: ignore[attr-defined]  # noqa: SIM118
    merged = merge_ordered(
        [results[s][1] for s in shard_ids], keys, limit=plan.limit, offset=plan.offset
    )
    if not orm_rows:
        rewound = first._rewind([row for _, row in merged])
        return rewound.columns(*range(plan.visible)) if plan.hidden else rewound
    assert compile_state_cls is not None
    chosen: list[list[Any]] = [[] for _ in shard_ids]
    for index, row in merged:
        chosen[index].append(row)
    loaded: list[Result[Any]] = []
    raw: list[Iterator[Any]] = []
    for index, shard_id in enumerate(shard_ids):
        cursor, _ = results[shard_id]
        options, bind_arguments = contexts[shard_id]
        cursor._rewind(chosen[index])
        orm_result = compile_state_cls.orm_setup_cursor_result(  # type: ignore[no-untyped-call]
            session, shard_statement, params, options, bind_arguments, cursor
        )
        loaded.append(orm_result)
        raw.append(iter(orm_result._fetchall_impl()))
    rows = [next(raw[index]) for index, _ in merged]
    template = loaded[0]
    result: IteratorResult[Any] = IteratorResult(
        template._metadata,
        iter(rows),
        _source_supports_scalars=template._source_supports_scalars,
    )
    result._attributes = template._attributes
    result._unique_filter_state = template._unique_filter_state
    return result


def _fetch(
    shard_set: ShardSet,
    shard_id: ShardId,
    statement: Any,
    params: dict[str, Any],
    options: Mapping[str, Any],
    plan: FanoutPlan,
    conn: Connection,
) -> tuple[CursorResult[Any], list[Any]]:
    result = conn.execute(statement, params, execution_options=options)
    return result, list(result.all())


def _check_collation(shard_set: ShardSet, shard_id: ShardId, conn: Connection) -> None:
    collation = shard_set.collations.get(shard_id)
    if collation is None:  # asked once per shard; a dict store is atomic under the GIL
        collation = _database_collation(conn)
        shard_set.collations[shard_id] = collation
    if not is_c_collation(collation):
        raise CrossShardQueryError(
            f"ORDER BY a text column across shards: shard {shard_id!r} sorts text with "
            f"collation {collation!r}, and merged rows are compared by code point (the C "
            "collation); order by an expression with .collate('C') selected, or pin the query"
        )


def _database_collation(conn: Connection) -> str:
    """The database's default collation; for a non-libc provider (ICU since PostgreSQL 15,
    builtin since 17) its name with the provider, which is never a C collation here, since
    ``datcollate`` is then only the fallback for ``lc_collate`` and not how text sorts."""
    version = conn.dialect.server_version_info or (0,)
    if version < (15,):
        query = "SELECT datcollate, 'c' FROM pg_database WHERE datname = current_database()"
    else:
        query = (
            "SELECT datcollate, datlocprovider FROM pg_database WHERE datname = current_database()"
        )
    row = conn.exec_driver_sql(query).one()
    collate, provider = str(row[0]), str(row[1])
    if provider == "c":
        return collate
    name = {"i": "icu", "b": "builtin"}.get(provider, provider)
    return f"{collate} ({name} provider)"
