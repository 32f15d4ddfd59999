"""Which shards a statement needs: read from the tables it names and the shard key in its WHERE.

A statement on a sharded table goes only to the shards owning the key values
its WHERE pins with ``==`` or ``IN`` (combined through AND/OR); a pin on any
sharded table's key counts, so a join of tables sharded on the same key and
filtered on one of them is pinned too. Otherwise it goes to every shard.
Statements naming only global (``__shard__ = "all"``) tables, or no table at
all, go to the ShardSet's home shard, except INSERT/UPDATE/DELETE of a
global table, which go to every shard; tables pinned to one shard go there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Table
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseElement,
    ColumnElement,
    Grouping,
)
from sqlalchemy.sql.util import find_tables

from ..errors import ConfigurationError, CrossShardQueryError
from ._shard_set import ShardSet
from .strategies import ShardId

__all__ = ["shards_for_statement", "statement_tables"]

_UNKNOWN: Any = object()

# (key column, table name, column name)
_KeyColumn = tuple[ColumnElement[Any], str, str]


def statement_tables(statement: Any) -> list[Table]:
    """The tables a statement reads or writes (including those in subqueries)."""
    seen: dict[Table, None] = {}
    for table in find_tables(statement, check_columns=True, include_crud=True):
        if isinstance(table, Table):
            # ORM statements hold annotated copies of the Table: key on the Table itself.
            seen.setdefault(table._deannotate(), None)
    return list(seen)


def shards_for_statement(
    statement: Any,
    shard_set: ShardSet,
    params: Mapping[str, Any] | None,
    *,
    shard_key: Any = _UNKNOWN,
) -> list[ShardId]:
    """The shard ids ``statement`` must run on, in ShardSet order.

    ``shard_key`` is the ``execution_options(shard_key=...)`` value, if any; it places
    statements on sharded tables only (global and pinned tables keep their rule).
    """
    keyed: list[_KeyColumn] = []
    pinned: set[ShardId] = set()
    has_global = False
    for table in statement_tables(statement):
        rule = shard_set.rule_for(table)
        if rule is None:
            raise ConfigurationError(
                f"table {table.name!r} is not placed on the shards: give its model "
                "__shard_key__ = '<column>', or __shard__ = 'all' (reference data on every "
                "shard) or __shard__ = '<shard id>'"
            )
        kind, arg = rule
        if kind == "key":
            assert arg is not None
            keyed.append((table.c[arg], table.name, arg))
        elif kind == "pinned":
            assert arg is not None
            pinned.add(arg)
        else:
            has_global = True
    if shard_key is not _UNKNOWN and keyed:
        # Only sharded tables: global and pinned tables keep their own placement.
        col, model, column = keyed[0]
        return [shard_set.shard_for(shard_key, model=model, column=column, key_column=col)]
    if keyed:
        where = getattr(statement, "whereclause", None)
        found = _pins(where, keyed, shard_set, params or {}) if where is not None else None
        if found is None:
            return list(shard_set.shard_ids)
        if not found:
            # Contradictory pins (key = 1 AND key = 2): no shard has rows; any one answers.
            return [shard_set.home_shard]
        return [s for s in shard_set.shard_ids if s in found]
    if pinned:
        if len(pinned) > 1:
            raise CrossShardQueryError(
                f"the statement joins tables pinned to different shards {sorted(pinned)}; "
                "a join cannot span servers"
            )
        return [next(iter(pinned))]
    if has_global and getattr(statement, "is_dml", False):
        return list(shard_set.shard_ids)  # reference data: written to every shard
    return [shard_set.home_shard]


def _pins(
    clause: ClauseElement,
    keys: list[_KeyColumn],
    shard_set: ShardSet,
    params: Mapping[str, Any],
) -> set[ShardId] | None:
    """Shards the clause restricts the key to, or None when it does not restrict it."""
    if isinstance(clause, Grouping):
        inner: ClauseElement = clause.element  # type: ignore[assignment]
        return _pins(inner, keys, shard_set, params)
    if isinstance(clause, BooleanClauseList):
        parts = [_pins(c, keys, shard_set, params) for c in clause.clauses]
        if clause.operator is operators.and_:
            result: set[ShardId] | None = None
            for part in parts:
                if part is not None:
                    result = part if result is None else result & part
            return result
        if clause.operator is operators.or_:
            if any(part is None for part in parts):
                return None
            return set().union(*(p for p in parts if p is not None))
        return None
    if isinstance(clause, BinaryExpression):
        op = clause.operator
        if op is operators.eq:
            for col, other in ((clause.left, clause.right), (clause.right, clause.left)):
                key = _key_of(col, keys)
                if key is not None:
                    value = _bind_value(other, params)
                    if value is not _UNKNOWN:
                        return {
                            shard_set.shard_for(
                                value, model=key[1], column=key[2], key_column=key[0]
                            )
                        }
        elif op is operators.in_op:
            key = _key_of(clause.left, keys)
            if key is not None:
                values = _in_values(clause.right, params)
                if values is not None:
                    return {
                        shard_set.shard_for(v, model=key[1], column=key[2], key_column=key[0])
                        for v in values
                    }
    return None


def _key_of(element: Any, keys: list[_KeyColumn]) -> _KeyColumn | None:
    if not isinstance(element, ColumnElement):
        return None
    for key in keys:
        if element.shares_lineage(key[0]):
            return key
    return None


def _bind_value(element: Any, params: Mapping[str, Any]) -> Any:
    if not isinstance(element, BindParameter):
        return _UNKNOWN
    if element.key in params:
        return params[element.key]
    if element.callable is not None or element.value is not None:
        return element.effective_value
    return _UNKNOWN


def _in_values(element: Any, params: Mapping[str, Any]) -> Iterable[Any] | None:
    if isinstance(element, Grouping):
        element = element.element
    if isinstance(element, BindParameter):
        value = _bind_value(element, params)
        if value is _UNKNOWN or not isinstance(value, list | tuple | set | frozenset):
            return None
        return list(value)
    clauses = getattr(element, "clauses", None)
    if clauses is not None:
        values = [_bind_value(c, params) for c in clauses]
        return None if any(v is _UNKNOWN for v in values) else values
    return None
