"""Which shards a statement needs, proven, or a refusal before anything runs.

Every SELECT inside the statement (:mod:`._scopes`: subqueries, EXISTS, IN,
derived tables, UNION members, with the FROM list SQLAlchemy's correlation
gives them) is read for the tables it names and how they are placed:

* **pruning** (:mod:`._prune`): a scope's sharded rows are on the shards
  owning the key values its WHERE fixes with ``==`` or ``IN`` (combined
  through AND/OR), else on every shard. A key no shard owns (a range gap, a
  directory miss, NULL) matches no row when reading; writing with one raises
  ShardKeyError;
* **co-location**: sharded tables of one scope must have their shard keys
  equated (join ON or WHERE), else their matching rows may be elsewhere;
* **confinement**: a subquery over sharded tables must be correlated with an
  enclosing row on the shard key (it then reads only that row's shard), or
  be pruned by its own WHERE to the one shard the whole statement runs on; a
  subquery reading only global tables is the same on every shard;
* global (``__shard__ = "all"``) tables are complete on every shard; a table
  pinned to one shard (``__shard__ = "s2"``) exists only there.

Anything not proven this way raises :class:`~sqlalchemy_scale.CrossShardQueryError`
(see :mod:`.shapes`). What the merge of a multi-shard SELECT supports is
decided afterwards by :mod:`.planner`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table
from sqlalchemy.sql import operators
from sqlalchemy.sql.dml import Insert, Update, UpdateBase
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BooleanClauseList,
    ColumnClause,
    Grouping,
    Label,
    UnaryExpression,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import (
    CTE,
    Alias,
    AliasedReturnsRows,
    CompoundSelect,
    Exists,
    FromGrouping,
    Join,
    ScalarSelect,
    Select,
    TableClause,
    TableValuedAlias,
    Values,
)
from sqlalchemy.sql.util import find_tables
from sqlalchemy.sql.visitors import iterate

from .._sa import dml_multi_values, dml_values
from ..errors import ConfigurationError
from ._prune import KeyPlacer, pins
from ._scopes import Scope, deannotated, same_type_affinity, scopes_of, select_parts
from ._shard_set import ShardSet
from .planner import KNOWN_SCALARS
from .shapes import refuse
from .strategies import ShardId

__all__ = [
    "Proof",
    "exists_columns",
    "key_shard",
    "prove",
    "shards_for_statement",
    "statement_tables",
]

_UNKNOWN: Any = object()
_AGGREGATE_NAMES = frozenset({"count", "sum", "min", "max", "avg"})


def statement_tables(statement: Any) -> list[Table]:
    """The tables a statement reads or writes (including those in subqueries)."""
    seen: dict[Table, None] = {}
    for table in find_tables(statement, check_columns=True, include_crud=True):
        if isinstance(table, Table):
            # ORM statements hold annotated copies of the Table: key on the Table itself.
            seen.setdefault(deannotated(table), None)
    return list(seen)


@dataclass(eq=False)
class _Unit:
    """One FROM item of a scope: a table (or an alias of one), or a derived table."""

    source: Any  # the FROM item, deannotated: compared by identity
    kind: str  # "key", "all", "pinned", "rows" (a plain derived table over sharded rows)
    name: str
    key: str | None = None  # shard key column name ("key")
    shard: ShardId | None = None  # "pinned"
    shards: frozenset[ShardId] | None = None  # "rows": where its rows are


@dataclass
class _Found:
    """What one scope needs."""

    #: the scope's rows are sharded rows on these shards (None: not sharded)
    shards: frozenset[ShardId] | None = None
    #: every sharded row it reads lives on the enclosing row's shard
    local: bool = False
    #: the single shard everything must run on (pinned tables, pruned subqueries)
    only: set[ShardId] = field(default_factory=set)


@dataclass
class Proof:
    """The shards a statement runs on, and how its answer is assembled there."""

    shards: list[ShardId]
    #: ``select(exists(...))`` over several shards: the answer is the OR of the shards'
    exists: bool = False
    #: ``SELECT count(*) FROM (inner)``: count the merged rows of ``inner`` instead
    count_of: Any = None
    #: a write of a global table: every shard runs it, one copy's result is returned
    global_write: bool = False
    #: functions in subqueries run on several shards, to look up in pg_proc before running
    functions: set[str] = field(default_factory=set)


class _Prover:
    def __init__(self, shard_set: ShardSet, params: Mapping[str, Any], *, writing: bool) -> None:
        self.shard_set = shard_set
        self.placer = KeyPlacer(shard_set, params, writing=writing)
        self.all = frozenset(shard_set.shard_ids)
        #: functions in plain subqueries run on several shards: they must not be aggregates
        self.functions: set[str] = set()

    # -- units and keys ------------------------------------------------------------------

    def rule(self, table: Table) -> tuple[str, str | None]:
        rule = self.shard_set.rule_for(table)
        if rule is None:
            raise ConfigurationError(
                f"table {table.name!r} is not placed on the shards: give its model "
                "__shard_key__ = '<column>', or __shard__ = 'all' (reference data on every "
                "shard) or __shard__ = '<shard id>'"
            )
        return rule

    def table_unit(self, source: Any, table: Table) -> _Unit:
        kind, arg = self.rule(table)
        if kind == "key":
            return _Unit(source, "key", table.name, key=arg)
        if kind == "pinned":
            return _Unit(source, "pinned", table.name, shard=arg)
        return _Unit(source, "all", table.name)

    def units(
        self, scope: Scope, outer: list[_Unit], joins: list[Join]
    ) -> tuple[list[_Unit], list[_Found]]:
        units: list[_Unit] = []
        derived: list[_Found] = []
        derived_scopes = {id(c.original): c for c in scope.children if c.in_from}
        derived_scopes.update({id(c.statement): c for c in scope.children if c.in_from})
        used: set[int] = set()

        def walk(item: Any) -> None:
            item = deannotated(item)
            if isinstance(item, Join):
                joins.append(item)
                walk(item.left)
                walk(item.right)
                return
            if isinstance(item, FromGrouping):  # a nested join, in parentheses
                walk(item.element)
                return
            if isinstance(item, Table):
                units.append(self.table_unit(item, item))
                return
            if isinstance(item, Alias) and isinstance(item.element, Table):
                units.append(self.table_unit(item, deannotated(item.element)))
                return
            element = getattr(item, "element", None)
            while isinstance(element, AliasedReturnsRows) and not isinstance(
                element, TableValuedAlias
            ):
                element = element.element  # the ORM wraps subqueries in aliases
            child = derived_scopes.get(id(element)) if element is not None else None
            if child is None and isinstance(element, Select | CompoundSelect):
                remaining = [c for c in scope.children if c.in_from and id(c) not in used]
                child = remaining[0] if len(remaining) == 1 else None
            if child is not None:
                used.add(id(child))
                found = self.scope(child, outer)
                derived.append(found)
                if found.local:
                    refuse("unknown", f"the LATERAL subquery {_describe(item)} over sharded tables")
                if found.shards is not None and not found.local:
                    if not _is_plain(child.statement):
                        if len(found.shards) <= 1:
                            found.only.update(found.shards)
                            units.append(_Unit(item, "rows", _describe(item), shards=found.shards))
                            return
                        refuse(
                            "derived_table",
                            f"the FROM subquery {_describe(item)} over sharded tables "
                            "aggregates, groups, limits or is DISTINCT (the ORM makes one for a "
                            "joinedload() of a collection with LIMIT: use selectinload())",
                        )
                    self.functions |= _unknown_functions(child.statement)
                    units.append(_Unit(item, "rows", _describe(item), shards=found.shards))
                return
            if isinstance(item, TableValuedAlias | Values | TableClause | FunctionElement) and (
                not any(isinstance(t, Table) for t in find_tables(item, check_columns=True))
            ):
                units.append(_Unit(item, "all", _describe(item)))
                return
            refuse("unknown", f"the FROM item {_describe(item)} is not one the planner can place")

        for item in scope.froms:
            walk(item)
        return units, derived

    # -- one scope ---------------------------------------------------------------------

    def scope(self, scope: Scope, outer: list[_Unit]) -> _Found:
        if scope.is_compound:
            return self.compound(scope, outer)
        joins: list[Join] = []
        units, derived = self.units(scope, outer, joins)
        found = _Found()
        for sub in derived:
            found.only |= sub.only
        for unit in units:
            if unit.kind == "pinned":
                assert unit.shard is not None
                found.only.add(unit.shard)
        self.check_outer_joins(joins, units)
        sharded = [u for u in units if u.kind in ("key", "rows")]
        where = getattr(scope.statement, "whereclause", None)
        if sharded:
            self.colocate(scope, sharded, outer, joins, where, found)
        inner_outer = outer + [u for u in units if u.kind == "key"]
        semi_joins = _in_subqueries(scope.statement) if sharded else {}
        for child in scope.children:
            if child.in_from:
                continue
            sub = self.scope(child, inner_outer)
            found.only |= sub.only
            if sub.shards is None or sub.local:
                continue
            left = semi_joins.get(id(child.original))
            if left is not None and self.is_key_semi_join(left, child, inner_outer):
                continue
            if len(sub.shards) <= 1:
                found.only |= set(sub.shards)
                continue
            tables = ", ".join(sorted({t.name for t in statement_tables(child.statement)}))
            if not sharded:
                refuse(
                    "global_reads_sharded",
                    f"a statement on global tables only reads the sharded table(s) {tables} "
                    "through a subquery",
                )
            refuse(
                "uncorrelated_subquery",
                f"the subquery over {tables} is not correlated with the outer row on the shard key",
            )
        if len(found.only) > 1:
            refuse(
                "pinned_table_join",
                f"the statement needs shards {sorted(found.only)} at once (tables placed on "
                "one shard, or subqueries pruned to different shards)",
            )
        return found

    def is_key_semi_join(self, left: Any, child: Scope, row_units: list[_Unit]) -> bool:
        """``outer.key IN (SELECT inner.key ...)``: both keys are placed alike, so the inner
        rows that can match an outer row live on its shard (also for NOT IN: stored keys are
        never NULL)."""
        if not isinstance(left, ColumnClause) or left.table is None:
            return False
        source = id(deannotated(left.table))
        if not any(id(u.source) == source and u.key == left.name for u in row_units):
            return False
        statement = child.statement
        columns = list(getattr(statement, "selected_columns", ()))
        if not isinstance(statement, Select) or len(columns) != 1:
            return False
        right = columns[0].element if isinstance(columns[0], Label) else columns[0]
        if not isinstance(right, ColumnClause) or right.table is None:
            return False
        if not same_type_affinity(left, right):
            return False
        joins: list[Join] = []
        units, _ = self.units(child, [], joins)
        if any(j.isouter or j.full for j in joins):
            return False  # a NULL-extended key would make NOT IN differ
        inner = id(deannotated(right.table))
        if not any(
            u.kind == "key" and id(u.source) == inner and u.key == right.name for u in units
        ):
            return False
        parts = select_parts(statement)
        if parts.limit is not None or parts.offset is not None or parts.fetch is not None:
            return False
        # Groups must not span shards: grouped by the key itself (HAVING is then per key).
        return not parts.group_by or any(
            isinstance(g, ColumnClause)
            and g.name == right.name
            and g.table is not None
            and id(deannotated(g.table)) == inner
            for g in parts.group_by
        )

    def compound(self, scope: Scope, outer: list[_Unit]) -> _Found:
        found = _Found()
        for member in scope.children:
            sub = self.scope(member, outer)
            found.only |= sub.only
            if sub.shards is None or sub.local:
                found.local = found.local or sub.local
                continue
            if len(sub.shards) > 1:
                refuse("compound", "a UNION/INTERSECT/EXCEPT member reads rows of several shards")
            found.only |= set(sub.shards)
        return found

    def check_outer_joins(self, joins: list[Join], units: list[_Unit]) -> None:
        def sharded_in(side: Any) -> bool:
            return any(u.kind in ("key", "rows") and _contains(side, u.source) for u in units)

        for join in joins:
            left, right = sharded_in(join.left), sharded_in(join.right)
            if join.full and left != right:
                refuse("global_outer_join", f"a FULL JOIN of {_describe(join)} with a global table")
            if join.isouter and right and not left:
                refuse(
                    "global_outer_join",
                    f"the outer join {_describe(join)} keeps unmatched rows of a global table",
                )

    def colocate(
        self,
        scope: Scope,
        sharded: list[_Unit],
        outer: list[_Unit],
        joins: list[Join],
        where: Any,
        found: _Found,
    ) -> None:
        mine = {id(u.source): u for u in sharded if u.kind == "key"}
        theirs = {id(u.source): u for u in outer if u.kind == "key"}
        parent = {id(u): id(u) for u in sharded}
        local: set[int] = set()

        def root(i: int) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        def key_unit(element: Any) -> tuple[_Unit, bool] | None:
            if isinstance(element, Label):
                element = element.element
            if not isinstance(element, ColumnClause) or element.table is None:
                return None
            source = id(deannotated(element.table))
            unit = mine.get(source)
            if unit is not None and element.name == unit.key:
                return unit, True
            unit = theirs.get(source)
            if unit is not None and element.name == unit.key:
                return unit, False
            return None

        def inherited_row(a: Any, b: Any) -> tuple[_Unit, _Unit] | None:
            """Joined-table inheritance: a subclass table without the key column joined to
            its base on the primary key (the ORM writes both rows to the instance's shard)."""
            units = []
            for element in (a, b):
                if not isinstance(element, ColumnClause) or not element.primary_key:
                    return None
                unit = (
                    mine.get(id(deannotated(element.table))) if element.table is not None else None
                )
                if unit is None:
                    return None
                units.append(unit)
            first, second = units
            if first is second:
                return None
            # The subclass table's primary key references the base table's.
            if _lacks_key(first) and _references(a, b):
                return first, second
            if _lacks_key(second) and _references(b, a):
                return first, second
            return None

        conditions = [where, *(j.onclause for j in joins)]
        for condition in conditions:
            for term in _conjuncts(condition):
                if not (isinstance(term, BinaryExpression) and term.operator is operators.eq):
                    continue
                same_row = inherited_row(term.left, term.right)
                if same_row is not None:
                    parent[root(id(same_row[0]))] = root(id(same_row[1]))
                    continue
                a, b = key_unit(term.left), key_unit(term.right)
                if a is None or b is None or not same_type_affinity(term.left, term.right):
                    continue  # keys of different types are placed differently ("5" vs 5)
                if a[1] and b[1]:
                    parent[root(id(a[0]))] = root(id(b[0]))
                elif a[1] or b[1]:
                    local.add(id(a[0] if a[1] else b[0]))
        components: dict[int, list[_Unit]] = {}
        for unit in sharded:
            components.setdefault(root(id(unit)), []).append(unit)
        free: list[frozenset[ShardId]] = []
        any_local = False
        for members in components.values():
            if any(id(u) in local for u in members):
                any_local = True
                continue
            free.append(self.prune(members, where))
        if not free:
            found.local = any_local
            found.shards = frozenset()
            return
        if len(free) == 1 and not any_local:
            found.shards = free[0]
            return
        names = ", ".join(u.name for u in sharded)
        singles = set().union(*free)
        if all(len(s) <= 1 for s in free) and len(singles) <= 1:
            found.only |= singles
            found.local = any_local
            found.shards = frozenset(singles)
            return
        refuse(
            "non_colocated_join", f"the tables {names} are joined without equating their shard keys"
        )

    def prune(self, members: list[_Unit], where: Any) -> frozenset[ShardId]:
        rows = [u for u in members if u.kind == "rows"]
        if rows:
            shards = self.all
            for unit in rows:
                assert unit.shards is not None
                shards &= unit.shards
            return shards
        keyed = {id(u.source): u for u in members}

        def key_of(element: Any) -> tuple[Table, str] | None:
            if not isinstance(element, ColumnClause) or element.table is None:
                return None
            unit = keyed.get(id(deannotated(element.table)))
            if unit is None or element.name != unit.key:
                return None
            table: Any = unit.source.element if isinstance(unit.source, Alias) else unit.source
            return table, element.name

        found = pins(where, key_of, self.placer) if where is not None else None
        return self.all if found is None else frozenset(found)


def _in_subqueries(statement: Any) -> dict[int, Any]:
    """``x IN (SELECT ...)`` and ``x NOT IN (SELECT ...)`` in the statement's WHERE: the
    select (by identity) -> ``x``."""
    where = getattr(statement, "whereclause", None)
    found: dict[int, Any] = {}
    if where is None:
        return found
    for node in iterate(where):
        if (
            isinstance(node, BinaryExpression)
            and node.operator in (operators.in_op, operators.not_in_op)
            and isinstance(node.right, ScalarSelect)
        ):
            found[id(node.right.element)] = node.left
    return found


def _conjuncts(clause: Any) -> list[Any]:
    if clause is None:
        return []
    if isinstance(clause, Grouping):
        return _conjuncts(clause.element)
    if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
        return [t for c in clause.clauses for t in _conjuncts(c)]
    return [clause]


def _lacks_key(unit: _Unit) -> bool:
    table = unit.source.element if isinstance(unit.source, Alias) else unit.source
    return unit.key is not None and unit.key not in table.c


def _references(child: Any, parent: Any) -> bool:
    """Whether column ``child`` has a foreign key to column ``parent`` (through aliases)."""
    parents = {id(deannotated(c)) for c in parent.base_columns}
    return any(
        id(deannotated(fk.column)) in parents
        for base in child.base_columns
        for fk in getattr(base, "foreign_keys", ())
    )


def _contains(side: Any, source: Any) -> bool:
    if deannotated(side) is source:
        return True
    if isinstance(side, Join):
        return _contains(side.left, source) or _contains(side.right, source)
    return False


def _describe(item: Any) -> str:
    name = getattr(item, "name", None)
    if isinstance(item, Join):
        return f"{_describe(item.left)} JOIN {_describe(item.right)}"
    return str(name) if name else type(item).__name__


def _is_plain(statement: Any) -> bool:
    """A SELECT that only filters and projects: its rows over shards are the union of each
    shard's rows."""
    if not isinstance(statement, Select) or not select_parts(statement).only_filters:
        return False
    for column in statement.selected_columns:
        for node in iterate(column):
            if isinstance(node, FunctionElement) and str(getattr(node, "name", "")).lower() in (
                _AGGREGATE_NAMES
            ):
                return False
            if type(node).__name__ in ("Over", "WithinGroup", "FunctionFilter"):
                return False
    return True


def _unknown_functions(statement: Any) -> set[str]:
    """Names of functions selected by ``statement`` that the planner does not know not to be
    aggregates (a user-defined aggregate would make each shard return its own row)."""
    names: set[str] = set()
    for column in getattr(statement, "selected_columns", ()):
        for node in iterate(column):
            name = (
                str(getattr(node, "name", "")).lower() if isinstance(node, FunctionElement) else ""
            )
            if name and name not in _AGGREGATE_NAMES and name not in KNOWN_SCALARS:
                names.add(name)
    return names


def exists_columns(statement: Any) -> list[bool] | None:
    """For ``SELECT EXISTS (...), NOT EXISTS (...)`` with nothing else: per column, whether
    it is negated; None for any other statement."""
    if not isinstance(statement, Select) or statement.whereclause is not None:
        return None
    negated: list[bool] = []
    for column in statement.selected_columns:
        element: Any = column.element if isinstance(column, Label) else column
        inverted = isinstance(element, UnaryExpression) and element.operator is operators.inv
        if inverted:
            element = element.element
            while isinstance(element, Grouping):
                element = element.element
        if not isinstance(element, Exists):
            return None
        negated.append(inverted)
    return negated or None


def _plain_exists(scope: Scope) -> bool:
    """``SELECT EXISTS (...)[, NOT EXISTS (...)]`` with nothing else."""
    return not scope.froms and exists_columns(scope.statement) is not None


def _count_of(scope: Scope) -> Scope | None:
    """``SELECT count(*) FROM (inner) AS anon`` (``Query.count()``): the inner scope."""
    stmt = scope.statement
    derived = [c for c in scope.children if c.in_from]
    if not isinstance(stmt, Select) or len(scope.froms) != 1 or len(scope.children) != 1:
        return None
    columns = list(stmt.selected_columns)
    if len(derived) != 1 or len(columns) != 1 or stmt.whereclause is not None:
        return None
    parts = select_parts(stmt)
    if not parts.only_filters or parts.order_by:
        return None
    column = columns[0].element if isinstance(columns[0], Label) else columns[0]
    if not (isinstance(column, FunctionElement) and str(column.name).lower() == "count"):
        return None
    args = list(column.clauses)
    if args and str(args[0]) != "*":
        return None
    return derived[0]


def prove(
    statement: Any,
    shard_set: ShardSet,
    params: Mapping[str, Any] | None,
    *,
    shard_key: Any = _UNKNOWN,
    rows_on: list[ShardId] | None = None,
    given: Collection[str] = (),
) -> Proof:
    """The shards ``statement`` must run on, in ShardSet order, and how its answer is made.

    Raises :class:`~sqlalchemy_scale.CrossShardQueryError` for a statement whose answer
    over those shards is not proven exact. ``shard_key`` is the
    ``execution_options(shard_key=...)`` value, if any: it places statements on sharded
    tables only (global and pinned tables keep their rule) and is trusted as given.
    ``rows_on`` is, for an INSERT of sharded rows, the shard its rows were placed on by
    their keys: its subqueries (in VALUES, ON CONFLICT) must read only that shard.
    ``given`` names the columns every parameter set of an executemany gives a value.
    """
    if not isinstance(statement, Select | CompoundSelect | UpdateBase):
        refuse("not_a_select", f"a {type(statement).__name__} names no table the planner can place")
    writing = isinstance(statement, UpdateBase)
    tables = statement_tables(statement)
    prover = _Prover(shard_set, params or {}, writing=writing)
    rules = [prover.rule(t) for t in tables]
    if shard_key is not _UNKNOWN:
        owner = _key_owner(tables, rules, shard_set, shard_key)
        if owner is not None:
            return Proof([owner])
    if (
        isinstance(statement, Insert)
        and statement.select is not None
        and any(r[0] == "key" for r in rules)
    ):
        refuse("not_a_select", f"INSERT ... SELECT into {statement.table}")
    _refuse_writing_ctes(statement)
    top = scopes_of(statement, sorted({*(params or {}), *given}) if writing else None)
    if rows_on is not None:
        _confine_insert(prover, top, rows_on)
        return Proof(rows_on)
    exists = _plain_exists(top)
    inner = _count_of(top)
    if inner is not None:
        sub = prover.scope(inner, [])
        if (
            sub.shards is not None
            and not sub.local
            and len(sub.shards) > 1
            and not _is_plain(inner.statement)
        ):
            shards = sorted(sub.shards, key=shard_set.shard_ids.index)
            return Proof(shards, count_of=inner.original)
    if exists:
        found = _Found()
        for child in top.children:
            sub = prover.scope(child, [])
            found.only |= sub.only
            if sub.shards is not None and not sub.local:
                if len(sub.shards) > 1 and not _is_plain(child.statement):
                    refuse(
                        "derived_table",
                        "the EXISTS subquery over sharded tables aggregates, groups or limits",
                    )
                prover.functions |= _unknown_functions(child.statement)
                found.shards = (found.shards or frozenset()) | sub.shards
    else:
        found = prover.scope(top, [])
        if isinstance(statement, UpdateBase) and found.shards is not None and not found.local:
            target = deannotated(statement.table)
            if isinstance(target, Table) and prover.rule(target)[0] == "all":
                # UPDATE global ... FROM sharded / DELETE ... USING: each shard would change
                # its copy by its own part of the sharded rows, and the copies would differ.
                refuse(
                    "global_reads_sharded",
                    f"a write of the global table {target.name} joined with sharded rows",
                )
    final = _final(found, shard_set, writing, rules, exists=exists)
    if final.get("global_write"):
        _refuse_differing_copies(statement)
        _refuse_differing_defaults(statement, {*(params or {}), *given})
    elif len(final["shards"]) > 1:
        _refuse_copies_picking_rows(top, prover)
    return Proof(**final, functions=prover.functions)


def _refuse_copies_picking_rows(top: Scope, prover: _Prover) -> None:
    """A subquery over global tables only, run on several shards, must give every shard the
    same rows: not when it picks them by LIMIT/OFFSET/FETCH/DISTINCT ON in physical order."""
    pending = list(top.children)
    while pending:
        scope = pending.pop()
        pending.extend(scope.children)
        tables = statement_tables(scope.statement)
        if (
            isinstance(scope.statement, Select)
            and tables
            and all(prover.rule(t)[0] == "all" for t in tables)
            and _picks_by_physical_order(scope.statement)
        ):
            refuse(
                "global_rows_by_limit",
                "a subquery over global tables with LIMIT, OFFSET, FETCH or DISTINCT ON not "
                "ordered by the primary key, run on several shards",
                remedy="order the subquery by the tables' primary keys, or pin the query",
            )


def _picks_by_physical_order(select: Select[Any]) -> bool:
    """LIMIT, OFFSET, FETCH or DISTINCT ON whose rows are not fixed by an ORDER BY that
    covers the primary key of every table it reads (which rows then depends on storage)."""
    parts = select_parts(select)
    if parts.distinct_on:
        return True
    if parts.limit is None and parts.offset is None and parts.fetch is None:
        return False
    ordered: set[int] = set()
    for term in parts.order_by:
        while isinstance(term, UnaryExpression) and term.modifier is not None:
            term = term.element
        if isinstance(term, ColumnClause):
            ordered.add(id(deannotated(term)))
    froms = [deannotated(f) for f in select.get_final_froms()]
    return not all(
        isinstance(f, Table)
        and f.primary_key
        and all(id(c) in ordered for c in f.primary_key.columns)
        for f in froms
    )


#: Functions whose result is the same on every shard's copy of a global table (the same
#: arguments give the same value): a bulk write of a global table may call only these.
_SAME_ON_EVERY_COPY = (KNOWN_SCALARS | _AGGREGATE_NAMES) - {
    "now",
    "inet_server_port",
    "pg_is_in_recovery",
}


def _refuse_differing_copies(statement: Any) -> None:
    """A write of a global table runs once per shard: a function whose value differs between
    the runs (``random()``, ``now()``, ``clock_timestamp()``, ``nextval()``, an unknown one)
    would leave the copies different; so would a subquery that picks rows by LIMIT, OFFSET,
    FETCH or DISTINCT ON (each copy stores its rows in its own physical order)."""
    for node in iterate(statement):
        if isinstance(node, Select) and _picks_by_physical_order(node):
            refuse(
                "global_write_per_run",
                f"a subquery with LIMIT, OFFSET, FETCH or DISTINCT ON in a write of the "
                f"global table {statement.table.name}",
                remedy="select the rows first and write them by key",
            )
        if isinstance(node, FunctionElement):
            name = str(getattr(node, "name", "")).lower()
            if name not in _SAME_ON_EVERY_COPY:
                refuse(
                    "global_write_per_run",
                    f"{name or type(node).__name__}() in a write of the global table "
                    f"{statement.table.name}, which may give each run a different value",
                    remedy="compute the value in Python and pass it as a parameter",
                )


def _refuse_differing_defaults(statement: Any, params: Collection[str]) -> None:
    """An INSERT (UPDATE) of a global table runs once per shard: a column it leaves to a
    default (``onupdate``) that is computed per run (a Python callable or SQL expression, a
    server default that is not a plain literal, a sequence or identity) would give each
    copy its own value."""
    table = deannotated(statement.table)
    if not isinstance(statement, Insert | Update) or not isinstance(table, Table):
        return
    values = dml_values(statement) or {}
    given = {str(getattr(key, "key", key)) for key in values} | set(params)
    rows = dml_multi_values(statement)  # VALUES (...), (...): what every row gives
    if rows:
        given |= set.intersection(*({str(getattr(k, "key", k)) for k in row} for row in rows))
    for column in table.columns:
        if column.key in given or column.name in given:
            continue
        if isinstance(statement, Insert):
            default, server = column.default, column.server_default
            computed = (
                (default is not None and not getattr(default, "is_scalar", False))
                or (server is not None and not isinstance(getattr(server, "arg", None), str))
                or column is table.autoincrement_column
            )
        else:
            default, server = column.onupdate, column.server_onupdate
            computed = (default is not None and not getattr(default, "is_scalar", False)) or (
                server is not None
            )
        if computed:
            refuse(
                "global_write_per_run",
                f"{type(statement).__name__.upper()} of the global table {table.name} leaves "
                f"{column.name} to its default, which may give each run a different value",
                remedy=f"give {column.name} a value",
            )


def _refuse_writing_ctes(statement: Any) -> None:
    """A data-modifying WITH (``INSERT``/``UPDATE``/``DELETE ... RETURNING`` as a CTE) writes
    rows the proof does not place: it would run on the shards the rest of the statement
    needs, wherever its own rows live."""
    for node in iterate(statement):
        if isinstance(node, CTE) and isinstance(node.element, UpdateBase):
            kind = type(node.element).__name__.upper()
            refuse("writing_cte", f"the data-modifying WITH {node.name} ({kind} in a CTE)")


def key_shard(statement: Any, shard_set: ShardSet, shard_key: Any) -> ShardId | None:
    """The shard owning ``shard_key`` for the first sharded table ``statement`` names (the
    ``execution_options(shard_key=...)`` rule); None when it names no sharded table, where
    the option has nothing to place. A value no strategy can place raises ShardKeyError."""
    if not isinstance(statement, Select | CompoundSelect | UpdateBase):
        return None
    tables = statement_tables(statement)
    prover = _Prover(shard_set, {}, writing=isinstance(statement, UpdateBase))
    return _key_owner(tables, [prover.rule(t) for t in tables], shard_set, shard_key)


def _key_owner(
    tables: list[Table],
    rules: list[tuple[str, str | None]],
    shard_set: ShardSet,
    shard_key: Any,
) -> ShardId | None:
    keyed = [(t, r) for t, r in zip(tables, rules, strict=True) if r[0] == "key"]
    if not keyed:
        return None
    table, (_, column) = keyed[0]
    assert column is not None
    return shard_set.shard_for(
        shard_key, model=table.name, column=column, key_column=table.c[column]
    )


def _confine_insert(prover: _Prover, top: Scope, rows_on: list[ShardId]) -> None:
    table = top.statement.table
    target = prover.table_unit(deannotated(table), deannotated(table))
    for child in top.children:
        sub = prover.scope(child, [target])
        if sub.local or (
            (sub.shards is None or set(sub.shards) <= set(rows_on)) and sub.only <= set(rows_on)
        ):
            continue
        tables = ", ".join(sorted({t.name for t in statement_tables(child.statement)}))
        refuse(
            "uncorrelated_subquery",
            f"the subquery over {tables} in an INSERT into {table.name} on shard "
            f"{rows_on[0]!r} reads other shards",
        )


def _final(
    found: _Found,
    shard_set: ShardSet,
    writing: bool,
    rules: list[tuple[str, str | None]],
    *,
    exists: bool,
) -> dict[str, Any]:
    order = shard_set.shard_ids.index
    if found.shards is not None and not found.local:
        if not found.shards:
            # Pruned to nothing (key = 1 AND key = 2, a key no shard owns): no shard has
            # rows; one answers (the shard of a pinned table if any).
            return {"shards": sorted(found.only) or [shard_set.home_shard]}
        if found.only and set(found.shards) != found.only:
            refuse(
                "pinned_table_join",
                f"rows on shards {sorted(found.shards, key=order)} are read with a table or "
                f"subquery on shard {sorted(found.only)[0]!r} only",
            )
        return {
            "shards": sorted(found.shards, key=order),
            "exists": exists and len(found.shards) > 1,
        }
    if found.only:
        if writing and any(r[0] == "all" for r in rules):
            refuse("global_reads_sharded", "a write of a global table reads a one-shard table")
        return {"shards": sorted(found.only)}
    if writing and any(r[0] == "all" for r in rules):
        return {"shards": list(shard_set.shard_ids), "global_write": True}
    return {"shards": [shard_set.home_shard]}


def shards_for_statement(
    statement: Any,
    shard_set: ShardSet,
    params: Mapping[str, Any] | None,
    *,
    shard_key: Any = _UNKNOWN,
) -> list[ShardId]:
    """The shard ids ``statement`` must run on, in ShardSet order (see :func:`prove`)."""
    return prove(statement, shard_set, params, shard_key=shard_key).shards
