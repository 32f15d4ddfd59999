"""A node: one server of a replica set, with its engine, counters and health state.

A :class:`Node` is what routing picks and what the health monitor watches: its name
and role, the :class:`~sqlalchemy.engine.Engine` that reaches it, the statements routed
to it, and whether it is in rotation. It also knows the DB-API connections open to it
(weakly), so that the monitor can shut down the sockets a frozen server holds
(``read_timeout``). Nodes are made by :class:`~sqlalchemy_scale.ReplicaSet`
(:mod:`sqlalchemy_scale.topology`); which engine a node gets, and how a replica's is made
read-only, is :mod:`sqlalchemy_scale._engines`' business.

When *not* to use it: applications read nodes (``node.name``, ``node.engine``,
``replica_set.stats()``); they do not construct them.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, Literal

from sqlalchemy.engine import Engine

from .errors import render_url

__all__ = ["Node", "Role", "shutdown_socket"]

Role = Literal["primary", "replica"]

# Every node, weakly: a forked child gets fresh locks (the parent's may be held).
_NODES: weakref.WeakSet[Node] = weakref.WeakSet()


class Node:
    """One server: its name, role, engine, counters and health state.

    Nodes are made by :class:`ReplicaSet`; applications read them (``node.name``,
    ``node.engine``) but do not construct them.
    """

    def __init__(
        self,
        name: str,
        engine: Engine,
        *,
        role: Role,
        owns_engine: bool,
        owns_pool: bool | None = None,
    ) -> None:
        self.name = name
        self.role: Role = role
        #: ``role == "replica"`` (an attribute: routing reads it for every statement).
        self.is_replica = role == "replica"
        self.engine = engine
        #: True when the ReplicaSet built the engine (and disposes of it).
        self.owns_engine = owns_engine
        #: True when the engine's pool is the ReplicaSet's to dispose of: an engine it built,
        #: or the read-only view of a user's replica engine (a pool of its own).
        self.owns_pool = owns_engine if owns_pool is None else owns_pool
        #: False while health checks keep this node out of rotation.
        self.is_usable = True
        #: The newest replay LSN the health monitor has seen (replicas), or None.
        self.replay_lsn: int | None = None
        #: True while the circuit breaker is open (the node failed and has not answered since).
        self.is_down = False
        #: True when the monitor last saw this replica behind the primary without having
        #: replayed anything since its previous look (replay paused or stuck).
        self.replay_stalled = False
        self._lock = threading.Lock()
        # Statements routed here: next() on an itertools.count is atomic under CPython, so
        # routing counts without taking the lock (once per statement); see stats().
        self._statements = itertools.count()
        #: Count one statement routed here (:meth:`count` without its Python frame).
        self.count_statement: Callable[[], int] = self._statements.__next__
        self._fallbacks = 0
        # The DB-API connections opened to this node (its pool's and the monitor's), weakly,
        # so that abort_connections() can free the threads a frozen server holds.
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        #: True once the health monitor has seen this replica's server accept writes
        #: (promoted, or a URL naming a primary); see :meth:`note_writable`.
        self.seen_writable = False
        self._when_writable: list[Callable[[], None]] = []
        self._retries = 0
        self._breaker_openings = 0
        _NODES.add(self)

    @property
    def url(self) -> str:
        """The node's URL with the password masked."""
        return render_url(self.engine)

    def checked_out(self) -> int:
        """Connections of this node's pool currently in use (0 for pools that do not count)."""
        checkedout = getattr(self.engine.pool, "checkedout", None)
        return int(checkedout()) if checkedout is not None else 0

    def track_connection(self, dbapi_connection: Any) -> None:
        """Remember a DB-API connection to this node for :meth:`abort_connections`.

        Async drivers' adapted connections take no weak reference and expose no socket:
        they are not tracked, so ``read_timeout`` does not cut a frozen replica's reads
        short under asyncio (the README says so)."""
        try:
            with self._lock:
                self._connections.add(dbapi_connection)
        except TypeError:
            return

    def abort_connections(self) -> int:
        """Shut down the socket of every open connection to this node; return how many.

        A thread blocked reading from the node (a frozen server) then gets a lost-connection
        error at once. The sockets are shut down, not closed: each driver still owns its file
        descriptor and closes it itself. Used by the health monitor for a replica that has not
        answered for ``read_timeout`` seconds.
        """
        with self._lock:
            connections = list(self._connections)
        aborted = 0
        for dbapi_connection in connections:
            if shutdown_socket(dbapi_connection):
                aborted += 1
        return aborted

    def when_writable(self, action: Callable[[], None]) -> None:
        """Run ``action`` (once) when the monitor first sees this node's server accept writes."""
        self._when_writable.append(action)

    def note_writable(self) -> None:
        """The monitor saw this node's server accept writes: run the :meth:`when_writable`
        actions, the first time only."""
        with self._lock:
            if self.seen_writable:
                return
            self.seen_writable = True
            actions, self._when_writable = self._when_writable, []
        for action in actions:
            action()

    def count(self, *, fallback: bool = False) -> None:
        """A statement was routed here (``fallback``: a read no replica could serve)."""
        self.count_statement()
        if fallback:
            with self._lock:
                self._fallbacks += 1

    def count_retry(self) -> None:
        """A read that failed on this node was run again on another."""
        with self._lock:
            self._retries += 1

    def count_breaker_opening(self) -> None:
        """The health monitor's circuit breaker opened for this node (it went down)."""
        with self._lock:
            self._breaker_openings += 1

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "statements": _current(self._statements),
                "fallbacks": self._fallbacks,
                "retries": self._retries,
                "breaker_openings": self._breaker_openings,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._statements = itertools.count()
            self.count_statement = self._statements.__next__
            self._fallbacks = self._retries = self._breaker_openings = 0

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role} {self.url}>"


def _current(counter: itertools.count[int]) -> int:
    """The value an :func:`itertools.count` would return next, without advancing it (its
    repr is ``count(N)``; made under the GIL, like ``next()``, so it is exact)."""
    return int(repr(counter)[6:-1])


def shutdown_socket(dbapi_connection: Any) -> bool:
    """Shut down the socket under a DB-API connection; True if it was open and is now shut."""
    # psycopg2 and psycopg 3 both expose the socket as fileno() (and closed); shutdown acts
    # on the socket itself, so shutting down a duplicate descriptor is enough, and the
    # driver keeps ownership of its own descriptor.
    try:
        if dbapi_connection.closed:
            return False
        fd = dbapi_connection.fileno()
        sock = socket.socket(fileno=os.dup(fd))
    except Exception:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _after_fork_in_child() -> None:
    for node in list(_NODES):
        node._lock = threading.Lock()  # noqa: SLF001 (this module's class)


os.register_at_fork(after_in_child=_after_fork_in_child)
