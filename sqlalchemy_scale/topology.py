"""Topology: the servers an application talks to, as engines with per-node state.

A :class:`ReplicaSet` is one PostgreSQL primary and zero or more streaming
replicas. Each node owns one :class:`~sqlalchemy.engine.Engine` (so each has
its own pool), its counters and its health state. Which node serves a given
statement is decided elsewhere (:func:`sqlalchemy_scale.routing.decide_role`
picks the role, a :mod:`~sqlalchemy_scale.policies` policy picks the replica);
this module only holds the nodes and answers "which replicas are usable now".
A node itself (name, engine, counters, connections) is :mod:`sqlalchemy_scale.node`;
the configuration file format is :mod:`sqlalchemy_scale._config`.

A replica transaction is read-only: on a hot standby by the server itself, on any other
server by ``BEGIN READ ONLY`` (the driver's read-only flag, sent inside BEGIN so it costs no
round trip and survives transaction pooling; how, and for a user's own engine, is
:mod:`sqlalchemy_scale._engines`). A URL that wrongly names a writable server as a replica,
or a standby promoted under its pooled connections, therefore still cannot be written
through, and a write that reaches a replica raises
:class:`~sqlalchemy_scale.errors.ReplicaWriteError` naming the node.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from typing import Any, Literal, Self, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util.concurrency import greenlet_spawn

from ._async_bridge import pause, run_blocking
from ._config import check_flag, check_number
from ._engines import (
    dispose_at_fork,
    make_read_only,
    read_only_view,
    refuse_transaction_control,
    replica_write_error,
    track_connections,
    with_installed_driver,
)
from ._process_position import ProcessPosition, ReadYourWrites, install_process_position
from .consistency import (
    commit_position,
    install_primary_hooks,
    read_primary_position,
    reject_position,
    take_commit_position,
)
from .decisions import DecisionListener
from .errors import ConfigurationError, render_url
from .health import HealthMonitor, NodeHealth
from .node import Node, Role
from .policies import PolicyName, ReplicaPolicy, make_policy

__all__ = ["EngineTarget", "Node", "ReplicaSet", "Role"]

EngineTarget = str | URL | Engine | AsyncEngine

log = logging.getLogger("sqlalchemy_scale.topology")

_Listener = TypeVar("_Listener", bound=DecisionListener)
# A replica further behind a causal token than this is not waited for: replaying 16 MiB
# of WAL takes far longer than max_wait's few milliseconds.
_CATCH_UP_BYTES = 16 * 1024 * 1024


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
    :param pooling_guard: for engines built from a transaction-pooled preset
        (``"pgbouncer-transaction"``, ``"external-pooler-null"``): ``"raise"``
        (default) refuses statements that transaction pooling silently breaks
        (session ``SET``, ``LISTEN``, session advisory locks, ...) with
        :class:`~sqlalchemy_scale.TransactionPoolingError`, ``"warn"`` lets them run
        with a warning, ``"off"`` installs no guard. See
        :func:`sqlalchemy_scale.pooling.guard_transaction_pooling`.
    :param max_lag_seconds: a replica further behind leaves the rotation (None: no limit).
    :param max_lag_bytes: the same in bytes of WAL (None, the default: no limit).
    :param max_wait: how long a read carrying a causal token may wait for a replica to
        replay it before it goes to the primary, in seconds.
    :param read_timeout: a replica that has not answered the health monitor for this many
        seconds (a frozen server, a network that drops packets) gets its connections shut
        down, so the reads waiting on it fail as lost connections and are retried on another
        node like a dead replica's; None never does. Default 5 s: a slow query on a replica
        that answers probes is never interrupted. Needs the monitor. Replica engines built
        from psycopg2/psycopg URLs also get libpq's ``connect_timeout`` (this many seconds,
        rounded up, at least 2) unless the URL or ``connect_args`` set one; and while a
        replica is down and out of rotation, only the monitor opens connections to it.
    :param allow_writable_replicas: accept a replica whose server is not in recovery (a
        primary): it stays in rotation with a WARNING, and its transactions still run
        ``READ ONLY``. By default such a replica is taken out of rotation with an ERROR log,
        at first use and by every probe, and nothing is sent to it.
    :param read_your_writes: how reads see this process's commits: ``"session"``
        (default) a routing session reads its own commits and honours causal tokens;
        ``"process"`` additionally no read in this process goes to a replica behind
        the newest commit made through the primary engine by any session or
        connection of this process; ``"off"`` records no commit positions at all
        (tokens given to a session are still honoured). See the README for the costs.
    :param causal_scope: the name of this primary's position inside a causal token that
        covers several primaries (see :func:`~sqlalchemy_scale.consistency.parse_token`):
        None (default) for an application's one ReplicaSet, whose tokens are plain LSNs; a
        :class:`~sqlalchemy_scale.ShardSet` gives each shard its shard id. Two ReplicaSets
        used in one :func:`~sqlalchemy_scale.causal_context` need different scopes.
    :param engine_kwargs: passed to :func:`~sqlalchemy.create_engine` for every
        URL given (ignored for ready-made engines).

    Async URLs (``postgresql+asyncpg://``, ``postgresql+psycopg_async://``) and
    :class:`~sqlalchemy.ext.asyncio.AsyncEngine` objects make an async ReplicaSet
    (:attr:`is_async`), for :func:`~sqlalchemy_scale.async_routing_sessionmaker`;
    mixing sync and async nodes raises :class:`~sqlalchemy_scale.ConfigurationError`.

    Misconfiguration (an unparsable URL, a non-PostgreSQL URL, a duplicate node
    name, an unknown policy, a negative, NaN or infinite number) raises
    :class:`~sqlalchemy_scale.ConfigurationError` here, not at the first query.
    Nothing connects until a statement runs; the first read routed to a replica checks
    every replica's server role first (one short query per node).

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 async URLs and engines; ``read_your_writes``.
    """

    def __init__(
        self,
        *,
        primary: EngineTarget,
        replicas: Sequence[EngineTarget] | Mapping[str, EngineTarget] = (),
        policy: ReplicaPolicy | PolicyName | str = "round_robin",
        pool: str | Mapping[str, Any] | None = None,
        name: str = "default",
        monitor: bool = True,
        monitor_interval: float = 0.2,
        max_lag_bytes: int | None = None,
        max_lag_seconds: float | None = 10.0,
        max_wait: float = 0.005,
        pooling_guard: Literal["raise", "warn", "off"] = "raise",
        read_timeout: float | None = 5.0,
        allow_writable_replicas: bool = False,
        read_your_writes: ReadYourWrites = "session",
        causal_scope: str | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"ReplicaSet name must be a non-empty string, got {name!r}")
        if causal_scope is not None and (not isinstance(causal_scope, str) or not causal_scope):
            raise ConfigurationError(
                f"ReplicaSet {name!r}: causal_scope must be None or a non-empty string, "
                f"got {causal_scope!r}"
            )
        #: Where this primary's position sits in a token covering several primaries (None:
        #: the unscoped position of a plain LSN token).
        self.causal_scope: str | None = causal_scope
        if read_your_writes not in ("session", "process", "off"):
            raise ConfigurationError(
                f"ReplicaSet {name!r}: read_your_writes must be 'session', 'process' or "
                f"'off', got {read_your_writes!r}"
            )
        self.read_your_writes: ReadYourWrites = read_your_writes
        if pooling_guard not in ("raise", "warn", "off"):
            raise ConfigurationError(
                f"ReplicaSet {name!r}: pooling_guard must be 'raise', 'warn' or 'off', "
                f"got {pooling_guard!r}"
            )
        self._pooling_guard = pooling_guard
        where = f"ReplicaSet {name!r}"
        check_flag(where, "monitor", monitor)
        check_flag(where, "allow_writable_replicas", allow_writable_replicas)
        check_number(where, "monitor_interval", monitor_interval, zero=False)
        check_number(where, "max_wait", max_wait)
        check_number(where, "max_lag_seconds", max_lag_seconds, optional=True)
        check_number(where, "max_lag_bytes", max_lag_bytes, optional=True, integral=True)
        check_number(where, "read_timeout", read_timeout, optional=True, zero=False)
        self.name = name
        self._read_timeout = read_timeout
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
        #: True when the nodes are asyncio engines (use the async session factories).
        self.is_async: bool = self.primary.engine.dialect.is_async
        for node in self.replicas:
            if node.engine.dialect.is_async != self.is_async:
                kinds = ("async", "sync") if self.is_async else ("sync", "async")
                raise ConfigurationError(
                    f"ReplicaSet {name!r}: the primary is {kinds[0]} but replica "
                    f"{node.name!r} ({node.url}) is {kinds[1]}; give every node of a set "
                    "the same kind of URL or engine"
                )
        #: ``read_your_writes="process"``: the newest WAL position this process committed
        #: through the primary engine, a floor for every read (None in the other modes).
        self.process_position: ProcessPosition | None = None
        if read_your_writes == "process":
            self.process_position = install_process_position(self.primary.engine)
        self._usable: tuple[Node, ...] = tuple(self.replicas)
        self._fallback_logged = False
        self._state_lock = threading.Lock()
        self.max_wait = max_wait
        self.monitor: HealthMonitor | None = None
        if self.replicas:
            self.monitor = HealthMonitor(
                self,
                interval=monitor_interval,
                max_lag_bytes=max_lag_bytes,
                max_lag_seconds=max_lag_seconds,
                read_timeout=read_timeout,
                allow_writable_replicas=allow_writable_replicas,
            )
        # Started lazily, by the first read routed to a replica: no thread and no connection
        # for a ReplicaSet that is only constructed (or configured with monitor=False).
        self._monitor_wanted = monitor and self.monitor is not None
        # The replicas' server roles are checked once, at the first read routed to one.
        self._roles_unchecked = self.monitor is not None
        # Replicas taken out by a failed statement while no monitor runs, and when the
        # earliest of them may be tried again (None: nothing to re-admit; the fast path).
        self._failed: set[str] = set()
        self._retry_at: float | None = None
        #: Listeners called with every routing decision (see :meth:`on_decision`); a tuple,
        #: so routing reads it without a lock and an empty one costs a truth test.
        self.decision_listeners: tuple[DecisionListener, ...] = ()
        # The highest WAL position the primary is known to have reached (its monitor's
        # samples, the commits of routing sessions, check_causal_position): a causal token
        # up to it needs no check.
        self._primary_position = 0
        _REPLICA_SETS.add(self)
        if self.monitor is not None:
            # Dropped without dispose(): stop the monitor thread and close its connections
            # now, not when it next wakes up. (The monitor holds this set only weakly.)
            weakref.finalize(self, self.monitor.stop).atexit = False

    # -- construction -------------------------------------------------------------------

    def _engine_options(self, url: URL) -> dict[str, Any]:
        if isinstance(self._pool, str):
            from .pooling import pool_preset

            # engine_kwargs go in as overrides, so their connect_args merge with the preset's.
            return pool_preset(self._pool, driver=url.get_driver_name(), **self._engine_kwargs)
        options: dict[str, Any] = {} if self._pool is None else dict(self._pool)
        options.update(self._engine_kwargs)
        return options

    def _replica_connect_timeout(self, url: URL, options: dict[str, Any]) -> dict[str, Any]:
        # A frozen server completes the TCP handshake (the kernel does) and then never
        # answers: without libpq's connect_timeout a new connection to it waits for ever.
        # Bounded by read_timeout (libpq counts whole seconds, at least 2), unless given.
        read_timeout = self._read_timeout
        connect_args = dict(options.get("connect_args") or {})
        if (
            read_timeout is None
            or url.get_driver_name() not in ("psycopg2", "psycopg")
            or "connect_timeout" in connect_args
            or "connect_timeout" in url.query
        ):
            return options
        connect_args["connect_timeout"] = max(2, math.ceil(read_timeout))
        return {**options, "connect_args": connect_args}

    def _make_node(self, node_name: str, target: EngineTarget, *, role: Role) -> Node:
        where = f"ReplicaSet {self.name!r}, node {node_name!r}"
        if isinstance(target, AsyncEngine):
            # The session's sync side (AsyncSession's sync_session_class) runs on the
            # AsyncEngine's sync facade, in SQLAlchemy's greenlet.
            engine, owns = target.sync_engine, False
        elif isinstance(target, Engine):
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
            url = with_installed_driver(url)
            options = self._engine_options(url)
            if role == "replica":
                options = self._replica_connect_timeout(url, options)
            try:
                if url.get_dialect().is_async:
                    engine = create_async_engine(url, **options).sync_engine
                else:
                    engine = create_engine(url, **options)
            except ConfigurationError:
                raise
            except Exception as exc:
                raise ConfigurationError(
                    f"{where}: cannot build an engine for {render_url(url)}: {exc}"
                ) from exc
            owns = True
            if isinstance(self._pool, str) and self._pooling_guard != "off":
                from .pooling import guard_transaction_pooling, preset_needs_guard

                if preset_needs_guard(self._pool):
                    guard_transaction_pooling(engine, self._pooling_guard)
        else:
            raise ConfigurationError(
                f"{where}: expected a URL string, sqlalchemy URL, Engine or AsyncEngine, got {type(target).__name__}"
            )
        if engine.dialect.name != "postgresql":
            raise ConfigurationError(f"{where}: {render_url(engine)} is not a PostgreSQL engine")
        if owns:
            dispose_at_fork(engine)
        if role == "primary":
            install_primary_hooks(
                engine,
                set_name=self.name,
                node_name=node_name,
                owns_engine=owns,
                commit_positions=self.read_your_writes != "off",
            )
            return Node(node_name, engine, role=role, owns_engine=owns)
        if not owns:
            engine = read_only_view(engine)  # the user's engine and pool stay as they were
        node = Node(node_name, engine, role=role, owns_engine=owns, owns_pool=True)
        make_read_only(engine, node)
        # handle_error is a dialect event: the handler checks it is our engine that failed.
        event.listen(engine, "handle_error", replica_write_error(engine, self.name, node_name))
        track_connections(node)
        refuse_transaction_control(engine, self.name, node_name, owns=owns)
        return node

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
        from ._config import REPLICA_SET_KEYS, load_config  # _config builds ReplicaSets

        config = load_config(source)
        if section is not None:
            try:
                config = config[section]
            except KeyError:
                raise ConfigurationError(f"configuration has no [{section}] table") from None
        known = REPLICA_SET_KEYS | {"engine"}
        unknown = set(config) - known
        if unknown:
            raise ConfigurationError(
                f"unknown ReplicaSet configuration keys {sorted(unknown)}; expected {sorted(known)}"
            )
        if "primary" not in config:
            raise ConfigurationError("ReplicaSet configuration needs a 'primary' URL")
        options = {key: value for key, value in config.items() if key != "engine"}
        return cls(**options, **dict(config.get("engine", {})))

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

    def choose_replica(self, position: int | None = None) -> Node | None:
        """A usable replica picked by the policy, or None when none is usable.

        With ``position`` (a causal token's WAL position), only a replica known to have
        replayed it qualifies. If none is known to, one replica is asked for its replay
        LSN (one round trip) and polled for up to ``max_wait`` seconds; then None, and
        the caller reads from the primary.
        """
        if self._roles_unchecked:
            self._check_roles()
        if self._monitor_wanted:
            self._start_monitor()
        elif self._retry_at is not None and time.monotonic() >= self._retry_at:
            self._readmit_failed()
        usable = self._usable
        if position is not None and usable:
            return self._choose_caught_up(usable, position)
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

    def _choose_caught_up(self, usable: tuple[Node, ...], position: int) -> Node | None:
        caught_up = [n for n in usable if n.replay_lsn is not None and n.replay_lsn >= position]
        if caught_up:
            return self.policy(caught_up) if len(caught_up) > 1 else caught_up[0]
        monitor = self.monitor
        if monitor is None:
            return None
        # Wait only for a replica that can plausibly replay the token within max_wait: one
        # that was replaying when last seen and is not far behind it. Waiting for a paused
        # one costs every such read max_wait and ends on the primary anyway.
        hopeful = [
            n
            for n in usable
            if not n.replay_stalled
            and (n.replay_lsn is None or position - n.replay_lsn <= _CATCH_UP_BYTES)
        ]
        if not hopeful:
            return None
        candidate = self.policy(hopeful) if len(hopeful) > 1 else hopeful[0]
        deadline = time.monotonic() + self.max_wait
        # run_blocking()/pause() await on an asyncio session's event loop instead of blocking it.
        while True:
            lsn = run_blocking(
                monitor.refresh, candidate, wait=max(0.0, deadline - time.monotonic())
            )
            if lsn is not None and lsn >= position:
                return candidate
            if lsn is None or time.monotonic() >= deadline:
                return None
            pause(min(0.001, max(0.0, deadline - time.monotonic())))

    def position_after_commit(
        self, connection: Connection | None, *, by_driver: bool = True
    ) -> int | None:
        """The primary's WAL position after a routing session's write transaction committed
        on ``connection``, by this set's ``read_your_writes`` mode (None: not recorded).

        ``by_driver=False`` for a commit sent as a statement (``COMMIT PREPARED`` on an
        autocommit connection): nothing was read with it, and a position left on the
        connection by an earlier commit is not its own, so it is read afresh.
        """
        if self.read_your_writes == "off":
            return None
        if not by_driver:
            return commit_position(connection)
        # Read with the COMMIT itself (psycopg 3), else by the process-wide tracker (which
        # keeps it for us, once), else one more round trip. Both are taken, so neither is
        # left behind for a later commit.
        pipelined = take_commit_position(connection)
        tracked = None
        if self.process_position is not None and connection is not None:
            dbapi_connection = None if connection.invalidated else connection.connection
            if dbapi_connection is not None:
                tracked = self.process_position.take_commit_position(
                    dbapi_connection.dbapi_connection
                )
        if pipelined is not None:
            return pipelined
        if tracked is not None:
            return tracked
        return commit_position(connection)

    def _check_roles(self) -> None:
        # First use: one round of probes before the first read goes to a replica, so a replica
        # URL that names a writable server is out of rotation before anything is sent to it.
        # Only roles are acted on (lag and failures are the monitor's and routing's business);
        # other threads do not wait for it.
        with self._state_lock:
            if not self._roles_unchecked or self.monitor is None:
                return
            self._roles_unchecked = False
        self.monitor.check(roles_only=True)

    def note_primary_position(self, position: int) -> None:
        """Record that the primary has reached ``position`` (a commit's, a probe's)."""
        if position > self._primary_position:
            self._primary_position = position

    def quiet_fallback(self) -> None:
        """Log no WARNING when reads fall back to the primary: for a replica set without
        replicas by design (a shard)."""
        self._fallback_logged = True

    def check_causal_position(self, position: int) -> int:
        """``position`` if the primary may have reached it; else the primary's own position.

        A causal token ahead of the primary was made by no commit (forged, or from another
        cluster): honouring it would send every read carrying it to the primary until the
        primary got there. It is logged once and ignored from then on
        (:func:`~sqlalchemy_scale.consistency.reject_position`). Costs one round trip to the
        primary only for a token ahead of every position the primary is known to have
        reached; if the primary cannot answer, the token is kept.
        """
        if position <= self._primary_position:
            return position
        try:
            current = read_primary_position(self.primary.engine)
        except Exception as exc:  # cannot tell: keep the token (its reads go to the primary)
            log.debug("%s: cannot check a causal token: %s", self.name, type(exc).__name__)
            return position
        self.note_primary_position(current)
        if position <= current:
            return position
        reject_position(position, primary=current, where=repr(self.name), scope=self.causal_scope)
        return current

    def _start_monitor(self) -> None:
        with self._state_lock:
            if not self._monitor_wanted or self.monitor is None:
                return
            self._monitor_wanted = False
            self.monitor.start()

    def mark_down(self, node: Node, exc: BaseException) -> None:
        """Take a replica out of rotation after it failed a statement.

        The monitor's circuit breaker brings it back once it answers again. Without a
        running monitor (``monitor=False``), routing itself lets it back in after the
        breaker's backoff, and a new failure takes it out again for twice as long.
        """
        if self.monitor is not None:
            self.monitor.mark_down(node, exc)
            if not self.monitor.is_running:
                retry_at = self.monitor.retry_at(node)
                with self._state_lock:
                    self._failed.add(node.name)
                    self._retry_at = min(retry_at, self._retry_at or retry_at)
        self.set_usable(node, False, reason=f"failed a statement: {type(exc).__name__}")

    def _readmit_failed(self) -> None:
        assert self.monitor is not None  # only monitors schedule retries
        now = time.monotonic()
        with self._state_lock:
            due = [
                n
                for n in self.replicas
                if n.name in self._failed and self.monitor.retry_at(n) <= now
            ]
            self._failed.difference_update(n.name for n in due)
            later = [self.monitor.retry_at(n) for n in self.replicas if n.name in self._failed]
            self._retry_at = min(later) if later else None
        for node in due:
            node.is_down = False  # half-open: the next read may connect and try it
            self.set_usable(node, True, reason="retrying after the breaker's backoff")

    def health(self, *, refresh: bool = True) -> list[NodeHealth]:
        """Each node's server-reported role, lag, state and last error.

        With ``refresh`` (the default) one monitor sweep runs first (one short query per
        node), so the answer is current even when the monitor thread is off.
        """
        if self.monitor is None:
            monitor = HealthMonitor(self, interval=1.0)
            try:
                monitor.check()
                return [monitor.health(self.primary)]
            finally:
                monitor.stop()
        if refresh:
            self.monitor.check()
        return [self.monitor.health(node) for node in self.nodes]

    # -- observability and lifecycle -----------------------------------------------------

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per node.

        ``statements`` routed to it; ``fallbacks`` (on the primary): reads it served
        because no replica was usable or caught up; ``retries``: reads that failed on this
        replica and ran again elsewhere; ``breaker_openings``: times the circuit breaker
        took it out as down. For replicas the monitor has measured, ``lag_bytes`` and
        ``lag_ms`` as last seen (no query is sent).
        """
        stats = {node.name: node.stats() for node in self.nodes}
        if self.monitor is not None:
            for node in self.replicas:
                health = self.monitor.health(node)
                if health.lag_bytes is not None:
                    stats[node.name]["lag_bytes"] = health.lag_bytes
                if health.lag_seconds is not None:
                    stats[node.name]["lag_ms"] = round(health.lag_seconds * 1000)
        return stats

    def on_decision(self, listener: _Listener) -> _Listener:
        """Call ``listener`` with every routing decision made over this replica set (a
        :class:`~sqlalchemy_scale.RoutingDecision`); returns it, so it works as a decorator.
        Remove it with :meth:`remove_decision_listener`. See :mod:`sqlalchemy_scale.decisions`.

        .. versionadded:: 0.1
        """
        with self._state_lock:
            self.decision_listeners = (*self.decision_listeners, listener)
        return listener

    def remove_decision_listener(self, listener: DecisionListener) -> None:
        """Stop calling ``listener``; ``ValueError`` if it was not listening."""
        with self._state_lock:
            listeners = list(self.decision_listeners)
            listeners.remove(listener)
            self.decision_listeners = tuple(listeners)

    def reset_stats(self) -> None:
        for node in self.nodes:
            node.reset_stats()

    def dispose(self) -> None:
        """Stop the health monitor and close the pools this ReplicaSet created: its engines'
        and its read-only views' of replica engines it was given (never a given engine's
        own pool)."""
        self._monitor_wanted = False
        if self.monitor is not None:
            self.monitor.stop()
        for node in self.nodes:
            if node.owns_pool:
                node.engine.dispose()

    async def adispose(self) -> None:
        """:meth:`dispose` for an async ReplicaSet, awaited on the event loop that used its
        engines (an asyncio connection can only be closed on its own loop)."""
        self._monitor_wanted = False
        if self.monitor is not None:
            await asyncio.to_thread(self.monitor.stop)  # joins the monitor thread
        for node in self.nodes:
            if node.owns_pool:
                await greenlet_spawn(node.engine.dispose)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.adispose()

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __repr__(self) -> str:
        replicas = ", ".join(r.url for r in self.replicas)
        return f"<ReplicaSet {self.name} primary={self.primary.url} replicas=[{replicas}]>"


_REPLICA_SETS: weakref.WeakSet[ReplicaSet] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child gets fresh locks (the parent's may be held at the fork). Nodes reset
    # their own, and the pools this package made are dropped by _engines.
    for replica_set in list(_REPLICA_SETS):
        replica_set._state_lock = threading.Lock()  # noqa: SLF001 (this module's class)


os.register_at_fork(after_in_child=_after_fork_in_child)
