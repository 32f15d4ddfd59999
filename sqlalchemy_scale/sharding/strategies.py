"""Sharding strategies: which shard owns a shard key value.

A strategy is anything callable as ``strategy(value, shard_ids) -> shard_id``:
a one-method :class:`ShardingStrategy` protocol, so a plain function is a
valid strategy. ``shard_ids`` is the :class:`~sqlalchemy_scale.ShardSet`'s
ordered list of shard ids. A strategy that cannot place a value returns
``None`` (or raises :class:`KeyError`/:class:`ValueError`); the ShardSet turns
that into a :class:`~sqlalchemy_scale.ShardKeyError` naming the model, the
column and the value.

Every mapping here is stable across processes, machines and Python versions:
nothing uses Python's :func:`hash` (salted per process for ``str``). Values
are first encoded canonically (:func:`canonical_bytes`) and hashed with
BLAKE2b (:func:`stable_hash64`).

Which one to use:

* :class:`HashSharding`: even spread, but changing the number of shards moves
  about ``N/(N+1)`` of all keys. Use it when the shard count never changes.
* :class:`JumpHashSharding`: even spread, and going from N to N+1 shards moves
  only about ``1/(N+1)`` of the keys (Lamping & Veach, 2014). The default
  choice when shards may be added (at the end only).
* :class:`RangeSharding`: ordered ranges of keys; range scans stay on one
  shard, but hot ranges make hot shards.
* :class:`DirectorySharding`: an explicit key -> shard table; any placement,
  single keys can be moved (:meth:`DirectorySharding.move`), at the cost of
  a lookup (cached) and of keeping the directory itself available.
"""

from __future__ import annotations

import bisect
import datetime
import decimal
import hashlib
import itertools
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sqlalchemy import Column, MetaData, String, Table, create_engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import URL, Engine

from ..errors import ConfigurationError
from ._two_phase import commit_prepared

if TYPE_CHECKING:
    from ._shard_set import ShardSet

__all__ = [
    "DirectorySharding",
    "HashSharding",
    "JumpHashSharding",
    "RangeSharding",
    "ShardId",
    "ShardingStrategy",
    "canonical_bytes",
    "jump_hash",
    "stable_hash64",
]

ShardId = str

_MASK64 = (1 << 64) - 1


@runtime_checkable
class ShardingStrategy(Protocol):
    """Return the id of the shard that owns ``value`` among ``shard_ids``, or None."""

    def __call__(self, value: Any, shard_ids: Sequence[ShardId], /) -> ShardId | None: ...


def canonical_bytes(value: Any) -> bytes:
    """A stable byte encoding of a shard key value.

    Integral numbers encode alike whatever their Python type (``5``, ``5.0``
    and ``Decimal("5")`` are the same key, as they are equal in PostgreSQL);
    strings as UTF-8, UUIDs by their 16 bytes, dates and times in ISO format.
    Other types raise :class:`TypeError`.
    """
    if isinstance(value, bool):
        raise TypeError("booleans are not shard keys")
    if isinstance(value, int):
        return b"i" + str(value).encode()
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{value!r} is not a shard key")
        if value.is_integer():
            return b"i" + str(int(value)).encode()
        return b"f" + repr(value).encode()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise TypeError(f"{value!r} is not a shard key")
        if value == value.to_integral_value():
            return b"i" + str(int(value)).encode()
        return b"n" + str(value.normalize()).encode()
    if isinstance(value, str):
        return b"s" + value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return b"b" + bytes(value)
    if isinstance(value, uuid.UUID):
        return b"u" + value.bytes
    if isinstance(value, datetime.date | datetime.time):  # datetime is a date
        return b"d" + value.isoformat().encode()
    raise TypeError(f"values of type {type(value).__name__} are not supported as shard keys")


def stable_hash64(value: Any) -> int:
    """A 64-bit hash of ``value`` that is the same in every process (BLAKE2b of
    :func:`canonical_bytes`)."""
    digest = hashlib.blake2b(canonical_bytes(value), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def jump_hash(key: int, buckets: int) -> int:
    """Lamping & Veach's jump consistent hash: the bucket in ``range(buckets)`` for ``key``.

    Growing ``buckets`` by one moves only the keys that land in the new bucket.
    """
    if buckets <= 0:
        raise ValueError("buckets must be positive")
    key &= _MASK64
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


class HashSharding:
    """Hash-mod: shard ``stable_hash64(value) % N``.

    Even spread; adding a shard moves most keys (about ``N/(N+1)``).

    .. versionadded:: 0.1
    """

    def __call__(self, value: Any, shard_ids: Sequence[ShardId], /) -> ShardId:
        return shard_ids[stable_hash64(value) % len(shard_ids)]

    def __repr__(self) -> str:
        return "HashSharding()"


class JumpHashSharding:
    """Jump consistent hashing over the ShardSet's ordered shard ids.

    Add new shards at the *end* of the ShardSet's mapping: going from N to N+1
    shards then moves about ``1/(N+1)`` of the keys, all to the new shard.

    .. versionadded:: 0.1
    """

    def __call__(self, value: Any, shard_ids: Sequence[ShardId], /) -> ShardId:
        return shard_ids[jump_hash(stable_hash64(value), len(shard_ids))]

    def __repr__(self) -> str:
        return "JumpHashSharding()"


class RangeSharding:
    """Contiguous key ranges: shard ``i`` owns ``bounds[i] <= value < bounds[i + 1]``.

    :param bounds: ``N + 1`` ascending boundaries for N shards, matched to the
        ShardSet's shard ids in order. The first and last may be ``None`` for
        an open end. A value outside every range cannot be placed
        (:class:`~sqlalchemy_scale.ShardKeyError`).

    .. versionadded:: 0.1
    """

    def __init__(self, bounds: Sequence[Any]) -> None:
        bounds = list(bounds)
        if len(bounds) < 2:
            raise ConfigurationError("RangeSharding needs at least two bounds (one range)")
        inner = bounds[1:-1]
        if any(b is None for b in inner):
            raise ConfigurationError("RangeSharding: only the first and last bound may be None")
        closed = [b for b in bounds if b is not None]
        if any(not a < b for a, b in itertools.pairwise(closed)):
            raise ConfigurationError(f"RangeSharding bounds must be strictly ascending: {bounds}")
        self.bounds = bounds
        self._inner = inner

    def validate(self, shard_ids: Sequence[ShardId]) -> None:
        """Check there is one range per shard (called by the ShardSet)."""
        if len(self.bounds) != len(shard_ids) + 1:
            raise ConfigurationError(
                f"RangeSharding has {len(self.bounds) - 1} ranges but the ShardSet has "
                f"{len(shard_ids)} shards {list(shard_ids)}; give N + 1 bounds for N shards"
            )

    def __call__(self, value: Any, shard_ids: Sequence[ShardId], /) -> ShardId | None:
        if value is None:
            return None
        low, high = self.bounds[0], self.bounds[-1]
        if (low is not None and value < low) or (high is not None and value >= high):
            return None
        return shard_ids[bisect.bisect_right(self._inner, value)]

    def __repr__(self) -> str:
        return f"RangeSharding({self.bounds!r})"


def canonical_text(value: Any) -> str:
    """The text under which a key is stored in a directory table."""
    if isinstance(value, str):
        return value
    encoded = canonical_bytes(value)
    tag, payload = encoded[:1], encoded[1:]
    if tag == b"u":
        return str(uuid.UUID(bytes=payload))
    if tag == b"b":
        return "\\x" + payload.hex()
    return payload.decode()


class DirectorySharding:
    """An explicit directory of key -> shard, kept in a database table, a mapping or a callable.

    :param source: where the directory lives: an :class:`~sqlalchemy.engine.Engine`
        or URL (the table ``table`` in that database), a mapping of key to shard
        id, or a callable ``lookup(key) -> shard_id | None``.
    :param table: name of the directory table (columns ``shard_key text primary
        key``, ``shard_id text not null``); :meth:`create_table` creates it.
    :param ttl: seconds a looked-up entry (hit or miss) is cached in this
        process. Other processes see a :meth:`move` or :meth:`assign` after at
        most ``ttl`` seconds; :meth:`invalidate` drops the cache here.

    Keys absent from the directory cannot be placed: inserting them raises
    :class:`~sqlalchemy_scale.ShardKeyError`. Register new keys with
    :meth:`assign` first (e.g. when the customer is created).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        source: Engine | str | URL | Mapping[Any, ShardId] | Callable[[Any], ShardId | None],
        *,
        table: str = "shard_directory",
        ttl: float = 30.0,
    ) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, ShardId | None]] = {}
        self._engine: Engine | None = None
        self._lookup: Callable[[Any], ShardId | None] | None = None
        self.table = Table(
            table,
            MetaData(),
            Column("shard_key", String, primary_key=True),
            Column("shard_id", String, nullable=False),
        )
        if isinstance(source, Engine):
            self._engine = source
        elif isinstance(source, str | URL):
            self._engine = create_engine(source)
        elif isinstance(source, Mapping):
            static = {canonical_text(k): v for k, v in source.items()}
            self._lookup = lambda key: static.get(canonical_text(key))
        elif callable(source):
            self._lookup = source
        else:
            raise ConfigurationError(
                f"DirectorySharding needs an engine, URL, mapping or callable, got {source!r}"
            )

    # -- the strategy --------------------------------------------------------------------

    def __call__(self, value: Any, shard_ids: Sequence[ShardId], /) -> ShardId | None:
        if value is None:
            return None
        if self._lookup is not None:
            return self._lookup(value)
        key = canonical_text(value)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        assert self._engine is not None
        with self._engine.connect() as conn:
            found = conn.scalar(select(self.table.c.shard_id).where(self.table.c.shard_key == key))
        with self._lock:
            self._cache[key] = (now, found)
        return found

    # -- maintaining the directory ----------------------------------------------------------

    def _require_engine(self) -> Engine:
        if self._engine is None:
            raise ConfigurationError("this DirectorySharding is not backed by a database table")
        return self._engine

    def create_table(self) -> None:
        """Create the directory table if it does not exist."""
        self.table.create(self._require_engine(), checkfirst=True)

    def invalidate(self, key: Any = None) -> None:
        """Forget the cached entry for ``key`` (every entry when ``key`` is None)."""
        with self._lock:
            if key is None:
                self._cache.clear()
            else:
                self._cache.pop(canonical_text(key), None)

    def assign(self, key: Any, shard_id: ShardId) -> None:
        """Record that ``key`` lives on ``shard_id`` (insert or overwrite the entry).

        Use it for keys that have no rows yet; to relocate existing rows use :meth:`move`.
        """
        stmt = pg_insert(self.table).values(shard_key=canonical_text(key), shard_id=shard_id)
        stmt = stmt.on_conflict_do_update(
            index_elements=[self.table.c.shard_key], set_={"shard_id": shard_id}
        )
        with self._require_engine().begin() as conn:
            conn.execute(stmt)
        self.invalidate(key)

    def move(
        self,
        key: Any,
        to_shard: ShardId,
        shards: ShardSet,
        tables: Iterable[tuple[Table, str]],
    ) -> int:
        """Move every row of ``key`` to ``to_shard`` and repoint the directory; returns rows moved.

        The procedure, in one atomic step across three databases:

        1. lock the key's directory entry (``SELECT ... FOR UPDATE``), so two
           moves of the same key serialize;
        2. for each ``(table, shard_key_column)`` in ``tables`` (parents before
           children), copy the key's rows from the old shard's primary to the new
           one, then delete them from the old shard (children first);
        3. point the entry at ``to_shard``;
        4. commit all three with PostgreSQL two-phase commit (``PREPARE
           TRANSACTION`` on each, then ``COMMIT PREPARED``), so the rows are
           never on both shards or on neither.

        Other processes cache entries for up to :attr:`ttl` seconds: stop writes
        for this key (or wait ``ttl`` after the move before resuming them), or
        they may still go to the old shard. Reads pinned by the key in that
        window see no rows on the old shard rather than stale ones.
        """
        engine = self._require_engine()
        tables = list(tables)
        ktext = canonical_text(key)
        if to_shard not in shards.shard_ids:
            raise ConfigurationError(f"no shard {to_shard!r}; shards: {shards.shard_ids}")
        dconn = engine.connect()
        dtx = dconn.begin_twophase()
        try:
            current = dconn.scalar(
                select(self.table.c.shard_id)
                .where(self.table.c.shard_key == ktext)
                .with_for_update()
            )
            if current is None or current == to_shard:
                if current is None:
                    self._write_entry(dconn, ktext, to_shard)
                dtx.commit()
                self.invalidate(key)
                return 0
            with ExitStack() as closing:  # src and dst are closed whatever happens
                src = closing.enter_context(shards.replica_set(current).primary.engine.connect())
                dst = closing.enter_context(shards.replica_set(to_shard).primary.engine.connect())
                moved = 0
                stx, ttx = src.begin_twophase(), dst.begin_twophase()
                try:
                    for table, column in tables:
                        rows = (
                            src.execute(select(table).where(table.c[column] == key))
                            .mappings()
                            .all()
                        )
                        if rows:
                            dst.execute(table.insert(), [dict(r) for r in rows])
                            moved += len(rows)
                    for table, column in reversed(tables):
                        src.execute(table.delete().where(table.c[column] == key))
                    self._write_entry(dconn, ktext, to_shard)
                    for tx in (ttx, stx, dtx):
                        tx.prepare()
                except BaseException:
                    # Nothing is committed yet: roll back everything, prepared or not.
                    for tx in (ttx, stx, dtx):
                        if tx.is_active:
                            tx.rollback()
                    raise
                # From the first COMMIT PREPARED on, only forward: never ROLLBACK PREPARED.
                try:
                    commit_prepared(
                        [(to_shard, ttx), (current, stx), (f"directory {self.table.name}", dtx)]
                    )
                finally:
                    self.invalidate(key)
            return moved
        finally:
            dconn.close()

    def _write_entry(self, conn: Any, ktext: str, shard_id: ShardId) -> None:
        stmt = pg_insert(self.table).values(shard_key=ktext, shard_id=shard_id)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[self.table.c.shard_key], set_={"shard_id": shard_id}
            )
        )

    def __repr__(self) -> str:
        from ..errors import render_url  # the one place URLs are rendered, secrets masked

        where = render_url(self._engine) if self._engine is not None else "in memory"
        return f"DirectorySharding({where}, table={self.table.name!r})"
