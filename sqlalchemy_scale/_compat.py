"""Where SQLAlchemy 2.0 and 2.1 differ, one small named function each.

The package supports ``sqlalchemy>=2.0.24,<2.2`` (pyproject.toml says why 2.0.24).
Every behaviour that differs between the two minor versions is answered here, so
the rest of the package is written once, against what both versions share, and
``tests/test_compat.py`` checks each function on whichever version is installed
(CI runs the suite on the newest 2.0 and the newest 2.1).

Some answers read SQLAlchemy attributes that are private on one version or both
(each docstring names them); they belong with the package's other uses of
SQLAlchemy internals, one named function per need.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

import sqlalchemy
from sqlalchemy.sql import Select
from sqlalchemy.util import concurrency as _concurrency

__all__ = [
    "SQLALCHEMY_VERSION",
    "await_",
    "on_conflict_set_keys",
    "select_distinct_on",
    "select_syntax_extensions",
    "update_set_keys",
]

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
