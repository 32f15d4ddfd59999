"""The SELECTs inside a statement as PostgreSQL will see them.

The shard planner has to know, for every SELECT nested in a statement
(subqueries, EXISTS, IN, derived tables, CTEs, the members of a UNION), which
FROM items it really has once SQLAlchemy has applied correlation: a subquery
naming ``orders`` inside a SELECT from ``orders`` is correlated only when it
names another table too (``Select.correlate()`` rules, see SQLAlchemy's
``SelectState._correlate_froms``). Rather than copy those rules, the statement
is compiled once for PostgreSQL by a compiler that records what SQLAlchemy
itself decides, select by select.

This is the one place the sharding package relies on SQLAlchemy's compiler
internals: :class:`_RecordingCompiler` overrides ``visit_select`` (public
visitor) and ``_setup_select_stack`` (private; it returns the FROM list after
correlation, SQLAlchemy 2.0 and 2.1). ``tests/test_sharding_planner.py``
fails by name if an upgrade changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.base import PGCompiler
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.selectable import CompoundSelect, FromClause

__all__ = ["Scope", "scopes_of"]


@dataclass(eq=False)
class Scope:
    """One SELECT (or the top INSERT/UPDATE/DELETE, or a UNION) of a compiled statement."""

    #: the statement as compiled (for an ORM select: the Core select the ORM made)
    statement: Any
    #: the statement as written (the ORM select itself), to find derived tables by
    original: Any
    #: FROM items after correlation; a UNION has none
    froms: list[FromClause]
    parent: Scope | None
    #: a derived table (FROM subquery, CTE) rather than an expression subquery
    in_from: bool = False
    lateral: bool = False
    #: a member of a UNION/INTERSECT/EXCEPT (its parent is the compound scope)
    in_compound: bool = False
    children: list[Scope] = field(default_factory=list)

    @property
    def is_compound(self) -> bool:
        return isinstance(self.statement, CompoundSelect)


class _RecordingCompiler(PGCompiler):
    """A PostgreSQL compiler that records each SELECT's FROM list as SQLAlchemy decides it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.scopes: list[Scope] = []
        self._by_statement: dict[int, Scope] = {}
        self._written: list[Any] = []
        super().__init__(*args, **kw)

    def _parent_scope(self, entry: Any) -> Scope | None:
        enclosing = entry.get("selectable") if entry else None
        if enclosing is None:
            return None
        scope = self._by_statement.get(id(enclosing))
        if scope is None and isinstance(enclosing, CompoundSelect | UpdateBase):
            froms: list[FromClause] = []
            if isinstance(enclosing, UpdateBase):
                froms = [enclosing.table, *getattr(enclosing, "_extra_froms", ())]
            parent = self._parent_scope(self.stack[-2]) if len(self.stack) > 1 else None
            scope = Scope(enclosing, enclosing, froms, parent)
            if parent is not None:
                parent.children.append(scope)
            self._by_statement[id(enclosing)] = scope
            self.scopes.append(scope)
        return scope

    def visit_select(self, select_stmt: Any, **kw: Any) -> Any:  # type: ignore[override]
        self._written.append(select_stmt)
        try:
            return super().visit_select(select_stmt, **kw)  # type: ignore[no-untyped-call]
        finally:
            self._written.pop()

    def _setup_select_stack(  # type: ignore[no-untyped-def]
        self, select, compile_state, entry, asfrom, lateral, compound_index
    ):
        parent = self._parent_scope(entry)
        froms = super()._setup_select_stack(  # type: ignore[no-untyped-call]
            select, compile_state, entry, asfrom, lateral, compound_index
        )
        scope = Scope(
            select,
            self._written[-1] if self._written else select,
            list(froms),
            parent,
            in_from=bool(asfrom) and compound_index is None,
            lateral=bool(lateral),
            in_compound=compound_index is not None,
        )
        if parent is not None:
            parent.children.append(scope)
        self._by_statement[id(select)] = scope
        self.scopes.append(scope)
        return froms


_DIALECT: Any = postgresql.dialect()  # type: ignore[no-untyped-call]


def scopes_of(statement: Any) -> Scope:
    """The top scope of ``statement`` with every nested SELECT as a child scope."""
    compiler = _RecordingCompiler(_DIALECT, statement)
    roots = [s for s in compiler.scopes if s.parent is None]
    if isinstance(statement, UpdateBase) and not roots:
        # DML without subqueries records nothing; with them, _parent_scope made the top scope.
        froms = [statement.table, *getattr(statement, "_extra_froms", ())]
        roots = [Scope(statement, statement, froms, None)]
    if not roots:
        raise AssertionError(f"no SELECT was compiled for {type(statement).__name__}")
    return roots[0]
