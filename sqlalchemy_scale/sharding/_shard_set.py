"""ShardSet: the shards of an application, each a ReplicaSet, and the strategy that places keys.

(Topology, like :class:`~sqlalchemy_scale.ReplicaSet`; it lives next to the
sharding session only so that the sharding work could land in one package.)
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from typing import TYPE_CHECKING, Any, Literal, Self, get_args

from sqlalchemy import Table
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.elements import ColumnElement

from .._sa import deannotate, mapped_registries
from ..errors import ConfigurationError, ShardKeyError
from ..topology import EngineTarget, ReplicaSet
from ._stored_key import stored_key
from .strategies import ShardId, ShardingStrategy

if TYPE_CHECKING:
    from .recovery import PreparedTransaction, RecoveryReport

__all__ = ["CrossShardWrites", "ShardRule", "ShardSet"]

#: What a transaction that writes to several shards does at commit (see ShardSet).
CrossShardWrites = Literal["refuse", "two_phase", "best_effort"]

#: How a table is placed: ("key", column name), ("all", None) or ("pinned", shard id).
ShardRule = tuple[str, str | None]


class ShardSet:
    """Independent PostgreSQL servers ("shards"), each optionally with streaming replicas.

    :param shards: shard id -> URL, :class:`~sqlalchemy.engine.Engine` or
        :class:`~sqlalchemy_scale.ReplicaSet`. The mapping's order is the shard
        order strategies see (add new shards at the end).
    :param strategy: a :class:`~sqlalchemy_scale.sharding.strategies.ShardingStrategy`:
        :class:`~sqlalchemy_scale.HashSharding`, :class:`~sqlalchemy_scale.JumpHashSharding`,
        :class:`~sqlalchemy_scale.RangeSharding`, :class:`~sqlalchemy_scale.DirectorySharding`
        or a function ``(value, shard_ids) -> shard_id | None``.
    :param cross_shard_writes: what a transaction that writes to more than one
        shard does. ``"refuse"`` (the default): the write to the second shard raises
        :class:`~sqlalchemy_scale.CrossShardWriteError` before it is sent, so nothing of
        it commits. ``"two_phase"``: commit with PostgreSQL two-phase commit (the servers
        need ``max_prepared_transactions > 0``); the decision is recorded on the home
        shard (the first) before the first ``COMMIT PREPARED``, and
        :meth:`recover_prepared` finishes what a failure leaves prepared: every shard
        commits or none does. ``"best_effort"``: commit the shards one after another, in
        ShardSet order, as SQLAlchemy's horizontal_shard does; a COMMIT that fails stops
        there and raises :class:`~sqlalchemy_scale.PartialCommitError`, which lists the
        shards that committed, the one that failed and those rolled back. Some shards keep
        the transaction's writes and others do not: use it only for writes that are
        idempotent or that the application reconciles.
    :param two_phase: deprecated since 0.3, removed in 0.4: ``two_phase=True`` is
        ``cross_shard_writes="two_phase"``, ``False`` is ``"refuse"``.
    :param max_workers: threads that run fan-out queries (default: two per
        shard). The pool is shared by every session of this ShardSet.
    :param engine_kwargs: passed to :func:`~sqlalchemy.create_engine` for every
        URL given (see :class:`~sqlalchemy_scale.ReplicaSet`).

    .. versionadded:: 0.1

    .. versionchanged:: 0.3
        ``cross_shard_writes`` replaces ``two_phase`` and adds ``"best_effort"``.
    """

    def __init__(
        self,
        shards: Mapping[ShardId, EngineTarget | ReplicaSet],
        *,
        strategy: ShardingStrategy,
        cross_shard_writes: CrossShardWrites | None = None,
        two_phase: bool | None = None,
        max_workers: int | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if not shards:
            raise ConfigurationError("ShardSet needs at least one shard")
        if not callable(strategy):
            raise ConfigurationError(f"strategy must be callable, got {strategy!r}")
        self.shard_ids: list[ShardId] = [str(s) for s in shards]
        self._sets: dict[ShardId, ReplicaSet] = {}
        for shard_id, target in shards.items():
            if isinstance(target, ReplicaSet):
                self._sets[str(shard_id)] = target
            else:
                self._sets[str(shard_id)] = ReplicaSet(
                    primary=target, name=str(shard_id), **engine_kwargs
                )
        for shard_id, replica_set in self._sets.items():
            # A shard's WAL positions sit under its id in a causal token covering several
            # shards (unless the ReplicaSet was given a scope of its own).
            if replica_set.causal_scope is None:
                replica_set.causal_scope = shard_id
            if not replica_set.replicas:
                # A shard without replicas reads from its primary by design: not a degraded
                # state worth a WARNING per shard at its first read (which a ReplicaSet logs
                # when it has no usable replica).
                replica_set.quiet_fallback()
        owners: dict[int, ShardId] = {}
        for shard_id, replica_set in self._sets.items():
            other = owners.setdefault(id(replica_set.primary.engine), shard_id)
            if other != shard_id:
                raise ConfigurationError(
                    f"shards {other!r} and {shard_id!r} are given the same Engine (or "
                    "ReplicaSet); each shard needs its own database, or rows of one shard "
                    "would be read as another's"
                )
        #: True when the shards are asyncio engines (use async_sharded_sessionmaker).
        self.is_async: bool = _same_kind(self._sets)
        validate = getattr(strategy, "validate", None)
        if callable(validate):
            validate(self.shard_ids)
        self.strategy = strategy
        #: "refuse", "two_phase" or "best_effort": see the class docstring.
        self.cross_shard_writes: CrossShardWrites = cross_shard_writes_mode(
            cross_shard_writes, two_phase
        )
        self.max_workers = max_workers or 2 * len(self.shard_ids)
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._rules: dict[Table, ShardRule | None] = {}
        #: Each shard database's default collation, read at the first fan-out that sorts text.
        self.collations: dict[ShardId, str] = {}

    @property
    def two_phase(self) -> bool:
        """Whether cross-shard transactions commit with two-phase commit
        (``cross_shard_writes == "two_phase"``)."""
        return self.cross_shard_writes == "two_phase"

    # -- placement ---------------------------------------------------------------------------

    def shard_for(
        self,
        value: Any,
        *,
        model: str | None = None,
        column: str | None = None,
        key_column: ColumnElement[Any] | None = None,
    ) -> ShardId:
        """The shard that owns shard key ``value``; :class:`ShardKeyError` if none does.

        With ``key_column``, ``value`` is first converted to what PostgreSQL stores in
        that column (``"7"`` and ``7.0`` for an integer column are ``7``; ``Decimal("1.005")``
        for a ``numeric(10, 2)`` is ``1.01``), so a row is placed by the value it is stored
        and found with; a value PostgreSQL would refuse, or store differently per driver
        (``1.5`` for an integer column), raises :class:`ShardKeyError`
        (:mod:`~sqlalchemy_scale.sharding._stored_key` lists the rules).
        """
        what = f"{model}.{column}" if model and column else "the shard key"
        if value is None:
            raise ShardKeyError(
                f"{what} is missing (None): cannot choose a shard, nothing was written",
                model=model,
                column=column,
                value=value,
            )
        if key_column is not None:
            try:
                value = stored_key(value, key_column)
            except (ValueError, TypeError, ArithmeticError) as exc:
                raise ShardKeyError(
                    f"{what} = {value!r} cannot be placed as a {key_column.type} key: {exc}; "
                    "nothing was sent to any shard",
                    model=model,
                    column=column,
                    value=value,
                ) from exc
        try:
            shard_id = self.strategy(value, self.shard_ids)
        except (KeyError, ValueError, TypeError, LookupError) as exc:
            raise ShardKeyError(
                f"{what} = {value!r} cannot be placed by {self.strategy!r}: {exc}",
                model=model,
                column=column,
                value=value,
            ) from exc
        if shard_id is None or shard_id not in self._sets:
            reason = (
                "no shard owns it"
                if shard_id is None
                else f"strategy answered unknown shard {shard_id!r}"
            )
            raise ShardKeyError(
                f"{what} = {value!r} cannot be placed by {self.strategy!r}: {reason}",
                model=model,
                column=column,
                value=value,
            )
        return shard_id

    def replica_set(self, shard_id: ShardId) -> ReplicaSet:
        """The ReplicaSet of shard ``shard_id``."""
        try:
            return self._sets[shard_id]
        except KeyError:
            raise ConfigurationError(f"no shard {shard_id!r}; shards: {self.shard_ids}") from None

    @property
    def home_shard(self) -> ShardId:
        """The shard that serves reads of global (``__shard__ = "all"``) tables."""
        return self.shard_ids[0]

    def fixed_shard(self, rule: ShardRule) -> ShardId | None:
        """The one shard a keyless rule reads from: the home shard for a global table, the
        table's shard for a pinned one; None for a sharded table (its key decides)."""
        kind, arg = rule
        if kind == "all":
            return self.home_shard
        if kind == "pinned":
            assert arg is not None
            return arg
        return None

    def rule_for(self, table: Table) -> ShardRule | None:
        """How ``table`` is placed, from its model's ``__shard_key__``/``__shard__`` or
        ``Table.info`` (``{"shard_key": ...}`` or ``{"shard": ...}``); None if undeclared."""
        table = deannotate(table)  # ORM statements hold annotated copies
        try:
            return self._rules[table]
        except KeyError:
            pass
        rule = _rule_from_info(table.info)
        if rule is None:
            for registry in mapped_registries():
                for mapper in list(registry.mappers):
                    if mapper.local_table is table:
                        rule = rule_for_mapper(mapper)
                        break
                if rule is not None:
                    break
        if rule is not None:
            self._check_rule(table.name, rule)
        with self._lock:
            self._rules[table] = rule
        return rule

    def _check_rule(self, name: str, rule: ShardRule) -> None:
        kind, arg = rule
        if kind == "pinned" and arg not in self._sets:
            raise ConfigurationError(f"table {name!r} is pinned to unknown shard {arg!r}")

    # -- two-phase commit recovery -----------------------------------------------------------

    def recover_prepared(self, *, older_than: float = 60.0) -> RecoveryReport:
        """Commit or roll back, by its recorded decision, every two-phase transaction of this
        ShardSet left prepared for at least ``older_than`` seconds; returns what was done.

        Safe at any time and from any process (see :mod:`sqlalchemy_scale.sharding.recovery`).

        .. versionadded:: 0.2
        """
        from .recovery import recover_prepared

        return recover_prepared(self, older_than=older_than)

    def prepared_transactions(self, *, older_than: float = 0.0) -> list[PreparedTransaction]:
        """The prepared transactions on the shards' primaries at least ``older_than`` seconds old.

        .. versionadded:: 0.2
        """
        from .recovery import prepared_transactions

        return prepared_transactions(self, older_than=older_than)

    # -- execution resources -----------------------------------------------------------------

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The bounded thread pool that runs fan-out queries (created on first use)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.max_workers, thread_name_prefix="sqlalchemy_scale-fanout"
                )
            return self._executor

    def dispose(self) -> None:
        """Stop the fan-out threads and close the pools of engines this ShardSet created."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        for replica_set in self._sets.values():
            replica_set.dispose()

    @classmethod
    def from_config(
        cls, source: str | PathLike[str] | Mapping[str, Any], *, section: str | None = None
    ) -> ShardSet:
        """Build a ShardSet from a TOML file or a mapping (the format is in
        :mod:`sqlalchemy_scale._config`): shared settings, a ``strategy`` and one
        ``[shards.<id>]`` table per shard, each read as a ReplicaSet.

        .. versionadded:: 0.1
        """
        from .._config import shard_set_from_config, topology_config

        return shard_set_from_config(topology_config(source, section=section))

    async def adispose(self) -> None:
        """:meth:`dispose` for async shards, awaited on the loop that used their engines."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
        for replica_set in self._sets.values():
            await replica_set.adispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.adispose()

    def __iter__(self) -> Iterator[ShardId]:
        return iter(self.shard_ids)

    def __len__(self) -> int:
        return len(self.shard_ids)

    def __repr__(self) -> str:
        return f"<ShardSet {self.shard_ids} strategy={self.strategy!r}>"


def cross_shard_writes_mode(
    mode: Any, two_phase: Any, *, in_config: bool = False, stacklevel: int = 3
) -> CrossShardWrites:
    """The cross_shard_writes mode from the keyword (or TOML key, ``in_config``) and the
    deprecated ``two_phase`` spelling, which warns and must not disagree with it."""
    if two_phase is not None:
        replacement = "two_phase" if two_phase else "refuse"
        if in_config:
            old, new = (
                "the shard set key 'two_phase'",
                f"write cross_shard_writes = {replacement!r}",
            )
            given = (
                f"the shard set has two_phase = {two_phase!r} and cross_shard_writes = "
                f"{mode!r}, which disagree; keep only cross_shard_writes"
            )
        else:
            old, new = (
                "ShardSet(two_phase=...)",
                f"use ShardSet(cross_shard_writes={replacement!r})",
            )
            given = (
                f"ShardSet got two_phase={two_phase!r} and cross_shard_writes={mode!r}, which "
                "disagree; give only cross_shard_writes"
            )
        warnings.warn(
            f"{old} is deprecated since sqlalchemy-scale 0.3 and will be removed in 0.4; {new}",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        if mode is not None and mode != replacement:
            raise ConfigurationError(given)
        mode = replacement
    if mode is None:
        return "refuse"
    if mode not in get_args(CrossShardWrites):
        raise ConfigurationError(
            f"cross_shard_writes must be one of {list(get_args(CrossShardWrites))}, got {mode!r}"
        )
    return mode  # type: ignore[no-any-return]


def _same_kind(sets: Mapping[ShardId, ReplicaSet]) -> bool:
    """Whether the shards are async; mixing sync and async shards is refused."""
    kinds = {shard_id: replica_set.is_async for shard_id, replica_set in sets.items()}
    if len(set(kinds.values())) > 1:
        sync = [s for s, is_async in kinds.items() if not is_async]
        async_ = [s for s, is_async in kinds.items() if is_async]
        raise ConfigurationError(
            f"ShardSet mixes sync shards {sync} and async shards {async_}; give every shard "
            "the same kind of URL or engine"
        )
    return next(iter(kinds.values()))


def _rule_from_info(info: Mapping[str, Any]) -> ShardRule | None:
    if "shard_key" in info:
        return ("key", str(info["shard_key"]))
    if "shard" in info:
        return _placed_on(info["shard"])
    return None


def rule_for_mapper(mapper: Mapper[Any]) -> ShardRule | None:
    """The placement declared on a mapped class, with ``__shard_key__`` resolved to a column name."""
    rule = rule_for_class(mapper.class_)
    if rule is None or rule[0] != "key":
        return rule
    attr = rule[1]
    assert attr is not None
    prop = mapper.get_property(attr) if mapper.has_property(attr) else None
    columns = getattr(prop, "columns", None)
    if not columns:
        raise ConfigurationError(
            f"{mapper.class_.__name__}.__shard_key__ = {attr!r} does not name a mapped column"
        )
    return ("key", str(columns[0].name))


def rule_for_class(cls: type) -> ShardRule | None:
    """The placement declared on a mapped class (``__shard_key__`` or ``__shard__``)."""
    key = getattr(cls, "__shard_key__", None)
    shard = getattr(cls, "__shard__", None)
    if key is not None and shard is not None:
        raise ConfigurationError(
            f"{cls.__name__} declares both __shard_key__ and __shard__; choose one"
        )
    if key is not None:
        return ("key", str(key))
    if shard is not None:
        return _placed_on(shard)
    return None


def _placed_on(shard: object) -> ShardRule:
    """The rule for ``__shard__``/``{"shard": ...}``: every shard (``"all"``) or one."""
    return ("all", None) if str(shard) == "all" else ("pinned", str(shard))
