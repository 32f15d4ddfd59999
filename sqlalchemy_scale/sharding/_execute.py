"""A sharded session's ORM statements: which shards run them, and running them there.

:func:`execute_statement` is the session's ``do_orm_execute`` hook (in place of
horizontal_shard's sequential one). It gathers what the statement says about its shards
(an explicit shard id, ``shard_key=``, the rows of an INSERT, the planner's proof from its
WHERE and tables) and lets :func:`~._precedence.choose_shards` decide; then it runs the
statement on one shard, fans a SELECT out concurrently and merges it
(:mod:`~sqlalchemy_scale.sharding.fanout`), or runs a write on each shard in the
session's transaction. Anything that cannot be answered exactly is refused before it runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.engine.result import IteratorResult, Result, SimpleResultMetaData
from sqlalchemy.ext import horizontal_shard
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import TextualSelect

from .._sa import (
    dml_multi_values,
    dml_values,
    identity_token_option,
    non_compile_orm_options,
    on_conflict_set_keys,
    update_set_keys,
)
from ..errors import CrossShardQueryError, CrossShardWriteError, ShardKeyError
from ..router import ROUTING_OPTIONS
from ..routing import CALL_OPTIONS
from ._bulk import execute_bulk, is_bulk
from ._keys import key_attr, key_column
from ._precedence import NOT_GIVEN, choose_shards
from ._proof import Proof, key_shard, prove
from .fanout import execute_exists, execute_fanout
from .shapes import refuse
from .strategies import ShardId

if TYPE_CHECKING:
    from .session import ShardedSession

__all__ = ["bind_arguments", "execute_statement", "explicit_shard"]

log = logging.getLogger("sqlalchemy_scale.sharding")


def execute_statement(orm_context: ORMExecuteState) -> Result[Any] | None:
    """The ``do_orm_execute`` hook of a ShardedSession built with a ShardSet."""
    session = cast("ShardedSession", orm_context.session)
    if orm_context.is_update or orm_context.is_insert:
        refuse_shard_key_change(session, orm_context)
    shard_set = session.shard_set
    statement = orm_context.statement
    options = orm_context.execution_options
    key_owner: Any = NOT_GIVEN
    if "shard_key" in options:
        owner = key_shard(statement, shard_set, options["shard_key"])
        if owner is not None:  # a statement without a sharded table: nothing to place
            key_owner = owner
    shard_key = options.get("shard_key")
    explicit = explicit_shard(orm_context)
    if is_bulk(orm_context):  # rows given as parameters: each placed on its shard
        return execute_bulk(
            orm_context,
            explicit=explicit,
            key_owner=key_owner,
            shard_key=shard_key,
            bind_arguments_for=functools.partial(bind_arguments, orm_context),
        )
    if explicit is not None:
        choice = choose_shards(
            shard_set.shard_ids, explicit=explicit, key_owner=key_owner, shard_key=shard_key
        )
        return _run_on_shard(orm_context, choice.shards[0])
    if isinstance(statement, TextClause | TextualSelect):
        refuse(
            "not_a_select",
            "a text() statement names no table the planner can place",
            remedy="run it on one shard with execution_options(shard_id=...) or "
            "bind_arguments={'shard_id': ...}",
        )
    params = orm_context.parameters if isinstance(orm_context.parameters, Mapping) else None
    if orm_context.is_insert:
        rows_on = _inserted_rows_shard(session, orm_context)
        if rows_on is None:  # a global or pinned table: the table's rule
            proof = session.prove_statement(orm_context)
            if len(proof.shards) == 1:  # its subqueries must read only that shard
                proof = prove(statement, shard_set, None, rows_on=proof.shards)
        else:
            choice = choose_shards(
                shard_set.shard_ids, key_owner=key_owner, shard_key=shard_key, instance=rows_on
            )
            # Its subqueries must read only the rows' shard.
            proof = prove(statement, shard_set, None, rows_on=list(choice.shards))
    elif key_owner is NOT_GIVEN:
        proof = prove(statement, shard_set, params)  # raises before anything runs
    else:
        try:
            planned: list[ShardId] | None = prove(statement, shard_set, params).shards
        except CrossShardQueryError:  # unmergeable over every shard; shard_key places it
            planned = None
        choice = choose_shards(
            shard_set.shard_ids, key_owner=key_owner, shard_key=shard_key, planned=planned
        )
        proof = Proof(list(choice.shards))
    if proof.count_of is not None:
        return _count_merged_rows(orm_context, proof.count_of)
    shard_ids = proof.shards
    if len(shard_ids) == 1:
        return _run_on_shard(orm_context, shard_ids[0])
    if orm_context.is_select:
        run = execute_exists if proof.exists else execute_fanout
        return run(
            orm_context,
            shard_ids,
            session.shard_set,
            functools.partial(bind_arguments, orm_context),
            functions=proof.functions,
        )
    if statement.is_select:
        raise CrossShardQueryError(
            f"a {type(statement).__name__} across shards cannot be merged; pass "
            "execution_options(shard_id=...) or shard_key=..."
        )
    if session.shard_set.cross_shard_writes == "refuse":
        # Refuse before any shard runs it: a shard that ran it would commit with the next commit().
        raise CrossShardWriteError(
            f"a {type(statement).__name__} on shards {shard_ids} needs a transaction on several "
            "shards; nothing was run. Use ShardSet(cross_shard_writes='two_phase'), or pin it to "
            "one shard with shard_key=... or execution_options(shard_id=...)"
        )
    # INSERT (global tables), UPDATE or DELETE on several shards: each shard in the session's
    # transaction, so the cross-shard commit rules apply; one after the other, as
    # horizontal_shard does.
    results = [_run_on_shard(orm_context, s) for s in shard_ids]
    if proof.global_write:
        # Every shard holds a copy of a global table: report one copy's rows and rowcount.
        for other in results[1:]:
            other.close()
        return results[0]
    merged = results[0].merge(*results[1:])
    merged.rowcount = sum(getattr(r, "rowcount", 0) or 0 for r in results)
    return merged


def explicit_shard(orm_context: ORMExecuteState) -> ShardId | None:
    """The shard id the statement names explicitly (``set_shard_id``, an identity token,
    ``execution_options(shard_id=...)``, ``bind_arguments={"shard_id": ...}``), or None."""
    for option in non_compile_orm_options(orm_context):
        if isinstance(option, horizontal_shard.set_shard_id):
            return str(option.shard_id)
    active: Any = None
    if orm_context.is_select:
        active = orm_context.load_options
    elif orm_context.is_update or orm_context.is_delete:
        active = orm_context.update_delete_options
    if active is not None and identity_token_option(active) is not None:
        return str(identity_token_option(active))
    options = orm_context.execution_options
    for name in ("_sa_shard_id", "shard_id"):
        if options.get(name) is not None:
            return str(options[name])
    if orm_context.bind_arguments.get("shard_id") is not None:
        return str(orm_context.bind_arguments["shard_id"])
    return None


def bind_arguments(orm_context: ORMExecuteState, shard_id: ShardId) -> dict[str, Any]:
    """The statement's bind arguments for running it on ``shard_id`` (with its per-call
    routing options, for the shard's Router)."""
    arguments = dict(orm_context.bind_arguments)
    arguments["shard_id"] = shard_id
    options = orm_context.execution_options
    routing = {k: options[k] for k in ROUTING_OPTIONS if k in options}
    if routing:
        arguments[CALL_OPTIONS] = routing
    return arguments


def _run_on_shard(orm_context: ORMExecuteState, shard_id: ShardId) -> Result[Any]:
    orm_context.update_execution_options(identity_token=shard_id)
    return orm_context.invoke_statement(bind_arguments=bind_arguments(orm_context, shard_id))


def _count_merged_rows(orm_context: ORMExecuteState, inner: Any) -> Result[Any]:
    """``Query.count()`` of a statement that needs merging: the number of its merged rows."""
    statement: Any = orm_context.statement
    options = {k: v for k, v in orm_context.execution_options.items() if not k.startswith("_sa")}
    rows = orm_context.session.execute(
        inner,
        orm_context.parameters,
        execution_options=options,
    ).all()
    keys = [str(k) for k in statement.selected_columns.keys()]  # noqa: SIM118
    return IteratorResult(SimpleResultMetaData(keys), iter([(len(rows),)]))


def refuse_shard_key_change(session: ShardedSession, orm_context: ORMExecuteState) -> None:
    """Raise when an UPDATE (or INSERT ... ON CONFLICT DO UPDATE) sets a shard key: the row
    would stay on the shard of its old key, where reads by the new key never look."""
    stmt: Any = orm_context.statement
    table: Any = getattr(stmt, "table", None)
    rule = session.shard_set.rule_for(table) if table is not None else None
    if rule is None or rule[0] != "key":
        return
    mapper = orm_context.bind_mapper
    # A joined-inheritance subclass's table has no key column: the key is its base's.
    column = key_column(mapper) if mapper is not None else table.c[rule[1]]
    names = {column.name, column.key}
    if mapper is not None:
        names.add(key_attr(mapper))
    sets: list[Any] = []
    if orm_context.is_update:
        sets += update_set_keys(stmt)
        params = orm_context.parameters
        rows = [params] if isinstance(params, Mapping) else list(params or [])
        if not sets and not column.primary_key:  # SET taken from the parameters
            sets += [k for row in rows for k in row]
    sets += on_conflict_set_keys(stmt)
    for key in sets:
        if {getattr(key, "key", key), getattr(key, "name", key)} & names:
            model = mapper.class_.__name__ if mapper is not None else table.name
            raise ShardKeyError(
                f"{type(stmt).__name__} of {model} sets its shard key {column.name!r}: the rows "
                "would stay on the shard of their old key; nothing was run. Changing a shard key "
                "moves a row: delete it and insert it again (or use DirectorySharding.move)",
                model=model,
                column=column.name,
                value=None,
            )


def _inserted_rows_shard(session: ShardedSession, orm_context: ORMExecuteState) -> ShardId | None:
    """The shard an INSERT's rows belong to by their shard keys (all rows must share one);
    None for a table placed by its rule (global, pinned)."""
    stmt: Any = orm_context.statement
    table = stmt.table
    rule = session.shard_set.rule_for(table)
    if rule is None or rule[0] != "key":
        return None
    column = rule[1]
    params = orm_context.parameters
    rows: list[Mapping[str, Any]] = (
        [params] if isinstance(params, Mapping) and params else list(params or [])  # type: ignore[arg-type]
    )
    if not rows:  # insert(...).values(...): the values are in the statement
        written = dml_multi_values(stmt) or [dml_values(stmt) or {}]  # one row, or VALUES rows
        rows = [
            {
                str(getattr(key, "key", key)): getattr(value, "effective_value", value)
                for key, value in values.items()
            }
            for values in written
        ]
    shards = set()
    mapper = orm_context.bind_mapper
    name = mapper.class_.__name__ if mapper is not None else table.name
    attr = key_attr(mapper) if mapper is not None else str(column)
    # A joined-inheritance subclass's table has no key column: the key is its base's.
    placing = key_column(mapper) if mapper is not None else table.c[column]
    for row in rows:
        shards.add(
            session.shard_set.shard_for(
                row.get(attr, row.get(str(column))),
                model=name,
                column=attr,
                key_column=placing,
            )
        )
    if len(shards) != 1:
        refuse(
            "values_of_several_shards",
            f"an INSERT into {table.name} whose VALUES hold rows of shards {sorted(shards)}",
            remedy="pass the rows as parameters, session.execute(insert(Model), [{...}, ...]), "
            "or add the objects with session.add_all()",
        )
    return shards.pop()
