"""A mapped class's shard key: its attribute, its column, and the shard that owns a value.

Shared by the session (``get(..., shard_key=...)``, placing instances) and the statement
execution (placing inserted rows); a value no shard owns is a read that finds nothing.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy.orm import Mapper

from ..errors import ConfigurationError, ShardKeyError
from ._shard_set import ShardSet
from ._stored_key import stored_key
from .strategies import ShardId

__all__ = ["key_attr", "key_column", "read_owners"]


def key_attr(mapper: Mapper[Any]) -> str:
    """The attribute named by the class's ``__shard_key__``."""
    attr = getattr(mapper.class_, "__shard_key__", None)
    if attr is None:
        raise ConfigurationError(f"{mapper.class_.__name__} has no __shard_key__")
    return str(attr)


def key_column(mapper: Mapper[Any]) -> Any:
    """The column behind the class's shard key attribute."""
    return mapper.get_property(key_attr(mapper)).columns[0]


def read_owners(shard_set: ShardSet, mapper: Mapper[Any], value: Any) -> list[ShardId]:
    """The shard that may hold rows with shard key ``value``, or none when no shard owns it
    (a read of such a key finds nothing; a bad value still raises)."""
    attr = key_attr(mapper)
    column = key_column(mapper)
    place = functools.partial(
        shard_set.shard_for, model=mapper.class_.__name__, column=attr, key_column=column
    )
    if value is None:
        return []
    try:
        stored_key(value, column)
    except (ValueError, TypeError, ArithmeticError):
        return [place(value)]  # raises ShardKeyError naming the bad value
    try:
        return [place(value)]
    except ShardKeyError:
        return []
