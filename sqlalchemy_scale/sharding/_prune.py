"""Pruning: the shards a WHERE clause restricts a shard key to, read from its values.

A key is restricted by ``key == value`` and ``key IN (values)`` (literals, bound
values, ``params()`` and expanding parameters) combined through AND/OR;
anything else restricts nothing (``key IS NULL`` included: on the outer side of
a join, NULL keys come from rows of every shard). A value is converted to the
key column's type, as PostgreSQL converts it, and placed by the ShardSet's
strategy. When reading, a value no shard owns (a range gap, a directory miss,
NULL) is a key no stored row has: it restricts to no shard. When writing, it
raises :class:`~sqlalchemy_scale.ShardKeyError`, so nothing is written with
such a key. A value that does not convert raises either way (PostgreSQL
would too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import Table
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseElement,
    Grouping,
    Null,
)

from ..errors import ShardKeyError
from ._shard_set import ShardSet
from ._stored_key import stored_key
from .strategies import ShardId

__all__ = ["KeyOf", "KeyPlacer", "pins"]

_UNKNOWN: Any = object()

#: Which key an expression is: (table, key column name), or None when it is not one.
KeyOf = Callable[[Any], tuple[Table, str] | None]


class KeyPlacer:
    """Places key values found in a statement: on their owner, or on none when reading a
    key no shard owns."""

    def __init__(self, shard_set: ShardSet, params: Mapping[str, Any], *, writing: bool) -> None:
        self.shard_set = shard_set
        self.params = params
        self.writing = writing

    def owners(self, value: Any, table: Table, key: str) -> set[ShardId]:
        column = table.c[key]
        if value is None and not self.writing:
            return set()  # key = NULL is never true

        def place() -> set[ShardId]:
            return {
                self.shard_set.shard_for(value, model=table.name, column=key, key_column=column)
            }

        if self.writing or value is None:
            return place()
        try:
            stored_key(value, column)
        except (ValueError, TypeError, ArithmeticError):
            return place()  # raises: PostgreSQL would too ("invalid input syntax")
        try:
            return place()
        except ShardKeyError:
            return set()  # no shard owns it: no stored row has it


def pins(clause: ClauseElement, key_of: KeyOf, placer: KeyPlacer) -> set[ShardId] | None:
    """Shards the clause restricts the key to, or None when it does not restrict it."""
    if isinstance(clause, Grouping):
        inner: ClauseElement = clause.element  # type: ignore[assignment]
        return pins(inner, key_of, placer)
    if isinstance(clause, BooleanClauseList):
        parts = [pins(c, key_of, placer) for c in clause.clauses]
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
                key = key_of(col)
                if key is not None:
                    value = _bind_value(other, placer.params)
                    if value is not _UNKNOWN:
                        return placer.owners(value, *key)
        elif op is operators.in_op:
            key = key_of(clause.left)
            if key is not None:
                values = _in_values(clause.right, placer.params)
                if values is not None:
                    return set().union(*(placer.owners(v, *key) for v in values))
    return None


def _bind_value(element: Any, params: Mapping[str, Any]) -> Any:
    if isinstance(element, Null):
        return None
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
