"""decide_role(): the statement-kind rule, checked on statement objects (no server needed)."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, delete, func, insert, select, text, update
from sqlalchemy.schema import CreateTable

from sqlalchemy_scale import decide_role

t = Table("t", MetaData(), Column("id", Integer, primary_key=True), Column("v", Integer))


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        (select(t), ("replica", "read")),
        (select(func.count()).select_from(t), ("replica", "read")),
        (select(t).union_all(select(t)), ("replica", "read")),
        (select(t).with_for_update(), ("primary", "locking read")),
        (select(t).with_for_update(read=True), ("primary", "locking read")),
        (insert(t).values(id=1), ("primary", "write")),
        (update(t).values(v=1), ("primary", "write")),
        (delete(t), ("primary", "write")),
        (CreateTable(t), ("primary", "ddl")),
        (text("SELECT 1"), ("primary", "text")),
        (text("SELECT 1").columns(), ("primary", "text")),
        (None, ("primary", "no statement")),
        (select(func.pg_try_advisory_xact_lock(42)), ("primary", "locking read")),
        (select(func.pg_advisory_lock(42).label("got")), ("primary", "locking read")),
        (select(func.nextval("seq")), ("primary", "write")),
        (select(func.now(), t.c.id), ("replica", "read")),
    ],
    ids=[
        "select",
        "aggregate",
        "union",
        "for-update",
        "for-share",
        "insert",
        "update",
        "delete",
        "ddl",
        "text",
        "textual-select",
        "no-statement",
        "advisory-xact-lock",
        "advisory-lock-labelled",
        "nextval",
        "harmless-function",
    ],
)
def test_statement_kinds(statement: object, expected: tuple[str, str]) -> None:
    """Each statement kind maps to the role the routing rules document."""
    assert decide_role(statement) == expected  # type: ignore[arg-type]


def test_flushing_always_needs_the_primary() -> None:
    """During a flush every statement needs the primary, whatever it looks like."""
    assert decide_role(select(t), flushing=True) == ("primary", "flush")
