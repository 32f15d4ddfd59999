"""Fan-out execution: one SELECT run on several shards at once, merged into one database's answer.

What runs where is decided before anything runs: :func:`~._proof.prove`
proves which shards a statement needs (or refuses it), and
:func:`~.planner.plan_fanout` decides how a multi-shard SELECT is pushed down
and merged (or refuses it). Before any shard runs the statement,
:func:`execute_fanout` verifies on each shard what the plan assumed of the
servers (:class:`~.planner.TextCheck` collations: ``C`` for text compared in
Python, deterministic for text grouped in Python; functions it does not know
are not aggregates, from ``pg_proc``), so a refused statement runs nowhere.

:func:`run_concurrently` runs one job per shard on the ShardSet's thread
pool, each shard on its own connection; latency follows the slowest shard,
not the sum. When one shard fails, the statements still running on the others
are cancelled (the driver's cancel request, like Ctrl-C in psql) and the
error is raised with the shard's name in its message and ``shard_id``
attribute. An exception in the waiting thread (``KeyboardInterrupt``) cancels
and waits for every job before it propagates, so the connections are free.
ORM entities are loaded per shard (identity token = shard id) and put in the
merged order.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.engine.cursor import CursorResult
from sqlalchemy.engine.result import IteratorResult, Result, SimpleResultMetaData
from sqlalchemy.orm import ORMExecuteState

from .. import _sa
from ._async_fanout import is_async_connection, run_concurrently_on_loop
from ._proof import exists_columns
from ._shard_set import ShardSet
from .merge import SortKey, apply_limit, group_key, merge_ordered
from .planner import C_COLLATIONS, FanoutPlan, TextCheck, plan_fanout
from .shapes import refuse
from .strategies import ShardId

__all__ = ["execute_exists", "execute_fanout", "run_concurrently"]

T = TypeVar("T")


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


def _run_jobs(
    shard_set: ShardSet, jobs: Sequence[tuple[ShardId, Connection, Callable[[Connection], T]]]
) -> dict[ShardId, T]:
    """:func:`run_concurrently` on the ShardSet's threads, or, under an AsyncShardedSession,
    as tasks on the event loop (:mod:`._async_fanout`)."""
    if jobs and is_async_connection(jobs[0][1]):
        return run_concurrently_on_loop(jobs, _with_shard)
    return run_concurrently(shard_set.executor, jobs)


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


def _connections(
    orm_context: ORMExecuteState,
    shard_ids: list[ShardId],
    bind_arguments_for: Callable[[ShardId], dict[str, Any]],
) -> dict[ShardId, tuple[Connection, dict[str, Any]]]:
    """The session's connection for each shard (inside its transaction)."""
    out = {}
    for shard_id in shard_ids:
        bind_arguments = bind_arguments_for(shard_id)
        bind_arguments["clause"] = orm_context.statement
        conn = orm_context.session.connection(bind_arguments=bind_arguments)
        out[shard_id] = (conn, bind_arguments)
    return out


def execute_fanout(
    orm_context: ORMExecuteState,
    shard_ids: list[ShardId],
    shard_set: ShardSet,
    bind_arguments_for: Callable[[ShardId], dict[str, Any]],
    functions: set[str] | frozenset[str] = frozenset(),
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
    compile_state_cls = _sa.compile_state_cls(orm_context)
    if compile_state_cls is None or _sa.load_options_autoflush(orm_context):
        _sa.autoflush(session)
    shard_statement = plan.shard_statement()
    params = dict(orm_context.parameters or {})  # type: ignore[arg-type]
    # Statements without ORM entities (columns only) need no ORM loading: their Core rows
    # are already what the ORM would return.
    orm_rows = plan.kind == "rows" and compile_state_cls is not None and plan.has_entities
    jobs = []
    contexts: dict[ShardId, tuple[Mapping[str, Any], dict[str, Any]]] = {}
    connections = _connections(orm_context, shard_ids, bind_arguments_for)
    for shard_id, (conn, bind_arguments) in connections.items():
        options: Mapping[str, Any] = orm_context.execution_options
        if orm_rows:
            options = _sa.with_identity_token(orm_context, options, shard_id)
        contexts[shard_id] = (options, bind_arguments)
        fetch = functools.partial(_fetch, shard_statement, params, options)
        jobs.append((shard_id, conn, fetch))
    # Here, before any job is submitted: a refused statement runs nowhere.
    verify_servers(
        shard_set,
        [(s, c) for s, c, _ in jobs],
        text_checks=plan.text_checks,
        functions=plan.functions | functions,
    )
    results = _run_jobs(shard_set, jobs)
    if plan.kind == "aggregate":
        partials = [row for s in shard_ids for row in results[s][1]]
        return plan.aggregate_result(plan.merge_aggregate_rows(partials))
    first = results[shard_ids[0]][0]
    compile_state = getattr(first.context.compiled, "compile_state", None)
    if (plan.limit is not None or plan.offset) and getattr(
        compile_state, "multi_row_eager_loaders", False
    ):
        refuse(
            "unknown",
            "LIMIT/OFFSET across shards with a joined eager load of a collection (rows are "
            "per child, the limit is per parent)",
            remedy="use selectinload() instead",
        )
    keys = sort_keys_for(plan, first, [str(k) for k in statement.selected_columns.keys()])  # type: ignore[attr-defined]  # noqa: SIM118
    streams = [results[s][1] for s in shard_ids]
    if plan.distinct:
        merged = apply_limit(_distinct(merge_ordered(streams, keys)), plan.limit, plan.offset)
    else:
        merged = merge_ordered(streams, keys, limit=plan.limit, offset=plan.offset)
    if not orm_rows:
        rewound = _sa.rewind(first, [row for _, row in merged])
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
        _sa.rewind(cursor, chosen[index])
        orm_result = compile_state_cls.orm_setup_cursor_result(
            session, shard_statement, params, options, bind_arguments, cursor
        )
        loaded.append(orm_result)
        raw.append(iter(_sa.orm_rows(orm_result)))
    rows = [next(raw[index]) for index, _ in merged]
    return _sa.merged_result_like(loaded[0], rows)


def execute_exists(
    orm_context: ORMExecuteState,
    shard_ids: list[ShardId],
    shard_set: ShardSet,
    bind_arguments_for: Callable[[ShardId], dict[str, Any]],
    functions: set[str] | frozenset[str] = frozenset(),
) -> Result[Any]:
    """``SELECT EXISTS (...)`` on ``shard_ids``: one row, each column the OR of the shards'
    answers (the AND for ``NOT EXISTS``)."""
    _sa.autoflush(orm_context.session)
    params = dict(orm_context.parameters or {})  # type: ignore[arg-type]
    options = orm_context.execution_options
    statement = orm_context.statement
    jobs = [
        (shard_id, conn, functools.partial(_fetch, statement, params, options))
        for shard_id, (conn, _) in _connections(orm_context, shard_ids, bind_arguments_for).items()
    ]
    verify_servers(shard_set, [(s, c) for s, c, _ in jobs], functions=functions)
    results = _run_jobs(shard_set, jobs)
    answers = [results[s][1][0] for s in shard_ids]
    negated = exists_columns(statement) or []
    row = tuple(
        all(bool(a[i]) for a in answers) if inverted else any(bool(a[i]) for a in answers)
        for i, inverted in enumerate(negated)
    )
    keys = [str(k) for k in results[shard_ids[0]][0].keys()]  # noqa: SIM118
    return IteratorResult(SimpleResultMetaData(keys), iter([row]))


def sort_keys_for(
    plan: FanoutPlan, result: CursorResult[Any], selected_keys: Sequence[str]
) -> list[SortKey]:
    """Getters that read each ORDER BY term from ``result``'s rows."""
    keys: list[SortKey] = []
    for term in plan.order:
        getter: Callable[[Any], Any] | None = None
        if term.hidden is not None:
            getter = _sa.row_getter(result, f"_ss_o{term.hidden}")
        elif not isinstance(term.element, str):
            getter = _sa.row_getter(result, term.element)
        if getter is None and term.output is not None:
            getter = _sa.row_getter(result, selected_keys[term.output])
        if getter is None:
            refuse(
                "unknown", f"ORDER BY {term.element} across shards: not found in the result columns"
            )
        keys.append(SortKey(getter, term.descending, term.nulls_first))
    return keys


def _distinct(rows: Sequence[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """The first of each set of rows PostgreSQL considers equal (NaN equals NaN)."""
    seen: set[tuple[Any, ...]] = set()
    for index, row in rows:
        key = tuple(group_key(v) for v in row)
        if key not in seen:
            seen.add(key)
            yield index, row


def _fetch(
    statement: Any,
    params: dict[str, Any],
    options: Mapping[str, Any],
    conn: Connection,
) -> tuple[CursorResult[Any], list[Any]]:
    result = conn.execute(statement, params, execution_options=options)
    return result, list(result.all())


# -- what the plan assumed of the servers ------------------------------------------------

# Per ShardSet: (shard id, question) -> answer, asked once per shard.
_CATALOG: weakref.WeakKeyDictionary[ShardSet, dict[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)


def verify_servers(
    shard_set: ShardSet,
    connections: Sequence[tuple[ShardId, Connection]],
    *,
    text_checks: Sequence[TextCheck] = (),
    functions: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Refuse the statement if a shard's catalog contradicts what merging assumes."""
    if not text_checks and not functions:
        return
    cache = _CATALOG.setdefault(shard_set, {})
    for shard_id, conn in connections:
        if functions:
            _check_functions(cache, shard_id, conn, set(functions))
        for check in text_checks:
            _check_text(shard_set, cache, shard_id, conn, check)


def _check_functions(
    cache: dict[tuple[Any, ...], Any], shard_id: ShardId, conn: Connection, names: set[str]
) -> None:
    for name in sorted(names):
        key = (shard_id, "aggregate", name)
        if key not in cache:
            cache[key] = bool(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_proc WHERE proname = :n AND prokind IN ('a', 'w')"
                    ),
                    {"n": name},
                ).scalar()
            )
        if cache[key]:
            refuse(
                "other_aggregate",
                f"{name}() is an aggregate or window function on shard {shard_id!r}; across "
                "shards it cannot be merged (only count, sum, min, max and avg can)",
            )


def _check_text(
    shard_set: ShardSet,
    cache: dict[tuple[Any, ...], Any],
    shard_id: ShardId,
    conn: Connection,
    check: TextCheck,
) -> None:
    involved: list[tuple[str, bool, bool]] = []  # (name, is C, deterministic)
    for name in check.explicit:
        involved.append((name, name in C_COLLATIONS, _deterministic(cache, shard_id, conn, name)))
    default = check.default
    for schema, table, column in check.columns:
        collation = _column_collation(cache, shard_id, conn, schema, table, column)
        if collation is None:
            default = True
        else:
            involved.append(collation)
    if default:
        name = _database_collation(shard_set, shard_id, conn)
        involved.append((name, name in C_COLLATIONS, True))
    for name, is_c, deterministic in involved:
        if check.ordering and not is_c:
            refuse(
                "collation",
                f"{check.what} across shards: shard {shard_id!r} compares this text with "
                f"collation {name!r}",
                remedy="order by an expression with .collate('C') selected, or pin the query",
            )
        if not check.ordering and not deterministic:
            refuse(
                "collation",
                f"{check.what} across shards: shard {shard_id!r} groups this text with the "
                f"nondeterministic collation {name!r}",
            )


def _deterministic(
    cache: dict[tuple[Any, ...], Any], shard_id: ShardId, conn: Connection, name: str
) -> bool:
    key = (shard_id, "deterministic", name)
    if key not in cache:
        found = conn.execute(
            text("SELECT bool_and(collisdeterministic) FROM pg_collation WHERE collname = :n"),
            {"n": name},
        ).scalar()
        cache[key] = bool(found)  # unknown: assume the worst
    return bool(cache[key])


def _column_collation(
    cache: dict[tuple[Any, ...], Any],
    shard_id: ShardId,
    conn: Connection,
    schema: str | None,
    table: str,
    column: str,
) -> tuple[str, bool, bool] | None:
    """A column's collation from its DDL (None: the database default)."""
    key = (shard_id, "column", schema, table, column)
    if key not in cache:
        preparer = conn.dialect.identifier_preparer
        qualified = (
            preparer.quote(table)
            if schema is None
            else (f"{preparer.quote_schema(schema)}.{preparer.quote(table)}")
        )
        row = conn.execute(
            text(
                "SELECT c.collname, c.collisdeterministic FROM pg_attribute a "
                "JOIN pg_collation c ON c.oid = a.attcollation "
                "WHERE a.attrelid = to_regclass(:t) AND a.attname = :c"
            ),
            {"t": qualified, "c": column},
        ).first()
        if (
            row is None or row[0] == "default"
        ):  # not collatable (or not found: the database default is checked)
            cache[key] = None
        else:
            cache[key] = (str(row[0]), str(row[0]) in C_COLLATIONS, bool(row[1]))
    value: tuple[str, bool, bool] | None = cache[key]
    return value


def _database_collation(shard_set: ShardSet, shard_id: ShardId, conn: Connection) -> str:
    """The database's default collation; for a non-libc provider (ICU since PostgreSQL 15,
    builtin since 17) its name with the provider, which is never a C collation here, since
    ``datcollate`` is then only the fallback for ``lc_collate`` and not how text sorts."""
    known = shard_set.collations.get(shard_id)
    if known is not None:  # asked once per shard; a dict store is atomic under the GIL
        return known
    version = conn.dialect.server_version_info or (0,)
    if version < (15,):
        query = "SELECT datcollate, 'c' FROM pg_database WHERE datname = current_database()"
    else:
        query = (
            "SELECT datcollate, datlocprovider FROM pg_database WHERE datname = current_database()"
        )
    row = conn.exec_driver_sql(query).one()
    collate, provider = str(row[0]), str(row[1])
    providers = {"i": "icu", "b": "builtin"}
    name = (
        collate if provider == "c" else f"{collate} ({providers.get(provider, provider)} provider)"
    )
    shard_set.collations[shard_id] = name
    return name
