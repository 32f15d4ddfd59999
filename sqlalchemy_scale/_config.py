"""Topology files: one TOML format for a ReplicaSet or a ShardSet, read by apps and the CLI.

A replica set is the table :meth:`ReplicaSet.from_config` reads (``primary``,
``replicas``, ``policy``, ``pool``, ... and an ``[engine]`` table). A shard set is::

    strategy = "hash"            # "hash", "jump_hash", {range = [0, 1000, 2000]},
                                 # or "package.module:attribute" (a strategy object)
    cross_shard_writes = "refuse"   # or "two_phase", "best_effort" (`two_phase = true` is
                                    # deprecated: cross_shard_writes = "two_phase")
    pool = "pgbouncer-transaction"   # ReplicaSet settings shared by every shard ...
    max_lag_seconds = 5
    [engine]                     # ... and create_engine() keyword arguments
    pool_size = 5
    [shards.s0]                  # one table per shard, in shard order: a ReplicaSet table
    primary = "postgresql+psycopg2://app:secret@db0/app"
    replicas = ["postgresql+psycopg2://app:secret@db0r/app"]
    [shards.s1]                  # its keys override the shared ones
    primary = "postgresql+psycopg2://app:secret@db1/app"

A shard may also be a bare URL (``s2 = "postgresql://..."``). Either shape may sit
under a table (``[shard_set]``, ``[replica_set]``) chosen with ``section=``, next to
tables the CLI reads (``[status]``), which the constructors never see.
"""

from __future__ import annotations

import importlib
import math
import tomllib
from collections.abc import Mapping
from os import PathLike
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .sharding import ShardingStrategy, ShardSet
    from .topology import ReplicaSet

__all__ = [
    "REPLICA_SET_KEYS",
    "check_flag",
    "check_number",
    "load_config",
    "load_topology",
    "shard_set_from_config",
    "topology_config",
]

ConfigSource = str | PathLike[str] | Mapping[str, Any]

#: ReplicaSet keyword arguments a configuration file may set (plus an [engine] table).
REPLICA_SET_KEYS = frozenset(
    {
        "primary",
        "replicas",
        "policy",
        "pool",
        "pooling_guard",
        "name",
        "monitor",
        "monitor_interval",
        "max_lag_bytes",
        "max_lag_seconds",
        "max_wait",
        "read_timeout",
        "allow_writable_replicas",
        "read_your_writes",
    }
)
# ShardSet keyword arguments a configuration file may set; the ReplicaSet keys (but not
# `primary`/`replicas`/`name`) are shared defaults for every shard.
_SHARD_SET_KEYS = frozenset(
    {"shards", "strategy", "cross_shard_writes", "two_phase", "max_workers", "engine"}
)
_SHARED_KEYS = REPLICA_SET_KEYS - {"primary", "replicas", "name"}
#: Tables that may sit beside a topology in one file; no constructor reads them.
SIDE_TABLES = frozenset({"status", "alembic"})


def topology_config(source: ConfigSource, *, section: str | None = None) -> Mapping[str, Any]:
    """The topology table of a file or mapping: ``section`` if given, else the root (minus
    :data:`SIDE_TABLES`), else the only ``[replica_set]`` or ``[shard_set]`` table."""
    config = load_config(source)
    if section is not None:
        try:
            table: Any = config[section]
        except KeyError:
            raise ConfigurationError(f"configuration has no [{section}] table") from None
        if not isinstance(table, Mapping):
            raise ConfigurationError(f"configuration [{section}] is not a table")
        return table
    if "shards" in config or "primary" in config:
        return {k: v for k, v in config.items() if k not in SIDE_TABLES}
    found = [name for name in ("replica_set", "shard_set") if isinstance(config.get(name), Mapping)]
    if len(found) == 1:
        found_table: Mapping[str, Any] = config[found[0]]
        return found_table
    if found:
        raise ConfigurationError(
            "configuration holds both a [replica_set] and a [shard_set] table: choose one "
            "with section= (--section on the command line)"
        )
    raise ConfigurationError(
        "configuration holds no topology: expected 'primary' (a ReplicaSet), a [shards] "
        "table (a ShardSet), or one [replica_set] / [shard_set] table (or pass section=)"
    )


def load_topology(source: ConfigSource, *, section: str | None = None) -> ReplicaSet | ShardSet:
    """A :class:`ReplicaSet` or :class:`~sqlalchemy_scale.ShardSet`, whichever the
    configuration describes (a ``shards`` table makes it a ShardSet)."""
    from .topology import ReplicaSet  # topology reads its checks from here

    config = topology_config(source, section=section)
    if "shards" in config:
        return shard_set_from_config(config)
    return ReplicaSet.from_config(config)


def shard_set_from_config(config: Mapping[str, Any]) -> ShardSet:
    """Build a ShardSet from a mapping in the format of this module's docstring."""
    from .sharding import ShardSet
    from .sharding._shard_set import cross_shard_writes_mode
    from .topology import ReplicaSet

    unknown = set(config) - _SHARD_SET_KEYS - _SHARED_KEYS
    if unknown:
        raise ConfigurationError(
            f"unknown ShardSet configuration keys {sorted(unknown)}; expected "
            f"{sorted(_SHARD_SET_KEYS | _SHARED_KEYS)}"
        )
    shards = config.get("shards")
    if not isinstance(shards, Mapping) or not shards:
        raise ConfigurationError("ShardSet configuration needs a [shards] table with a shard")
    if "strategy" not in config:
        raise ConfigurationError(
            "ShardSet configuration needs a 'strategy' ('hash', 'jump_hash', "
            "{range = [...]} or 'package.module:attribute')"
        )
    strategy = _strategy(config["strategy"])
    shared = {k: v for k, v in config.items() if k in _SHARED_KEYS}
    engine = dict(config.get("engine", {}))
    sets: dict[str, ReplicaSet] = {}
    try:
        for shard_id, shard in shards.items():
            if isinstance(shard, str):
                shard = {"primary": shard}
            if not isinstance(shard, Mapping):
                raise ConfigurationError(
                    f"shard {shard_id!r}: expected a URL or a table with 'primary', "
                    f"got {type(shard).__name__}"
                )
            merged = {**shared, "name": str(shard_id), **shard}
            merged["engine"] = {**engine, **dict(shard.get("engine", {}))}
            sets[str(shard_id)] = ReplicaSet.from_config(merged)
        return ShardSet(
            sets,
            strategy=strategy,
            cross_shard_writes=cross_shard_writes_mode(
                config.get("cross_shard_writes"),
                config.get("two_phase"),
                in_config=True,
                stacklevel=4,
            ),
            max_workers=config.get("max_workers"),
        )
    except BaseException:
        for replica_set in sets.values():
            replica_set.dispose()
        raise


def _strategy(value: Any) -> ShardingStrategy:
    from .sharding import HashSharding, JumpHashSharding, RangeSharding

    if value == "hash":
        return HashSharding()
    if value == "jump_hash":
        return JumpHashSharding()
    if isinstance(value, Mapping) and set(value) == {"range"}:
        return RangeSharding(value["range"])
    if isinstance(value, str) and ":" in value:
        module_name, _, attribute = value.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(f"strategy {value!r} cannot be imported: {exc}") from exc
        if not callable(found):
            raise ConfigurationError(f"strategy {value!r} is not callable")
        strategy: ShardingStrategy = found
        return strategy
    raise ConfigurationError(
        f"unknown strategy {value!r}: expected 'hash', 'jump_hash', {{range = [...]}} "
        "or 'package.module:attribute'"
    )


def load_config(source: ConfigSource) -> Mapping[str, Any]:
    """The mapping itself, or the TOML file at ``source`` read into one; a missing or
    malformed file raises :class:`~sqlalchemy_scale.ConfigurationError` naming it."""
    if isinstance(source, Mapping):
        return source
    try:
        with open(source, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigurationError(f"configuration file {str(source)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(
            f"configuration file {str(source)!r} is not valid TOML: {exc}"
        ) from None


def check_flag(where: str, label: str, value: object) -> None:
    """Refuse a setting that must be True or False and is not."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{where}: {label} must be True or False, got {value!r}")


def check_number(
    where: str,
    label: str,
    value: object,
    *,
    optional: bool = False,
    zero: bool = True,
    integral: bool = False,
) -> None:
    """Refuse what no setting of ``label`` can mean: a wrong type, NaN, infinity, a negative
    number (or zero, where zero would disable the thing it times)."""
    if value is None and optional:
        return
    kinds = "an integer" if integral else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
        none = " or None" if optional else ""
        raise ConfigurationError(f"{where}: {label} must be {kinds}{none}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = "at least 0" if zero else "greater than 0"
        off = " (None switches it off)" if optional else ""
        raise ConfigurationError(
            f"{where}: {label} must be a finite number {bound}{off}, got {value!r}"
        )
