"""Replica health: a lag probe, a circuit breaker and the monitor thread that runs them.

Every ``interval`` seconds the monitor asks the primary for ``pg_current_wal_lsn()``
and each replica for ``pg_last_wal_replay_lsn()`` (and ``pg_is_in_recovery()``, so
the role it reports is the server's, not our configuration's). From those it keeps,
per replica:

- the replay LSN, which causal routing compares with tokens without a round trip;
- lag in bytes (primary LSN minus replay LSN) and in seconds: how long ago the
  primary was where the replica is now, from the monitor's own samples of the
  primary's position. (``now() - pg_last_xact_replay_timestamp()`` is not used: it
  grows on an idle primary although nothing is behind.)

A replica beyond ``max_lag_bytes`` / ``max_lag_seconds`` leaves the rotation and
returns when it is back within bounds. A replica that cannot be reached, or that
failed a read, is *down*: the circuit is open and it is probed again after a backoff
that doubles up to ``max_backoff``; the first successful probe closes the circuit.

The monitor runs on its own small pool per node (one connection), never the
application's pools, and routing never waits for it. It is a daemon thread and is
restarted in a child process after :func:`os.fork` (gunicorn ``--preload``).
Each state change is logged once, with the node's name and never its URL's password.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from .consistency import format_lsn, reachable_position

if TYPE_CHECKING:
    from .topology import Node, ReplicaSet

__all__ = ["HealthMonitor", "NodeHealth", "NodeState"]

log = logging.getLogger("sqlalchemy_scale.health")

NodeState = Literal["up", "lagging", "down", "unknown"]

# The primary's position as replicas can reach it: what is flushed (and so streamed), or
# inserted under synchronous_commit = off. An unflushed insert position would count as lag
# that no replica can make up until the next flush, and a page-header offset as lag that
# never ends on an idle primary (see consistency.reachable_position).
_PRIMARY_PROBE = text(
    "SELECT CASE WHEN current_setting('synchronous_commit') = 'off'"
    " THEN pg_current_wal_insert_lsn() ELSE pg_current_wal_flush_lsn() END::text,"
    " pg_is_in_recovery(), current_setting('wal_block_size')::int"
)
# On a server that is not in recovery (a promoted or misconfigured replica) the replay
# LSN is NULL; its current LSN stands in so that it is never "behind" itself.
_REPLICA_PROBE = text(
    "SELECT coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text,"
    " pg_is_in_recovery(), current_setting('wal_block_size')::int"
)
_HISTORY = 4096  # primary LSN samples kept for lag-in-seconds (~14 min at 0.2 s)


@dataclass(frozen=True)
class NodeHealth:
    """One node as the monitor last saw it (see :meth:`ReplicaSet.health`)."""

    name: str
    configured_role: Literal["primary", "replica"]
    server_role: Literal["primary", "replica"] | None
    state: NodeState
    in_rotation: bool
    lsn: str | None
    lag_bytes: int | None
    lag_seconds: float | None
    last_error: str | None
    checked_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Probe:
    """Per-node monitor state: its own engine and circuit breaker.

    The engine is a copy of the node's (same URL, ``connect_args``, creator and pool class,
    via :meth:`~sqlalchemy.pool.Pool.recreate`) with a pool of its own, so probes never take
    the application's connections and credentials given outside the URL still work.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.engine: Engine = create_engine(node.engine.url, pool=node.engine.pool.recreate())
        self.lock = threading.Lock()
        self.state: NodeState = "unknown"
        self.server_role: Literal["primary", "replica"] | None = None
        self.lsn: int | None = None
        self.lag_bytes: int | None = None
        self.lag_seconds: float | None = None
        self.last_error: str | None = None
        self.checked_at: float | None = None
        self.backoff = 0.0
        self.retry_at = 0.0

    def query(self, probe: Any, *, wait: float = -1) -> tuple[int, bool] | None:
        """Run ``probe`` on this node's own connection; None if the connection is busy
        (another probe of this node is still running) for longer than ``wait`` seconds."""
        if not self.lock.acquire(timeout=wait):
            return None
        try:
            with self.engine.connect() as conn:
                lsn, in_recovery, block_size = conn.execute(probe).one()
        finally:
            self.lock.release()
        return reachable_position(lsn, block_size), bool(in_recovery)


class HealthMonitor:
    """Keeps a :class:`~sqlalchemy_scale.ReplicaSet`'s replicas' LSNs, lag and state fresh.

    Created and started by the ReplicaSet (``monitor=True``); :meth:`check` runs one
    sweep synchronously, which tests and ``health()`` use.
    """

    _instances: ClassVar[weakref.WeakSet[HealthMonitor]] = weakref.WeakSet()

    def __init__(
        self,
        replica_set: ReplicaSet,
        *,
        interval: float = 0.2,
        max_lag_bytes: int | None = None,
        max_lag_seconds: float | None = 10.0,
        min_backoff: float = 0.5,
        max_backoff: float = 10.0,
        probe_timeout: float = 2.0,
    ) -> None:
        self._replica_set = weakref.ref(replica_set)
        self.probe_timeout = probe_timeout
        # Probes run on these threads, so a node that hangs (a frozen server, a dead network)
        # delays neither the other nodes' probes nor a routing decision beyond its bound.
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self.name = replica_set.name
        self.interval = interval
        self.max_lag_bytes = max_lag_bytes
        self.max_lag_seconds = max_lag_seconds
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._probes: dict[str, _Probe] = {n.name: _Probe(n) for n in replica_set.nodes}
        self._history: collections.deque[tuple[float, int]] = collections.deque(maxlen=_HISTORY)
        self._sweep_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        HealthMonitor._instances.add(self)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"sqlalchemy-scale-monitor-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        for probe in self._probes.values():
            probe.engine.dispose()

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=2 * len(self._probes),  # room for fresh probes beside hung ones
                    thread_name_prefix=f"sqlalchemy-scale-probe-{self.name}",
                )
            return self._executor

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the monitor must outlive any surprise; routing never waits on it
                log.exception("health monitor of %s: sweep failed", self.name)

    def _after_fork_in_child(self) -> None:
        was_running = self._thread is not None
        self._thread = None
        self._executor = None  # its threads did not survive the fork
        self._executor_lock = threading.Lock()
        self._sweep_lock = threading.Lock()
        for probe in self._probes.values():
            probe.lock = threading.Lock()
            probe.engine.dispose(close=False)  # the parent's sockets are not ours
        if was_running and not self._stop.is_set():
            self.start()

    # -- probing -----------------------------------------------------------------------

    def check(self) -> None:
        """Probe the primary and every replica due for a probe, concurrently, each bounded by
        ``probe_timeout``; then apply the results."""
        replica_set = self._replica_set()
        if replica_set is None:
            self._stop.set()
            return
        with self._sweep_lock:
            now = time.monotonic()
            due = [
                node
                for node in replica_set.replicas
                if not (
                    self._probes[node.name].state == "down"
                    and now < self._probes[node.name].retry_at
                )
            ]
            pool = self._pool()
            primary = self._probes[replica_set.primary.name]
            # A probe may wait for its node's connection (an on-demand refresh may hold it
            # for a moment); the sweep as a whole waits probe_timeout, not longer.
            limit = self.probe_timeout
            futures = {primary.node.name: pool.submit(primary.query, _PRIMARY_PROBE, wait=limit)}
            for node in due:
                probe = self._probes[node.name]
                futures[node.name] = pool.submit(probe.query, _REPLICA_PROBE, wait=limit)
            wait(futures.values(), timeout=self.probe_timeout)
            primary_lsn = self._apply_primary(
                primary, self._outcome(futures[primary.node.name]), now
            )
            if primary_lsn is not None:
                replica_set.note_primary_position(primary_lsn)
            for node in due:
                answer = self._outcome(futures[node.name])
                self._apply_replica(replica_set, node, answer, primary_lsn, now)

    def _outcome(self, future: Future[tuple[int, bool] | None]) -> tuple[int, bool] | BaseException:
        if not future.done():
            return TimeoutError(f"no answer within {self.probe_timeout:.1f} s")
        exc = future.exception()
        if exc is not None:
            return exc
        answer = future.result()
        if answer is None:
            return TimeoutError("the previous probe of this node has still not answered")
        return answer

    def _apply_primary(
        self, probe: _Probe, answer: tuple[int, bool] | BaseException, now: float
    ) -> int | None:
        if isinstance(answer, BaseException):
            self._fail(probe, answer, now)
            return None
        lsn, in_recovery = answer
        self._recover(probe, "up", now)
        probe.server_role = "replica" if in_recovery else "primary"
        probe.lsn = lsn
        if not self._history or self._history[-1][1] != lsn:
            self._history.append((now, lsn))
        return lsn

    def _apply_replica(
        self,
        replica_set: ReplicaSet,
        node: Node,
        answer: tuple[int, bool] | BaseException,
        primary_lsn: int | None,
        now: float,
    ) -> None:
        probe = self._probes[node.name]
        if isinstance(answer, BaseException):
            self._fail(probe, answer, now)
            replica_set.set_usable(node, False, reason=f"down: {probe.last_error}")
            return
        lsn, in_recovery = answer
        probe.server_role = "replica" if in_recovery else "primary"
        advanced = node.replay_lsn is None or lsn > node.replay_lsn
        self._observe_lsn(node, probe, lsn)
        if primary_lsn is None:
            probe.lag_bytes = probe.lag_seconds = None
        else:
            probe.lag_bytes = max(0, primary_lsn - lsn)
            probe.lag_seconds = self._lag_seconds(lsn, now)
        # Behind the primary and not replaying (paused, or stuck on a conflict): routing
        # sends causal reads it cannot serve to the primary at once instead of waiting.
        node.replay_stalled = bool(probe.lag_bytes) and not advanced
        too_far = self._too_far_behind(probe)
        self._recover(probe, "lagging" if too_far else "up", now)
        replica_set.set_usable(node, not too_far, reason=too_far or "")

    def _too_far_behind(self, probe: _Probe) -> str | None:
        if (
            self.max_lag_bytes is not None
            and probe.lag_bytes is not None
            and probe.lag_bytes > self.max_lag_bytes
        ):
            return f"{probe.lag_bytes} bytes behind (max_lag_bytes={self.max_lag_bytes})"
        if (
            self.max_lag_seconds is not None
            and probe.lag_seconds is not None
            and probe.lag_seconds > self.max_lag_seconds
        ):
            return f"{probe.lag_seconds:.1f} s behind (max_lag_seconds={self.max_lag_seconds})"
        return None

    def _lag_seconds(self, replay_lsn: int, now: float) -> float:
        # The earliest sample at which the primary was already past the replica's position.
        for sampled_at, lsn in self._history:
            if lsn > replay_lsn:
                return now - sampled_at
        return 0.0

    def _observe_lsn(self, node: Node, probe: _Probe, lsn: int) -> None:
        probe.lsn = lsn
        # Monotonic: a late answer must not move the position backwards.
        if node.replay_lsn is None or lsn > node.replay_lsn:
            node.replay_lsn = lsn
            node.replay_stalled = False

    def _fail(self, probe: _Probe, exc: BaseException, now: float) -> None:
        probe.last_error = _describe(exc)
        probe.backoff = (
            self.min_backoff if probe.state != "down" else min(probe.backoff * 2, self.max_backoff)
        )
        probe.retry_at = now + probe.backoff
        probe.checked_at = now
        if probe.state != "down":
            log.warning(
                "%s: node %s is down (%s); next probe in %.1f s",
                self.name,
                probe.node.name,
                probe.last_error,
                probe.backoff,
            )
        probe.state = "down"

    def _recover(self, probe: _Probe, state: NodeState, now: float) -> None:
        if probe.state == "down":
            log.info("%s: node %s answers again", self.name, probe.node.name)
            # Pooled connections from before the outage are dead: drop them now rather than
            # let the first reads after the node's return find out (and take it down again).
            # Only for engines we made: a user's engine (and its pool) is theirs to manage.
            if probe.node.owns_engine:
                probe.node.engine.dispose()
        probe.state = state
        probe.backoff = 0.0
        probe.checked_at = now

    # -- used by routing -----------------------------------------------------------------

    def retry_at(self, node: Node) -> float:
        """When the breaker of a node that is down allows the next try (``time.monotonic()``)."""
        return self._probes[node.name].retry_at

    def mark_down(self, node: Node, exc: BaseException) -> None:
        """Open the circuit for a node that failed a statement (called by routing)."""
        probe = self._probes.get(node.name)
        if probe is not None:
            self._fail(probe, exc, time.monotonic())

    def refresh(self, node: Node, *, wait: float = 2.0) -> int | None:
        """Ask one replica for its replay LSN now (one round trip); None if it cannot
        answer within ``wait`` seconds. Routing passes its ``max_wait``, so a slow or frozen
        replica never holds up a read; a late answer still updates the node when it comes."""
        probe = self._probes[node.name]
        future = self._pool().submit(probe.query, _REPLICA_PROBE, wait=wait)
        try:
            answer = future.result(timeout=wait)
        except TimeoutError:
            future.add_done_callback(lambda done: self._late_answer(node, probe, done))
            return None
        except Exception as exc:
            self._fail(probe, exc, time.monotonic())
            return None
        if answer is None:
            return None
        self._observe_lsn(node, probe, answer[0])
        return node.replay_lsn

    def _late_answer(
        self, node: Node, probe: _Probe, future: Future[tuple[int, bool] | None]
    ) -> None:
        if not future.cancelled() and future.exception() is None:
            answer = future.result()
            if answer is not None:
                self._observe_lsn(node, probe, answer[0])

    # -- reporting -------------------------------------------------------------------------

    def health(self, node: Node) -> NodeHealth:
        probe = self._probes[node.name]
        return NodeHealth(
            name=node.name,
            configured_role=node.role,
            server_role=probe.server_role,
            state=probe.state,
            in_rotation=node.is_usable if node.is_replica else probe.state != "down",
            lsn=format_lsn(probe.lsn) if probe.lsn is not None else None,
            lag_bytes=probe.lag_bytes,
            lag_seconds=probe.lag_seconds,
            last_error=probe.last_error,
            checked_at=probe.checked_at,
        )


def _describe(exc: BaseException) -> str:
    """A one-line reason without URLs or passwords (driver messages name host and port only)."""
    orig = getattr(exc, "orig", None) or exc
    message = " ".join(str(orig).split())
    return f"{type(orig).__name__}: {message[:200]}"


def _reinit_monitors_after_fork() -> None:
    for monitor in list(HealthMonitor._instances):
        monitor._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_monitors_after_fork)
