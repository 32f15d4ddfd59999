"""Merging partial results from several shards into what one database would return.

Pure functions on rows (tuples or :class:`~sqlalchemy.engine.Row` objects),
no SQL: :mod:`sqlalchemy_scale.sharding.fanout` decides what to push down to
each shard and calls these to combine the answers.

* Ordered rows: every shard returns its rows already sorted by the ORDER BY
  (with ``LIMIT limit + offset`` pushed down); :func:`merge_ordered` does a
  k-way merge (:func:`heapq.merge`) and then applies OFFSET and LIMIT once.
* Aggregates: every shard returns one partial row per group;
  :func:`merge_aggregates` combines them (``count`` and ``sum`` add up, ``min``
  and ``max`` take the extreme, ``avg`` was pushed down as ``sum`` and
  ``count`` and is divided here).

Ordering follows PostgreSQL: NULLs sort as larger than every value, so they
come last in ascending order and first in descending order unless
``NULLS FIRST``/``NULLS LAST`` says otherwise. Float and numeric NaN
(``float('nan')``, ``Decimal('NaN')``) is equal to itself and greater than
every number, ``Infinity`` included (PostgreSQL's ``float8_cmp`` and
``cmp_numerics``): it sorts last in ascending order, is one group, is the
``max()``, and ``min()`` skips it unless every value is NaN. Numeric sums are
exact (PostgreSQL's ``numeric`` has no precision limit) and ``Infinity +
-Infinity`` is NaN rather than an error. Text is compared by code point,
which is PostgreSQL's order only under the ``C`` collation (see
:mod:`sqlalchemy_scale.sharding.planner`, which refuses other cases).
"""

from __future__ import annotations

import decimal
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, TypeVar

__all__ = [
    "AggregateKind",
    "SortKey",
    "apply_limit",
    "comparable",
    "group_key",
    "is_nan",
    "merge_aggregates",
    "merge_ordered",
    "numeric_divide",
    "sort_key",
    "sort_rows",
]

R = TypeVar("R")

AggregateKind = Literal["count", "sum", "min", "max", "avg"]


@dataclass(frozen=True)
class SortKey:
    """One ORDER BY term: how to read it from a row, its direction and where NULLs go.

    ``nulls_first=None`` means PostgreSQL's default: NULLs first when descending.
    """

    getter: Callable[[Any], Any]
    descending: bool = False
    nulls_first: bool | None = None

    @property
    def nulls_come_first(self) -> bool:
        return self.descending if self.nulls_first is None else self.nulls_first


class _Descending:
    """Wraps a value so that comparisons are reversed (for DESC terms)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Descending) -> bool:
        return bool(other.value < self.value)

    def __gt__(self, other: _Descending) -> bool:
        return bool(other.value > self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and bool(self.value == other.value)

    def __hash__(self) -> int:
        return hash(self.value)


# Exact numeric arithmetic with PostgreSQL's answers instead of errors (inf + -inf is NaN).
_EXACT = decimal.Context(
    prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[]
)
_DIVIDE = decimal.Context(prec=28, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN, traps=[])


def is_nan(value: Any) -> bool:
    """A float or numeric NaN (which PostgreSQL sorts above every number)."""
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, decimal.Decimal) and value.is_nan()


def comparable(value: Any) -> tuple[int, Any]:
    """``value`` as PostgreSQL orders it (not None): NaN after every number, equal to NaN."""
    if is_nan(value):
        return (1, 0)
    return (0, value)


def sort_key(keys: Sequence[SortKey]) -> Callable[[Any], tuple[Any, ...]]:
    """A Python sort key for rows that reproduces the ORDER BY ``keys``.

    Each term becomes ``(null_rank, value)``: the rank puts NULLs before or
    after every value, and is equal for two NULLs, so ``None`` is never compared;
    the value is :func:`comparable` (NaN above every number).
    """
    specs = [(k.getter, k.descending, k.nulls_come_first) for k in keys]

    def key(row: Any) -> tuple[Any, ...]:
        out: list[Any] = []
        for getter, descending, nulls_first in specs:
            value = getter(row)
            if value is None:
                out.append((0 if nulls_first else 2, None))
            else:
                ranked = comparable(value)
                out.append((1, _Descending(ranked) if descending else ranked))
        return tuple(out)

    return key


def apply_limit(rows: Iterable[R], limit: int | None, offset: int | None) -> list[R]:
    """Skip ``offset`` rows and keep at most ``limit`` (None: no bound)."""
    start = offset or 0
    stop = None if limit is None else start + limit
    return list(itertools.islice(rows, start, stop))


def merge_ordered(
    streams: Sequence[Iterable[R]],
    keys: Sequence[SortKey],
    *,
    limit: int | None = None,
    offset: int | None = None,
) -> list[tuple[int, R]]:
    """K-way merge of streams each sorted by ``keys``; returns ``(stream_index, row)`` pairs.

    Without keys the streams are concatenated in order. OFFSET and LIMIT apply
    to the merged sequence, so each stream needs at most ``limit + offset`` rows.
    Ties keep stream order (the merge is stable).
    """
    tagged: list[Iterator[tuple[int, R]]] = [
        zip(itertools.repeat(i), stream, strict=False) for i, stream in enumerate(streams)
    ]
    if keys:
        row_key = sort_key(keys)
        merged: Iterable[tuple[int, R]] = heapq.merge(*tagged, key=lambda item: row_key(item[1]))
    else:
        merged = itertools.chain.from_iterable(tagged)
    return apply_limit(merged, limit, offset)


def sort_rows(rows: Iterable[R], keys: Sequence[SortKey]) -> list[R]:
    """Rows sorted as PostgreSQL would sort them by ``keys`` (stable)."""
    return sorted(rows, key=sort_key(keys))


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return _EXACT.add(a, b)
    return a + b


def _min(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return b if comparable(b) < comparable(a) else a


def _max(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return b if comparable(b) > comparable(a) else a


def _average(total: Any, count: Any) -> Any:
    if not count:
        return None
    if isinstance(total, int):
        # PostgreSQL's avg() of integers is numeric.
        return numeric_divide(Decimal(total), int(count))
    if isinstance(total, Decimal):
        return numeric_divide(total, int(count))
    return total / count


def _weight_and_first_group(value: Decimal) -> tuple[int, int]:
    """PostgreSQL's numeric layout (base 10000): the weight of the first non-zero group of
    four decimal digits, and that group's value; (0, 0) for zero."""
    if not value:
        return 0, 0
    weight = value.adjusted() // 4
    first = int(abs(value).scaleb(-4 * weight, _EXACT)) % 10000
    return weight, first


def numeric_divide(total: Decimal, count: int) -> Decimal:
    """``total / count`` as PostgreSQL's ``numeric_div`` computes it for ``avg()``: the
    result scale of ``select_div_scale`` (at least 16 significant digits, at least the
    dividend's scale) and rounding half away from zero."""
    if not total.is_finite():
        return _DIVIDE.divide(total, Decimal(count))  # NaN stays NaN, Infinity stays Infinity
    divisor = Decimal(count)
    weight1, first1 = _weight_and_first_group(total)
    weight2, first2 = _weight_and_first_group(divisor)
    quotient_weight = weight1 - weight2 - (1 if first1 <= first2 else 0)
    scale = max(16 - quotient_weight * 4, -min(total.as_tuple().exponent, 0), 0)  # type: ignore[operator]
    scale = min(scale, 1000)
    digits = max(total.adjusted() - divisor.adjusted() + 2, 1) + scale + 2
    exact = decimal.Context(prec=digits, rounding=decimal.ROUND_DOWN, traps=[])
    quotient = exact.divide(total, divisor)
    return quotient.quantize(
        Decimal(1).scaleb(-scale), rounding=decimal.ROUND_HALF_UP, context=_EXACT
    )


def group_key(value: Any) -> Any:
    """A hashable key under which PostgreSQL puts ``value`` in the same group (all NaNs
    together; arrays by their elements, jsonb objects by their items)."""
    if is_nan(value):
        return _NAN
    if isinstance(value, list):
        return tuple(group_key(v) for v in value)
    if isinstance(value, dict):  # jsonb: equal when the same keys have equal values
        return frozenset((k, group_key(v)) for k, v in value.items())
    return value


class _NaN:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NaN"


_NAN = _NaN()


def merge_aggregates(
    partials: Iterable[Sequence[Any]],
    group_width: int,
    kinds: Sequence[AggregateKind],
    *,
    grouped: bool,
) -> list[tuple[Any, ...]]:
    """Combine per-shard partial aggregate rows into final rows.

    Each partial row is ``group_width`` group-by values followed by the partial
    columns of each aggregate in ``kinds`` (``avg`` as sum then count). Returns
    one row per group: the group values, then one final value per aggregate.
    Without GROUP BY (``grouped=False``) there is exactly one row, even when no
    shard had any row (``count`` is then 0 and the others NULL, as in SQL).
    """
    groups: dict[tuple[Any, ...], list[Any]] = {}
    values_of: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for row in partials:
        group = tuple(group_key(v) for v in row[:group_width])
        pos = group_width
        current = groups.get(group)
        if current is None:
            current = groups[group] = [None] * len(kinds)
            values_of[group] = tuple(row[:group_width])
            fresh = True
        else:
            fresh = False
        for i, kind in enumerate(kinds):
            if kind == "avg":
                value: Any = (row[pos], row[pos + 1])
                pos += 2
                if fresh:
                    current[i] = value
                else:
                    prev = current[i]
                    current[i] = (_add(prev[0], value[0]), _add(prev[1], value[1]))
                continue
            value = row[pos]
            pos += 1
            if fresh:
                current[i] = value
            elif kind in ("count", "sum"):
                current[i] = _add(current[i], value)
            elif kind == "min":
                current[i] = _min(current[i], value)
            else:
                current[i] = _max(current[i], value)
    if not grouped and not groups:
        groups[()] = [0 if kind == "count" else None for kind in kinds]
    out: list[tuple[Any, ...]] = []
    for group, values in groups.items():
        final = [
            _average(*value) if kind == "avg" and value is not None else value
            for kind, value in zip(kinds, values, strict=True)
        ]
        out.append((*values_of.get(group, group), *final))
    return out
