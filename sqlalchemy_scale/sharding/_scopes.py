"""SQLAlchemy's internals the shard planner reads, behind one door: the SELECTs inside a
statement as PostgreSQL will see them, and the clauses of each.

The shard planner has to know, for every SELECT nested in a statement
(subqueries, EXISTS, IN, derived tables, CTEs, the members of a UNION), which
FROM items it really has once SQLAlchemy has applied correlation: a subquery
naming ``orders`` inside a SELECT from ``orders`` is correlated only when it
names another table too (``Select.correlate()`` rules, see SQLAlchemy's
``SelectState._correlate_froms``). Rather than copy those rules, the statement
is compiled once for PostgreSQL by a compiler that records what SQLAlchemy
itself decides, select by select.

This is the one place the planner relies on SQLAlchemy's internals, each
behind a named function: :class:`_RecordingCompiler` overrides
``visit_select`` (public visitor) and ``_setup_select_stack`` (private; it
returns the FROM list after correlation, SQLAlchemy 2.0 and 2.1);
:func:`select_parts` reads a Select's clauses (``_group_by_clauses``,
``_having_criteria``, ``_distinct``, ``_limit_clause``... have no public
accessors); :func:`deannotated` and :func:`same_type_affinity` name the
ORM-annotation and type-affinity helpers. ``tests/test_sharding_planner.py``
fails by name if an upgrade changes one of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.base import PGCompiler
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.selectable import CompoundSelect, FromClause, Select

from .._sa import (
    compilable_alone,
    deannotate,
    dml_froms,
    extra_froms,
    is_orm_statement,
    limit_offset,
    select_clauses,
    type_affinity,
)

__all__ = [
    "Scope",
    "SelectParts",
    "deannotated",
    "int_limit_offset",
    "is_orm",
    "same_type_affinity",
    "scopes_of",
    "select_parts",
]


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
                froms = [enclosing.table, *extra_froms(enclosing)]
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


def scopes_of(statement: Any, column_keys: list[str] | None = None) -> Scope:
    """The top scope of ``statement`` with every nested SELECT as a child scope.

    ``column_keys``: for an INSERT/UPDATE whose values come as parameters, their names (so
    the compiler knows which columns get a value, as when the statement runs)."""
    compiler = _RecordingCompiler(
        _DIALECT, compilable_alone(statement), column_keys=column_keys or None
    )
    roots = [s for s in compiler.scopes if s.parent is None]
    if isinstance(statement, UpdateBase):
        # The tables an UPDATE/DELETE names in its WHERE or SET become FROM/USING items when
        # compiled (not stored on the statement): read them from the compiler.
        froms = [statement.table, *dml_froms(compiler)]
        if not roots:
            # DML without subqueries records nothing; with them, _parent_scope made the top.
            roots = [Scope(statement, statement, froms, None)]
        else:
            roots[0].froms = froms
    if not roots:
        raise AssertionError(f"no SELECT was compiled for {type(statement).__name__}")
    return roots[0]


@dataclass(frozen=True)
class SelectParts:
    """The clauses of a Select as written (for an ORM select: entities not yet expanded)."""

    columns: tuple[Any, ...]
    distinct: bool
    #: DISTINCT ON (...) (``distinct`` is then true too)
    distinct_on: bool
    #: prefixes, suffixes, hints or syntax extensions (``ext(...)``): unknown syntax
    extensions: tuple[Any, ...]
    group_by: tuple[Any, ...]
    having: tuple[Any, ...]
    order_by: tuple[Any, ...]
    limit: Any
    offset: Any
    fetch: Any
    for_update: bool

    @property
    def only_filters(self) -> bool:
        """No grouping, HAVING, DISTINCT, LIMIT, OFFSET or FETCH: the rows are the FROM rows
        that pass the WHERE, one each."""
        return not (
            self.group_by
            or self.having
            or self.distinct
            or self.limit is not None
            or self.offset is not None
            or self.fetch is not None
            or self.extensions
        )


def select_parts(statement: Select[Any]) -> SelectParts:
    """The clauses of ``statement`` the planner reads."""
    return SelectParts(**select_clauses(statement))


def int_limit_offset(statement: Select[Any]) -> tuple[int | None, int | None]:
    """LIMIT and OFFSET as integers; CompileError when they are not plain integers."""
    return limit_offset(statement)


def deannotated(element: Any) -> Any:
    """The element without the ORM's annotations (an ORM statement holds annotated copies of
    its tables; identity comparisons need the originals)."""
    return deannotate(element)


def same_type_affinity(a: Any, b: Any) -> bool:
    """Whether two expressions have types of the same family (Integer and BigInteger: yes;
    Integer and String: no)."""
    return bool(type_affinity(a.type) is type_affinity(b.type))


def is_orm(statement: Any) -> bool:
    """Whether the ORM compiles ``statement`` (it names mapped entities or attributes)."""
    return is_orm_statement(statement)
