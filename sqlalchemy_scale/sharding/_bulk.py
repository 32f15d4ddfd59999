"""ORM bulk INSERT and UPDATE in a sharded session: each parameter set placed on its shard.

``session.execute(insert(Model), [{...}, {...}])`` (SQLAlchemy's ORM bulk INSERT, also
``postgresql.insert(Model).on_conflict_do_update(...)`` with a list of rows) and
``session.execute(update(Model), [{"id": ..., ...}])`` (bulk UPDATE by primary key) hand
their rows to SQLAlchemy's bulk persistence, which writes through one connection and
refuses horizontal_shard's per-instance connections. Here the rows are placed first,
before anything runs:

* a sharded table: each row on the shard of its own shard key; a row without one raises
  :class:`~sqlalchemy_scale.ShardKeyError`. A bulk UPDATE by primary key places its rows
  the same way, so the primary key must include the shard key; otherwise it is refused
  (which shard holds a row is unknown, and SQLAlchemy's check that every row was
  found would fail on every other shard), unless a WHERE criterion makes it an UPDATE of
  the matching rows, without that check, which runs on every shard the WHERE allows;
* a global table: every row on every shard, under the global-write rules of
  :func:`~._proof.prove` (no per-run functions or defaults); the result is the home
  shard's copy's, as for other global writes;
* a pinned table, ``execution_options(shard_id=...)`` or ``shard_key=...``: that shard.

Each shard's rows then run through SQLAlchemy's own bulk persistence on that shard's
primary in the session's transaction, so the ORM's meaning (attribute names, joined
inheritance, RETURNING of entities or columns) is SQLAlchemy's. RETURNING rows from
several shards come back in the order of the parameter sets, which is SQLAlchemy's
``sort_by_parameter_order=True`` contract for one database (each shard's part runs with
it); an ``ON CONFLICT DO NOTHING`` (or ``DO UPDATE ... WHERE``) with RETURNING across
shards is refused, as rows it skips return nothing to order by.

When *not* to use it: rows of many shards in one call still make one transaction on
each of them (two-phase commit); group rows by shard when that matters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy.dialects.postgresql.dml import OnConflictDoNothing, OnConflictDoUpdate
from sqlalchemy.engine.result import Result
from sqlalchemy.orm import ORMExecuteState

from .._sa import (
    autoflush,
    bulk_strategy,
    merged_result_like,
    on_conflict_clause,
    orm_rows,
    returning_identity_token,
)
from ..errors import CrossShardWriteError
from ._keys import key_attr, key_column
from ._precedence import NOT_GIVEN, choose_shards
from ._proof import prove
from .shapes import refuse
from .strategies import ShardId

if TYPE_CHECKING:
    from .session import ShardedSession

__all__ = ["execute_bulk", "is_bulk"]


def is_bulk(orm_context: ORMExecuteState) -> bool:
    """Whether the execution is an ORM bulk INSERT or UPDATE (parameters given apart)."""
    return bulk_strategy(orm_context)


def execute_bulk(
    orm_context: ORMExecuteState,
    *,
    explicit: ShardId | None,
    key_owner: Any,
    shard_key: Any,
    bind_arguments_for: Callable[[ShardId], dict[str, Any]],
) -> Result[Any]:
    """Place the rows of an ORM bulk statement, then run each shard's rows there (see the
    module docstring); raise before anything runs when the answer would not be one
    database's."""
    session = cast("ShardedSession", orm_context.session)
    shard_set = session.shard_set
    statement: Any = orm_context.statement
    raw = orm_context.parameters
    rows: list[Mapping[str, Any]] = [raw] if isinstance(raw, Mapping) else list(raw or [])
    everywhere = list(range(len(rows)))
    copies = False  # a global table: the same rows on every shard
    groups: dict[ShardId, list[int]]
    mapper = orm_context.bind_mapper
    assert mapper is not None  # an ORM bulk statement names its entity
    kind, _ = session.rule_for_mapper(mapper)
    if explicit is not None:
        choice = choose_shards(
            shard_set.shard_ids, explicit=explicit, key_owner=key_owner, shard_key=shard_key
        )
        groups = {choice.shards[0]: everywhere}
    elif kind != "key":
        proof = session.prove_statement(orm_context)  # global-write rules, pinned shard
        copies = proof.global_write
        groups = {shard_id: everywhere for shard_id in proof.shards}
    else:
        groups = _place_rows(orm_context, session, rows, key_owner, shard_key)
    if not groups:  # no rows (an UPDATE given []): SQLAlchemy's answer from one shard
        groups = {shard_set.home_shard: everywhere}
    if len(groups) > 1 and shard_set.cross_shard_writes == "refuse":
        raise CrossShardWriteError(
            f"a bulk {type(statement).__name__} of {mapper.class_.__name__} on shards "
            f"{sorted(groups, key=shard_set.shard_ids.index)} needs a transaction on several "
            "shards; nothing was run. Use ShardSet(cross_shard_writes='two_phase'), or write "
            "each shard's rows in its own transaction"
        )
    returning = bool(getattr(statement, "exported_columns", ()))
    ordered = returning and not copies and len(groups) > 1
    shard_statement = statement
    if ordered:
        _refuse_unorderable_returning(statement, mapper.class_.__name__)
        # Each shard's rows come back in its parameter order, to be interleaved.
        shard_statement = statement.returning(sort_by_parameter_order=True)
    if orm_context.execution_options.get("autoflush", True):
        autoflush(session)  # now: no flush may run while a shard's rows are written
    results: dict[ShardId, Result[Any]] = {}
    try:
        for shard_id in shard_set.shard_ids:
            if shard_id not in groups:
                continue
            indexes = groups[shard_id]
            orm_context.parameters = raw if indexes is everywhere else [rows[i] for i in indexes]
            with session.bulk_writes_on(shard_id):
                results[shard_id] = orm_context.invoke_statement(
                    statement=shard_statement,
                    bind_arguments=bind_arguments_for(shard_id),
                    # Returned entities belong to the shard (a global table's: the home
                    # shard's copy, the one returned), as entities loaded from it.
                    execution_options=returning_identity_token({"autoflush": False}, shard_id),
                )
    finally:
        orm_context.parameters = raw
    if copies or len(results) == 1:
        chosen = shard_set.home_shard if shard_set.home_shard in results else next(iter(results))
        for shard_id, result in results.items():
            if shard_id != chosen:
                result.close()
        return results[chosen]
    if not ordered:
        first, *others = results.values()
        for result in others:
            result.close()
        return first
    streams = {shard_id: iter(orm_rows(result)) for shard_id, result in results.items()}
    owner = {i: shard_id for shard_id, indexes in groups.items() for i in indexes}
    merged = [next(streams[owner[i]]) for i in everywhere]
    return merged_result_like(next(iter(results.values())), merged)


def _place_rows(
    orm_context: ORMExecuteState,
    session: ShardedSession,
    rows: list[Mapping[str, Any]],
    key_owner: Any,
    shard_key: Any,
) -> dict[ShardId, list[int]]:
    """The shards of a sharded table's bulk rows: each row's own shard key decides."""
    if not rows:
        return {}
    shard_set = session.shard_set
    statement: Any = orm_context.statement
    mapper = orm_context.bind_mapper
    assert mapper is not None
    attr = key_attr(mapper)
    column = key_column(mapper)
    name = mapper.class_.__name__
    if orm_context.is_update and not column.primary_key:
        if statement.whereclause is None:
            if key_owner is not NOT_GIVEN:  # shard_key=: trusted as given, as for reads
                # (a key no shard owns raises ShardKeyError: no shard holds such rows)
                owner = shard_set.shard_for(shard_key, model=name, column=attr, key_column=column)
                return {owner: list(range(len(rows)))}
            refuse(
                "bulk_update_without_key",
                f"a bulk UPDATE by primary key of {name}, whose primary key does not include "
                f"its shard key {attr!r}",
                remedy=f"pass execution_options(shard_key=...) when every row has that "
                f"{attr}, or update each row with update({name}).where(...) naming its {attr}",
            )
        # UPDATE ... WHERE pk = :pk AND <criteria>: the matching rows, wherever they are
        # (SQLAlchemy checks no row count then); on every shard the WHERE allows.
        planned = prove(statement, shard_set, None).shards
        choice = choose_shards(
            shard_set.shard_ids, key_owner=key_owner, shard_key=shard_key, planned=planned
        )
        return {shard_id: list(range(len(rows))) for shard_id in choice.shards}
    groups: dict[ShardId, list[int]] = {}
    for index, row in enumerate(rows):
        value = row.get(attr, row.get(column.key, row.get(column.name)))
        owner = shard_set.shard_for(value, model=name, column=attr, key_column=column)
        choice = choose_shards(
            shard_set.shard_ids, key_owner=key_owner, shard_key=shard_key, instance=owner
        )
        groups.setdefault(choice.shards[0], []).append(index)
    for shard_id in groups:
        # Its subqueries (VALUES, ON CONFLICT ... WHERE) must read only the rows' shard.
        prove(
            statement,
            shard_set,
            None,
            rows_on=[shard_id] if orm_context.is_insert else None,
            given=set.intersection(*(set(row) for row in rows)),
        )
    return groups


def _refuse_unorderable_returning(statement: Any, name: str) -> None:
    clause = on_conflict_clause(statement)
    if isinstance(clause, OnConflictDoNothing) or (
        isinstance(clause, OnConflictDoUpdate) and clause.update_whereclause is not None
    ):
        refuse(
            "bulk_returning_skipping_rows",
            f"RETURNING of a bulk INSERT of {name} whose ON CONFLICT may skip rows, with rows "
            "on several shards",
            remedy="insert each shard's rows separately, or leave out RETURNING and read the "
            "rows back",
        )
