"""SQLAlchemy's internals, behind one door: each private attribute we read is read here.

SQLAlchemy has no public accessor for some of what routing and the shard planner
must know (whether a SELECT locks rows, its raw column list, a DML statement's
SET values, the ORM's per-execution options, a result's rows to replay). Every
such use lives in this module, each behind a small function named after the
need, and ``tests/test_sa_contract.py`` exercises every function on real
SQLAlchemy objects, so an upgrade that renames or reshapes one fails that test
by name instead of misrouting a statement. ruff's ``SLF`` rule keeps private
attribute access out of every other module.

Where SQLAlchemy offers a public API we use it instead
(``Executable.get_execution_options()``, ``Session.get_transaction()``,
overriding ``Session.flush()`` rather than reading ``Session._flushing``).

When *not* to add to it: a name of our own (make it public or add a method),
or anything with a public spelling.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, TypeVar

import sqlalchemy
from sqlalchemy.engine import Connection, CursorResult, Engine, Result, TwoPhaseTransaction
from sqlalchemy.engine.result import IteratorResult
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, registry
from sqlalchemy.orm import mapperlib as _mapperlib
from sqlalchemy.orm.context import QueryContext as _QueryContext
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import _label_reference, _textual_label_reference
from sqlalchemy.util import concurrency as _concurrency

__all__ = [
    "SQLALCHEMY_VERSION",
    "autoflush",
    "await_",
    "bulk_strategy",
    "committing_connections",
    "compilable_alone",
    "compile_state_cls",
    "deannotate",
    "dml_froms",
    "dml_multi_values",
    "dml_values",
    "exclude_from_commit",
    "extra_froms",
    "identity_token_option",
    "is_flushing",
    "is_label_reference",
    "is_orm_statement",
    "is_textual_label_reference",
    "keep_prepared",
    "limit_offset",
    "load_options_autoflush",
    "mapped_registries",
    "merged_result_like",
    "non_compile_orm_options",
    "on_conflict_clause",
    "on_conflict_set_keys",
    "orm_rows",
    "proxied_events_flag",
    "returning_identity_token",
    "rewind",
    "row_getter",
    "select_clauses",
    "select_distinct_on",
    "select_head",
    "select_head_of",
    "select_syntax_extensions",
    "statement_options",
    "transaction_connection",
    "type_affinity",
    "update_set_keys",
    "with_identity_token",
    "without_connection_callable",
]

# -- statements -------------------------------------------------------------------------------


#: A statement's own execution options: ``Executable.get_execution_options()`` read by a
#: C-level getter, without that method's Python frame (routing reads them for every
#: statement, when the caches are cold). AttributeError for what is not a statement.
statement_options: Callable[[Any], Mapping[str, Any]] = operator.attrgetter("_execution_options")


#: ``(for_update, columns)`` of a ``Select``: its ``FOR UPDATE/SHARE`` clause (None: it
#: locks nothing) and its columns as written (functions and labels unexpanded).
#: AttributeError for other statements (use :func:`select_head_of`). A C-level getter:
#: routing calls it for every SELECT.
select_head: Callable[[Any], tuple[Any, Sequence[Any]]] = operator.attrgetter(
    "_for_update_arg", "_raw_columns"
)


def select_head_of(statement: Any) -> tuple[Any, Sequence[Any]]:
    """:data:`select_head` of any statement: ``(None, ())`` for what has neither (a
    ``CompoundSelect`` has a ``FOR UPDATE`` clause but no columns of its own)."""
    return getattr(statement, "_for_update_arg", None), getattr(statement, "_raw_columns", ())


def select_clauses(statement: Any) -> dict[str, Any]:
    """The clauses of a ``Select`` the shard planner reads, by name."""
    return {
        "columns": tuple(statement._raw_columns),
        "distinct": bool(statement._distinct or statement._distinct_on),
        "distinct_on": bool(statement._distinct_on)
        or "DistinctOn" in type(select_syntax_extensions(statement)[0]).__name__,
        "extensions": tuple(
            part
            for part in (
                *statement._prefixes,
                *statement._suffixes,
                *statement._hints.items(),
                *statement._statement_hints,
                *select_syntax_extensions(statement),
            )
            if part is not None
        ),
        "group_by": tuple(statement._group_by_clauses),
        "having": tuple(statement._having_criteria),
        "order_by": tuple(statement._order_by_clauses),
        "limit": statement._limit_clause,
        "offset": statement._offset_clause,
        "fetch": statement._fetch_clause,
        "for_update": statement._for_update_arg is not None,
    }


def limit_offset(statement: Any) -> tuple[int | None, int | None]:
    """LIMIT and OFFSET as integers; CompileError when they are not plain integers."""
    return statement._limit, statement._offset


def deannotate(element: Any) -> Any:
    """The element without the ORM's annotations (an ORM statement holds annotated copies of
    its tables; identity comparisons need the originals)."""
    return element._deannotate()


def type_affinity(type_: Any) -> Any:
    """The family of a SQL type (Integer and BigInteger share one)."""
    return type_._type_affinity


def is_orm_statement(statement: Any) -> bool:
    """Whether the ORM compiles ``statement`` (it names mapped entities or attributes)."""
    return bool(statement._propagate_attrs.get("compile_state_plugin") == "orm")


def extra_froms(statement: Any) -> tuple[Any, ...]:
    """The tables an UPDATE or DELETE names besides its own (``UPDATE ... FROM``)."""
    return tuple(getattr(statement, "_extra_froms", ()))


def dml_froms(compiler: Any) -> tuple[Any, ...]:
    """The tables the UPDATE or DELETE ``compiler`` compiled reads besides its own: explicit
    ``USING``/``FROM`` and those its WHERE and SET name (``UPDATE ... FROM`` made implicitly),
    as the compiler decided them."""
    return tuple(getattr(compiler.compile_state, "_extra_froms", ()))


def dml_values(statement: Any) -> Mapping[Any, Any] | None:
    """The values an INSERT or UPDATE sets in the statement itself (``.values(...)``), or
    None when they come from the parameters."""
    values = getattr(statement, "_values", None)
    return values or None


def dml_multi_values(statement: Any) -> list[Mapping[Any, Any]]:
    """The rows of a multi-row ``INSERT ... VALUES`` (``insert().values([{...}, {...}])``),
    each a mapping of column (or name) to value; empty for any other statement."""
    rows: list[Mapping[Any, Any]] = []
    for group in getattr(statement, "_multi_values", None) or ():
        for row in group:  # a mapping, or a tuple in the table's column order
            rows.append(
                row if isinstance(row, Mapping) else dict(zip(statement.table.c, row, strict=False))
            )
    return rows


def bulk_strategy(orm_context: ORMExecuteState) -> bool:
    """Whether the ORM runs an execution (seen inside ``do_orm_execute``) as an ORM bulk
    INSERT or UPDATE: ``session.execute(insert(Model), [{...}, ...])`` or
    ``session.execute(update(Model), [{...}, ...])``, parameters given apart from the
    statement, executed by SQLAlchemy's bulk persistence."""
    if orm_context.is_insert:
        options = orm_context.execution_options.get("_sa_orm_insert_options")
    elif orm_context.is_update:
        options = orm_context.update_delete_options
    else:
        return False
    return getattr(options, "_dml_strategy", None) == "bulk"


def compilable_alone(statement: Any) -> Any:
    """``statement`` in a form the compiler accepts on its own: an ORM bulk INSERT (as the
    ORM marks it for its bulk persistence, which compiles it one table at a time) is given
    the plain ORM strategy (same tables, columns and clauses)."""
    if getattr(statement, "_annotations", {}).get("dml_strategy") == "bulk":
        return statement._annotate({"dml_strategy": "orm"})
    return statement


def on_conflict_clause(statement: Any) -> Any:
    """An INSERT's ``ON CONFLICT`` clause (PostgreSQL), or None."""
    return getattr(statement, "_post_values_clause", None)


def is_label_reference(term: Any) -> bool:
    """Whether an ORDER BY/GROUP BY term is a reference to a label of the statement."""
    return isinstance(term, _label_reference)


def is_textual_label_reference(term: Any) -> bool:
    """Whether an ORDER BY/GROUP BY term names a label by string (``order_by("total")``)."""
    return isinstance(term, _textual_label_reference)


# -- ORM execution ----------------------------------------------------------------------------


def non_compile_orm_options(orm_context: ORMExecuteState) -> Sequence[Any]:
    """The ORM options of an execution that do not affect compilation (``set_shard_id``)."""
    return tuple(orm_context._non_compile_orm_options)


def identity_token_option(options: Any) -> Any:
    """The identity token set on load or bulk UPDATE/DELETE options (``set_shard()``)."""
    return options._identity_token


def with_identity_token(
    orm_context: ORMExecuteState, options: Mapping[str, Any], token: str
) -> Mapping[str, Any]:
    """Execution options that load the execution's entities with identity token ``token``."""
    load_options = orm_context.load_options + {"_identity_token": token}
    return options.union({"_sa_orm_load_options": load_options})  # type: ignore[attr-defined,no-any-return]


def returning_identity_token(options: Mapping[str, Any], token: str) -> dict[str, Any]:
    """Execution options under which an INSERT/UPDATE's ``RETURNING`` of entities loads them
    with identity token ``token`` (a DML statement has no load options of its own)."""
    load_options = _QueryContext.default_load_options + {"_identity_token": token}
    return {**options, "_sa_orm_load_options": load_options}


def compile_state_cls(orm_context: ORMExecuteState) -> Any:
    """The ORM compile-state class of an execution (None for a Core statement)."""
    return orm_context._compile_state_cls


def load_options_autoflush(orm_context: ORMExecuteState) -> bool:
    """Whether the execution's load options ask for autoflush."""
    return bool(orm_context.load_options._autoflush)


def autoflush(session: Session) -> None:
    """Flush as the ORM does before a query (honours ``Session.autoflush``)."""
    session._autoflush()


#: Whether a Session is flushing: ``flush()`` and the bulk methods (``bulk_save_objects()``,
#: ``bulk_insert_mappings()``, ...), whose bind lookups name no statement. (Flush events
#: would miss the bulk methods, which emit none.) A C-level getter: read per statement.
is_flushing: Callable[[Session], bool] = operator.attrgetter("_flushing")


def transaction_connection(transaction: SessionTransaction, engine: Engine) -> Connection | None:
    """The connection a session transaction holds for ``engine``, or None."""
    entry = transaction._connections.get(engine)
    return None if entry is None else entry[0]


def exclude_from_commit(transaction: SessionTransaction, conn: Connection) -> None:
    """Make a session transaction's commit leave ``conn``'s transaction alone, as it does a
    joined connection's (the caller ends it); a rollback or close still ends it."""
    connections = transaction._connections
    for key, (held, trans, _, autoclose) in list(connections.items()):
        if held is conn:
            connections[key] = (held, trans, False, autoclose)


def committing_connections(transaction: SessionTransaction) -> list[Connection]:
    """The connections whose transactions a session transaction's commit would COMMIT (joined
    connections excluded), each once, in the order the session began them."""
    seen: dict[int, Connection] = {}
    for conn, trans, should_commit, _ in transaction._connections.values():
        if should_commit and trans.is_active:
            seen.setdefault(id(conn), conn)
    return list(seen.values())


@contextlib.contextmanager
def without_connection_callable(session: Session) -> Iterator[None]:
    """For the duration, ``session`` has no ``connection_callable`` (horizontal_shard's
    per-instance connection hook, which makes the ORM refuse bulk INSERT/UPDATE with
    NotImplementedError): the ORM's bulk persistence then takes its connection from
    ``session.get_bind(mapper)``. Flushes must not run meanwhile (they would place every
    object by that bind)."""
    had = "connection_callable" in vars(session)
    saved = vars(session).get("connection_callable")
    session.connection_callable = None
    try:
        yield
    finally:
        if had:
            session.connection_callable = saved
        else:
            del session.connection_callable


def mapped_registries() -> list[registry]:
    """Every ORM registry alive in the process."""
    return list(_mapperlib._all_registries())


# -- results ----------------------------------------------------------------------------------


def rewind(result: CursorResult[Any], rows: list[Any]) -> CursorResult[Any]:
    """Make a buffered cursor result yield ``rows`` (raw DB-API rows it fetched) again."""
    return result._rewind(rows)


def orm_rows(result: Result[Any]) -> list[Any]:
    """An ORM result's rows as the ORM built them (before any row processing)."""
    return list(result._fetchall_impl())


def merged_result_like(template: Result[Any], rows: Iterable[Any]) -> IteratorResult[Any]:
    """A result with ``template``'s columns, entity handling and uniquing over ``rows``."""
    result: IteratorResult[Any] = IteratorResult(
        template._metadata,
        iter(rows),
        _source_supports_scalars=template._source_supports_scalars,
    )
    result._attributes = template._attributes
    result._unique_filter_state = template._unique_filter_state
    return result


def row_getter(result: CursorResult[Any], key: Any) -> Any:
    """A function reading column ``key`` (a name or an expression) from ``result``'s rows,
    or None when the result has no such column."""
    return result._getter(key, raiseerr=False)


# -- engine -----------------------------------------------------------------------------------


def keep_prepared(transaction: TwoPhaseTransaction) -> None:
    """Forget that ``transaction`` is prepared, so closing its connection does not roll the
    prepared transaction back (it is left for recovery)."""
    transaction._is_prepared = False


def proxied_events_flag() -> Any:
    """An ``Engine._has_events`` for a class derived from SQLAlchemy's ``OptionEngine`` for
    one instance: the proxied engine's flag, read by a C-level getter (``OptionEngine``'s
    own is a Python property, and SQLAlchemy reads the flag several times per statement),
    so events added to the proxied engine later still reach the instance's connections.
    A listener added to the instance itself sets the flag of its class for good (as
    ``OptionEngine`` keeps its own flag beside the proxied one)."""

    def set_flag(self: Engine, value: bool) -> None:
        if value:
            type(self)._has_events = True

    return property(operator.attrgetter("_proxied._has_events"), set_flag)


# -- where SQLAlchemy 2.0 and 2.1 differ -------------------------------------------------------
# The package supports sqlalchemy>=2.0.24,<2.2 (pyproject.toml says why 2.0.24). Each
# behaviour that differs between the two minor versions is answered by one function here;
# tests/test_compat.py checks each on the installed version (CI runs the newest 2.0 and 2.1).

T = TypeVar("T")


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# (major, minor) of the installed SQLAlchemy, e.g. (2, 0) or (2, 1).
SQLALCHEMY_VERSION: Final = _version_tuple(sqlalchemy.__version__)


def await_(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` from sync code running in SQLAlchemy's asyncio greenlet.

    SQLAlchemy 2.1 names it ``await_``; 2.0 has only ``await_only`` (kept in 2.1 as
    an alias, deprecated for 2.2).
    """
    return _AWAIT(awaitable)  # type: ignore[no-any-return]


_AWAIT: Final[Callable[[Awaitable[Any]], Any]] = (
    getattr(_concurrency, "await_", None) or _concurrency.await_only
)


def update_set_keys(statement: Any) -> list[Any]:
    """The columns (or their names) that an UPDATE's ``.values()`` or ``.ordered_values()``
    assigns, in order; empty when the SET comes from the execution's parameters.

    SQLAlchemy 2.1 keeps both spellings in ``_values``; 2.0 keeps ``ordered_values()``
    apart, in ``_ordered_values`` (a list of pairs), with ``_values`` left ``None``.
    """
    ordered = getattr(statement, "_ordered_values", None)
    if ordered:
        return [key for key, _ in ordered]
    return list(getattr(statement, "_values", None) or ())


def on_conflict_set_keys(statement: Any) -> list[Any]:
    """The columns (or their names) that an ``INSERT ... ON CONFLICT DO UPDATE SET``
    assigns; empty for any other statement.

    The SET of PostgreSQL's ``OnConflictDoUpdate`` (``update_values_to_set``) is a dict
    on SQLAlchemy 2.1 and a list of ``(key, value)`` pairs on 2.0.
    """
    on_conflict = getattr(statement, "_post_values_clause", None)
    to_set = getattr(on_conflict, "update_values_to_set", None) or ()
    if isinstance(to_set, Mapping):
        return list(to_set)
    return [key for key, _ in to_set]


def select_syntax_extensions(statement: Any) -> tuple[Any, ...]:
    """The clauses a SELECT carries from syntax extensions (``select().ext(...)``, such as
    PostgreSQL's ``distinct_on()``), each slot ``None`` when unused.

    SQLAlchemy 2.1 has four slots (pre-columns, post-select, post-criteria, post-body);
    2.0 has no syntax extensions and returns four ``None``.
    """
    return tuple(
        getattr(statement, name, None)
        for name in (
            "_pre_columns_clause",
            "_post_select_clause",
            "_post_criteria_clause",
            "_post_body_clause",
        )
    )


def select_distinct_on(statement: Select[Any], *columns: Any) -> Select[Any]:
    """``statement`` with PostgreSQL's ``DISTINCT ON (columns)``.

    SQLAlchemy 2.1 spells it ``select().ext(postgresql.distinct_on(...))`` and deprecates
    the 2.0 spelling, ``select().distinct(*columns)``, which is the only one 2.0 has.
    """
    if SQLALCHEMY_VERSION >= (2, 1):
        from sqlalchemy.dialects import postgresql

        return statement.ext(postgresql.distinct_on(*columns))
    return statement.distinct(*columns)
