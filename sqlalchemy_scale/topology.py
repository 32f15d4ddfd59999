"""Topology: the servers an application talks to, as engines with per-node state.

A :class:`ReplicaSet` is one PostgreSQL primary and zero or more streaming
replicas. Each node owns one :class:`~sqlalchemy.engine.Engine` (so each has
its own pool), its counters and its health state. Which node serves a given
statement is decided elsewhere (:func:`sqlalchemy_scale.routing.decide_role`
picks the role, a :mod:`~sqlalchemy_scale.policies` policy picks the replica);
this module only holds the nodes and answers "which replicas are usable now".

Replica engines run every transaction as ``BEGIN READ ONLY`` (SQLAlchemy's
``postgresql_readonly`` execution option, sent inside BEGIN so it costs no
round trip and survives transaction pooling). A URL that wrongly names a
writable server as a replica therefore still cannot be written through, and a
write that reaches a replica raises :class:`~sqlalchemy_scale.errors.ReplicaWriteError`
naming the node.
"""

from __future__ import annotations

import logging
import threading
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from typing import Any, Literal, Self

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.engine.interfaces import ExceptionContext

from .errors import ConfigurationError, ReplicaWriteError, render_url
from .policies import PolicyName, ReplicaPolicy, make_policy

__all__ = ["EngineTarget", "Node", "ReplicaSet", "Role"]

Role = Literal["primary", "replica"]
EngineTarget = str | URL | Engine

log = logging.getLogger("sqlalchemy_scale.topology")

# SQLSTATE 25006: read_only_sql_transaction ("cannot execute INSERT in a read-only transaction").
_READ_ONLY_SQLSTATE = "25006"


class Node:
    """One server: its name, role, engine, counters and health state.

    Nodes are made by :class:`ReplicaSet`; applications read them (``node.name``,
    ``node.engine``) but do not construct them.
    """

    def __init__(self, name: str, engine: Engine, *, role: Role, owns_engine: bool) -> None:
        self.name = name
        self.role: Role = role
        self.engine = engine
        self.owns_engine = owns_engine
        #: False while health checks keep this node out of rotation.
        self.is_usable = True
        self._lock = threading.Lock()
        self._statements = 0
        self._fallbacks = 0

    @property
    def is_replica(self) -> bool:
        return self.role == "replica"

    @property
    def url(self) -> str:
        """The node's URL with the password masked."""
        return render_url(self.engine)

    def checked_out(self) -> int:
        """Connections of this node's pool currently in use (0 for pools that do not count)."""
        checkedout = getattr(self.engine.pool, "checkedout", None)
        return int(checkedout()) if checkedout is not None else 0

    def count(self, *, fallback: bool = False) -> None:
        with self._lock:
            self._statements += 1
            if fallback:
                self._fallbacks += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"statements": self._statements, "fallbacks": self._fallbacks}

    def reset_stats(self) -> None:
        with self._lock:
            self._statements = self._fallbacks = 0

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role} {self.url}>"


class ReplicaSet:
    """A PostgreSQL primary and its streaming replicas.

    :param primary: URL (string or :class:`~sqlalchemy.engine.URL`) or
        :class:`~sqlalchemy.engine.Engine` of the primary.
    :param replicas: URLs or engines of the replicas, as a sequence (named
        ``replica1``, ``replica2``, ...) or a mapping of name to URL/engine. May be
        empty: every read then goes to the primary.
    :param policy: how a read picks among usable replicas: ``"round_robin"``
        (default), ``"random"``, ``"least_busy"``, or any callable taking the
        usable replicas and returning one (:class:`~sqlalchemy_scale.policies.ReplicaPolicy`).
    :param pool: a pool preset name (see :func:`sqlalchemy_scale.pool_preset`) or a
        mapping of ``create_engine`` keyword arguments applied to every engine
        built from a URL. Explicit ``engine_kwargs`` win over the preset.
    :param name: a label for logs and errors (a shard's id when used in a ShardSet).
    :param engine_kwargs: passed to :func:`~sqlalchemy.create_engine` for every
        URL given (ignored for ready-made engines).

    Misconfiguration (an unparsable URL, a non-PostgreSQL URL, a duplicate node
    name, an unknown policy) raises :class:`~sqlalchemy_scale.ConfigurationError`
    here, not at the first query. Nothing connects until a statement runs.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *,
        primary: EngineTarget,
        replicas: Sequence[EngineTarget] | Mapping[str, EngineTarget] = (),
        policy: ReplicaPolicy | PolicyName | str = "round_robin",
        pool: str | Mapping[str, Any] | None = None,
        name: str = "default",
        **engine_kwargs: Any,
    ) -> None:
        self.name = name
        self.policy = make_policy(policy)
        self._pool = pool
        self._engine_kwargs = engine_kwargs
        self.primary = self._make_node("primary", primary, role="primary")
        if isinstance(replicas, Mapping):
            named = list(replicas.items())
        elif isinstance(replicas, str | URL | Engine):
            raise ConfigurationError(
                f"ReplicaSet {name!r}: replicas must be a list or a mapping of URLs/engines, "
                "not a single URL"
            )
        else:
            named = [(f"replica{i}", target) for i, target in enumerate(replicas, start=1)]
        names = [n for n, _ in named]
        if "primary" in names or len(set(names)) != len(names):
            raise ConfigurationError(f"ReplicaSet {name!r}: node names must be unique, got {names}")
        self.replicas: list[Node] = [self._make_node(n, t, role="replica") for n, t in named]
        self._usable: tuple[Node, ...] = tuple(self.replicas)
        self._fallback_logged = False
        self._state_lock = threading.Lock()

    # -- construction -------------------------------------------------------------------

    def _engine_options(self) -> dict[str, Any]:
        if self._pool is None:
            options: dict[str, Any] = {}
        elif isinstance(self._pool, str):
            from .pooling import pool_preset

            options = pool_preset(self._pool)
        else:
            options = dict(self._pool)
        options.update(self._engine_kwargs)
        return options

    def _make_node(self, node_name: str, target: EngineTarget, *, role: Role) -> Node:
        where = f"ReplicaSet {self.name!r}, node {node_name!r}"
        if isinstance(target, Engine):
            engine, owns = target, False
        elif isinstance(target, str | URL):
            try:
                url = make_url(target)
            except Exception:
                raise ConfigurationError(
                    f"{where}: cannot parse the URL (expected e.g. "
                    "'postgresql+psycopg2://user:password@host:5432/dbname')"
                ) from None
            if url.get_backend_name() != "postgresql":
                raise ConfigurationError(
                    f"{where}: {render_url(url)} is not a PostgreSQL URL; "
                    "sqlalchemy-scale routes PostgreSQL primaries and streaming replicas"
                )
            try:
                engine = create_engine(url, **self._engine_options())
            except ConfigurationError:
                raise
            except Exception as exc:
                raise ConfigurationError(
                    f"{where}: cannot build an engine for {render_url(url)}: {exc}"
                ) from exc
            owns = True
        else:
            raise ConfigurationError(
                f"{where}: expected a URL string, sqlalchemy URL or Engine, got {type(target).__name__}"
            )
        if engine.dialect.name != "postgresql":
            raise ConfigurationError(f"{where}: {render_url(engine)} is not a PostgreSQL engine")
        if role == "replica":
            # An OptionEngine shares the pool but not the user's engine settings or events.
            engine = engine.execution_options(postgresql_readonly=True)
            # handle_error is a dialect event: the handler checks it is our engine that failed.
            event.listen(engine, "handle_error", _replica_write_error(engine, self.name, node_name))
        return Node(node_name, engine, role=role, owns_engine=owns)

    @classmethod
    def from_config(
        cls, source: str | PathLike[str] | Mapping[str, Any], *, section: str | None = None
    ) -> ReplicaSet:
        """Build a ReplicaSet from a TOML file or a mapping.

        The keys are this constructor's: ``primary``, ``replicas`` (list or table),
        ``policy``, ``pool``, ``name`` and an ``[engine]`` table of ``create_engine``
        keyword arguments. ``section`` selects a nested table (e.g. ``"replica_set"``)::

            primary = "postgresql+psycopg2://app:secret@db1/app"
            replicas = ["postgresql+psycopg2://app:secret@db2/app"]
            pool = "pgbouncer-transaction"
            [engine]
            pool_size = 5
        """
        config = _load_config(source)
        if section is not None:
            try:
                config = config[section]
            except KeyError:
                raise ConfigurationError(f"configuration has no [{section}] table") from None
        known = {"primary", "replicas", "policy", "pool", "name", "engine"}
        unknown = set(config) - known
        if unknown:
            raise ConfigurationError(
                f"unknown ReplicaSet configuration keys {sorted(unknown)}; expected {sorted(known)}"
            )
        if "primary" not in config:
            raise ConfigurationError("ReplicaSet configuration needs a 'primary' URL")
        return cls(
            primary=config["primary"],
            replicas=config.get("replicas", ()),
            policy=config.get("policy", "round_robin"),
            pool=config.get("pool"),
            name=config.get("name", "default"),
            **dict(config.get("engine", {})),
        )

    # -- routing support ------------------------------------------------------------------

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    def node(self, name: str) -> Node:
        """The node called ``name``; raises :class:`ConfigurationError` if there is none."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise ConfigurationError(
            f"ReplicaSet {self.name!r} has no node {name!r}; nodes: {[n.name for n in self.nodes]}"
        )

    def usable_replicas(self) -> tuple[Node, ...]:
        """Replicas currently in rotation."""
        return self._usable

    def set_usable(self, node: Node, usable: bool, *, reason: str = "") -> None:
        """Put a replica into or out of rotation; logged once per change."""
        with self._state_lock:
            if node.is_usable == usable:
                return
            node.is_usable = usable
            self._usable = tuple(r for r in self.replicas if r.is_usable)
        level = logging.INFO if usable else logging.WARNING
        state = "back in rotation" if usable else "out of rotation"
        log.log(
            level,
            "replica %s of %s is %s%s",
            node.name,
            self.name,
            state,
            f": {reason}" if reason else "",
        )

    def choose_replica(self) -> Node | None:
        """A usable replica picked by the policy, or None when none is usable."""
        usable = self._usable
        if not usable:
            if not self._fallback_logged:
                self._fallback_logged = True
                why = "no replicas are configured" if not self.replicas else "no replica is usable"
                log.warning("%s: reads go to the primary because %s", self.name, why)
            return None
        if self._fallback_logged:
            self._fallback_logged = False
            log.info("%s: reads go to replicas again", self.name)
        return self.policy(usable) if len(usable) > 1 else usable[0]

    # -- observability and lifecycle -----------------------------------------------------

    def stats(self) -> dict[str, dict[str, int]]:
        """Per node: ``statements`` routed to it and, on the primary, ``fallbacks``
        (reads it served because no replica was usable)."""
        return {node.name: node.stats() for node in self.nodes}

    def reset_stats(self) -> None:
        for node in self.nodes:
            node.reset_stats()

    def dispose(self) -> None:
        """Close the pools of the engines this ReplicaSet created (not engines it was given)."""
        for node in self.nodes:
            if node.owns_engine:
                node.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __repr__(self) -> str:
        replicas = ", ".join(r.url for r in self.replicas)
        return f"<ReplicaSet {self.name} primary={self.primary.url} replicas=[{replicas}]>"


def _sqlstate(exc: BaseException | None) -> str | None:
    # psycopg2 calls it pgcode, psycopg 3 and asyncpg sqlstate.
    return getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)


def _replica_write_error(engine: Engine, set_name: str, node_name: str) -> Any:
    def handle_error(context: ExceptionContext) -> BaseException | None:
        if context.engine is not engine:
            return None
        if _sqlstate(context.original_exception) != _READ_ONLY_SQLSTATE:
            return None
        statement = context.statement
        return ReplicaWriteError(
            f"a statement that writes reached replica {node_name!r} of {set_name!r} and was "
            f"rejected there (nothing was written): {context.original_exception}".strip()
            + "; route writes to the primary (use_primary=True or session.use_primary())",
            node=node_name,
            statement=statement,
        )

    return handle_error


def _load_config(source: str | PathLike[str] | Mapping[str, Any]) -> Mapping[str, Any]:
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
