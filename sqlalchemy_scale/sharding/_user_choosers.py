"""Statement execution for a ShardedSession built with SQLAlchemy's own arguments
(``shards=``, ``shard_chooser=``, ``identity_chooser=``, ``execute_chooser=``):
horizontal_shard's semantics, with the shards of a fan-out queried concurrently.

Such a session does not know where rows live (the choosers are the application's),
so it cannot prove that merging partial results gives one database's answer: a
chooser may send a statement to shards that hold copies of the same rows, and the
engines may be any database, each sorting text its own way. It therefore returns
exactly what :mod:`sqlalchemy.ext.horizontal_shard` returns: the shards' results
concatenated in the order the ``execute_chooser`` listed the shards. ORDER BY,
LIMIT and aggregates apply per shard, as there; an application that needs them
across shards uses ``ShardedSession(shard_set=ShardSet(...))``, whose planner
merges what it can prove and refuses the rest.

What changes is only when the shards run: a SELECT that the ``execute_chooser``
sends to several shards runs on all of them at once (each on the session's own
connection to that shard, inside its transaction; the calling thread waits), so
latency is the slowest shard's, not the sum. They run one after another, as in
horizontal_shard, when two shards share a driver connection (one engine for
several shards through ``schema_translate_map`` copies, over one connection) or an engine keeps connections per thread
(``SingletonThreadPool``: SQLite ``:memory:``), and for UPDATE and DELETE.

Commit is where it keeps the project's promise rather than horizontal_shard's
silence: SQLAlchemy commits a transaction's connections one by one, in no set
order, and a failure in the middle surfaces as the driver's error although
earlier shards have committed. Here a transaction on several shards commits
them in the order of ``shards`` and a failure raises
:class:`~sqlalchemy_scale.PartialCommitError` listing what committed (as
``ShardSet(cross_shard_writes="best_effort")`` does); a transaction on one shard,
and ``twophase=True``, are SQLAlchemy's own.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.engine.result import Result
from sqlalchemy.ext import horizontal_shard
from sqlalchemy.orm import ORMExecuteState, SessionTransaction
from sqlalchemy.pool import SingletonThreadPool

from .. import _sa
from ._best_effort import commit_shards
from .fanout import run_concurrently

__all__ = ["commit_shard_by_shard", "execute_with_user_choosers"]

# Threads shared by every user-chooser session (a ShardSet session uses its ShardSet's pool).
_MAX_WORKERS = 16
_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _shared_executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=_MAX_WORKERS, thread_name_prefix="sqlalchemy_scale-shards"
            )
        return _executor


def explicit_shard(orm_context: ORMExecuteState) -> Any:
    """The shard a statement names itself, in horizontal_shard's order: ``set_shard_id``,
    an identity token, ``Query.set_shard()``, ``bind_arguments={"shard_id": ...}``."""
    for option in _sa.non_compile_orm_options(orm_context):
        if isinstance(option, horizontal_shard.set_shard_id):
            return option.shard_id
    active: Any = None
    if orm_context.is_select:
        active = orm_context.load_options
    elif orm_context.is_update or orm_context.is_delete:
        active = orm_context.update_delete_options
    if active is not None and _sa.identity_token_option(active) is not None:
        return _sa.identity_token_option(active)
    if "_sa_shard_id" in orm_context.execution_options:
        return orm_context.execution_options["_sa_shard_id"]
    return orm_context.bind_arguments.get("shard_id")


def _invoke(orm_context: ORMExecuteState, shard_id: Any) -> Result[Any]:
    bind_arguments = dict(orm_context.bind_arguments)
    bind_arguments["shard_id"] = shard_id
    orm_context.update_execution_options(identity_token=shard_id)
    return orm_context.invoke_statement(bind_arguments=bind_arguments)


def execute_with_user_choosers(orm_context: ORMExecuteState) -> Result[Any]:
    """The ``do_orm_execute`` hook of a user-chooser session (replaces horizontal_shard's
    ``execute_and_instances``): the same results, fan-out SELECTs run concurrently."""
    session: Any = orm_context.session
    shard_id = explicit_shard(orm_context)
    if shard_id is not None:
        return _invoke(orm_context, shard_id)
    shard_ids = list(session.execute_chooser(orm_context))
    if len(shard_ids) > 1 and orm_context.is_select:
        concurrent = _run_concurrently(orm_context, shard_ids)
        if concurrent is not None:
            return concurrent
    partial = [_invoke(orm_context, s) for s in shard_ids]
    return partial[0].merge(*partial[1:])


def _run_concurrently(orm_context: ORMExecuteState, shard_ids: list[Any]) -> Result[Any] | None:
    """Each shard's part at once, concatenated in ``shard_ids`` order; None (nothing was
    run) when the shards' connections cannot be used from other threads."""
    session: Any = orm_context.session
    bind_arguments: dict[Any, dict[str, Any]] = {}
    connections: dict[Any, Connection] = {}
    for shard_id in shard_ids:
        arguments = dict(orm_context.bind_arguments)
        arguments["shard_id"] = shard_id
        bind_arguments[shard_id] = arguments
        connections[shard_id] = session.connection(bind_arguments=arguments)
    # Distinct driver connections: two shards may be one engine's option copies
    # (schema_translate_map) over a pool that hands out one connection (StaticPool).
    distinct = {id(conn.connection.dbapi_connection) for conn in connections.values()}
    if len(distinct) < len(shard_ids) or any(
        isinstance(conn.engine.pool, SingletonThreadPool) for conn in connections.values()
    ):
        return None
    statement = orm_context.statement
    params: Any = orm_context.parameters or {}
    compile_state_cls: Any = _sa.compile_state_cls(orm_context)
    options: dict[Any, Any] = {}
    jobs = []
    for shard_id in shard_ids:
        shard_options: Any = orm_context.execution_options
        if compile_state_cls is not None:
            load_options = orm_context.load_options + {"_identity_token": shard_id}
            shard_options = shard_options.union({"_sa_orm_load_options": load_options})
        options[shard_id] = shard_options

        def run(conn: Connection, shard_options: Any = shard_options) -> Any:
            return conn.execute(statement, params, execution_options=shard_options)

        jobs.append((shard_id, connections[shard_id], run))
    cursors = run_concurrently(_shared_executor(), jobs)
    if compile_state_cls is None:
        results: list[Result[Any]] = [cursors[s] for s in shard_ids]
    else:
        results = [
            compile_state_cls.orm_setup_cursor_result(
                session, statement, params, options[s], bind_arguments[s], cursors[s]
            )
            for s in shard_ids
        ]
    return results[0].merge(*results[1:])


def commit_shard_by_shard(
    transaction: SessionTransaction, shard_names: dict[int, str], order: list[str]
) -> None:
    """COMMIT the transaction's connections one shard at a time (in ``order``) when there are
    several; raises PartialCommitError when one fails. ``shard_names`` maps ``id(engine)``."""
    entries: dict[int, tuple[str, Connection]] = {}
    for conn in _sa.committing_connections(transaction):
        name = shard_names.get(id(conn.engine), repr(conn.engine))
        entries[id(conn)] = (name, conn)
    if len(entries) < 2:
        return
    ranked = sorted(
        entries.values(), key=lambda e: order.index(e[0]) if e[0] in order else len(order)
    )
    commit_shards(ranked)
