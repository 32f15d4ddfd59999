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
returns when it is back within bounds. So does, at once, a replica that streamed and now
has no streaming WAL receiver (``pg_stat_wal_receiver``) while the primary answers: it
follows a primary that is gone. A replica that cannot be reached, or that failed a read,
is *down*: the circuit is open and it is probed again after a backoff that doubles, per
failed retry (one outage is one step however many reads failed in it), up to
``max_backoff``; the first successful probe closes the circuit. A replica down for
``read_timeout`` seconds (a frozen server never closes its connections) gets its
connections' sockets shut down, so the reads it holds fail over.

A configured replica whose server is not in recovery (promoted, or a URL naming a primary)
is ``writable``, not lagging, and out of rotation unless ``allow_writable_replicas``. Two
different servers of a set accepting writes is reported as split brain (an ERROR once per
change, and :attr:`NodeHealth.split_brain`).

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
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from sqlalchemy import text
from sqlalchemy.engine import Engine

from ._async_bridge import is_async_engine, probe_engine
from .consistency import format_lsn, reachable_position
from .errors import mask_secrets

if TYPE_CHECKING:
    from .topology import Node, ReplicaSet

__all__ = ["HealthMonitor", "NodeHealth", "NodeState"]

log = logging.getLogger("sqlalchemy_scale.health")

#: ``up``: in recovery and within bounds; ``lagging``: behind (or not receiving WAL) and out
#: of rotation; ``down``: not answering; ``writable``: a configured replica whose server is not
#: in recovery (promoted, or a URL naming a primary); ``unknown``: not probed yet.
NodeState = Literal["up", "lagging", "down", "writable", "unknown"]

# The last column of both probes tells servers apart (two URLs may name one server, e.g. a
# multi-host primary URL that now reaches a promoted replica): address, port and postmaster
# start time.
_SERVER_ID = "concat_ws(' ', inet_server_addr(), inet_server_port(), pg_postmaster_start_time())"
# The primary's position as replicas can reach it: what is flushed (and so streamed), or
# inserted under synchronous_commit = off. An unflushed insert position would count as lag
# that no replica can make up until the next flush, and a page-header offset as lag that
# never ends on an idle primary (see consistency.reachable_position).
# A "primary" that is in recovery (a failover nobody told us about) answers with its replay
# position rather than failing, so that it is reported as the replica it is, not as down.
_PRIMARY_PROBE = text(
    "SELECT CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_replay_lsn(), '0/0')"
    " WHEN current_setting('synchronous_commit') = 'off'"
    " THEN pg_current_wal_insert_lsn() ELSE pg_current_wal_flush_lsn() END::text,"
    " pg_is_in_recovery(), current_setting('wal_block_size')::int, NULL::text, " + _SERVER_ID
)
# A promoted replica keeps a replay LSN (it is not NULL after promotion) that no longer moves,
# so only a server in recovery is asked for it. The WAL receiver's status: no row when no
# receiver runs (the primary is gone, or replication is not configured); without the
# pg_read_all_stats privilege the row is visible but its status is NULL ('hidden').
_REPLICA_PROBE = text(
    "SELECT CASE WHEN pg_is_in_recovery()"
    " THEN coalesce(pg_last_wal_replay_lsn(), '0/0'::pg_lsn) ELSE pg_current_wal_lsn() END::text,"
    " pg_is_in_recovery(), current_setting('wal_block_size')::int,"
    " (SELECT coalesce(status, 'hidden') FROM pg_stat_wal_receiver), " + _SERVER_ID
)
#: True while a health probe connects: the one connection a replica that is down still gets
#: (see topology's refusal to open new connections to a node whose breaker is open).
PROBING: ContextVar[bool] = ContextVar("sqlalchemy_scale_probing", default=False)

_HISTORY = 4096  # primary LSN samples kept for lag-in-seconds (~14 min at 0.2 s)


@dataclass(frozen=True)
class _Answer:
    lsn: int
    in_recovery: bool
    receiver: str | None  # the WAL receiver's status (replicas), None when none runs
    server: str


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
    #: The WAL receiver's status (``streaming``, ``waiting``, ..., ``hidden`` without the
    #: ``pg_read_all_stats`` privilege), None for the primary or when no receiver runs.
    receiver: str | None = None
    #: The circuit breaker's current step in seconds (0 while the node answers).
    backoff: float = 0.0
    #: True when this node accepts writes and another server of the set does too (the old
    #: primary came back after a promotion): writes may be split between two servers.
    split_brain: bool = False

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
        # An async node's engine cannot run on the monitor's threads: probe_engine() gives
        # them a sync-driver engine on the same server instead.
        self.engine: Engine = probe_engine(node.engine)
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
        self.receiver: str | None = None
        self.has_streamed = False  # a WAL receiver was seen: replication is configured
        self.server: str | None = None
        self.answered_at: float | None = None
        self.aborted = False  # this outage's connections were already aborted

    def query(self, probe: Any, *, wait: float = -1) -> _Answer | None:
        """Run ``probe`` on this node's own connection; None if the connection is busy
        (another probe of this node is still running) for longer than ``wait`` seconds."""
        if not self.lock.acquire(timeout=wait):
            return None
        probing = PROBING.set(True)
        try:
            with self.engine.connect() as conn:
                lsn, in_recovery, block_size, receiver, server = conn.execute(probe).one()
        finally:
            PROBING.reset(probing)
            self.lock.release()
        return _Answer(reachable_position(lsn, block_size), bool(in_recovery), receiver, server)


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
        read_timeout: float | None = 5.0,
        allow_writable_replicas: bool = False,
    ) -> None:
        self._replica_set = weakref.ref(replica_set)
        self.probe_timeout = probe_timeout
        self.read_timeout = read_timeout
        self.allow_writable_replicas = allow_writable_replicas
        self._split_brain: tuple[str, ...] = ()
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
        self._started_at = time.monotonic()
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

    def check(self, *, roles_only: bool = False) -> None:
        """Probe the primary and every replica due for a probe, concurrently, each bounded by
        ``probe_timeout``; then apply the results.

        With ``roles_only`` (a set's first use) only a replica found writable is acted on;
        lag, failures and rotation are left to the monitor's sweeps and to routing.
        """
        replica_set = self._replica_set()
        if replica_set is None:  # dropped without dispose(): close what we opened
            self.stop()
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
            if roles_only:
                for node in due:
                    answer = self._outcome(futures[node.name])
                    if not isinstance(answer, _Answer):
                        continue
                    probe = self._probes[node.name]
                    if not answer.in_recovery:
                        self._apply_writable(replica_set, node, probe, answer, now)
                    elif answer.receiver is not None:
                        probe.has_streamed = True  # replication is configured: see _not_receiving
                return
            primary_answer = self._outcome(futures[primary.node.name])
            primary_lsn = self._apply_primary(primary, primary_answer, now)
            if primary_lsn is not None:
                replica_set.note_primary_position(primary_lsn)
            for node in due:
                answer = self._outcome(futures[node.name])
                self._apply_replica(replica_set, node, answer, primary_lsn, now)
            self._check_split_brain(replica_set)
            self._abort_unresponsive(replica_set, now)

    def _outcome(self, future: Future[_Answer | None]) -> _Answer | BaseException:
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
        self, probe: _Probe, answer: _Answer | BaseException, now: float
    ) -> int | None:
        if isinstance(answer, BaseException):
            self._fail(probe, answer, now)
            return None
        lsn = answer.lsn
        self._recover(probe, "up", now)
        probe.server_role = "replica" if answer.in_recovery else "primary"
        probe.server = answer.server
        probe.lsn = lsn
        if not self._history or self._history[-1][1] != lsn:
            self._history.append((now, lsn))
        return lsn

    def _apply_replica(
        self,
        replica_set: ReplicaSet,
        node: Node,
        answer: _Answer | BaseException,
        primary_lsn: int | None,
        now: float,
    ) -> None:
        probe = self._probes[node.name]
        if isinstance(answer, BaseException):
            self._fail(probe, answer, now)
            replica_set.set_usable(node, False, reason=f"down: {probe.last_error}")
            return
        probe.server = answer.server
        probe.receiver = answer.receiver
        if not answer.in_recovery:
            self._apply_writable(replica_set, node, probe, answer, now)
            return
        probe.server_role = "replica"
        advanced = node.replay_lsn is None or answer.lsn > node.replay_lsn
        self._observe_lsn(node, probe, answer.lsn)
        if primary_lsn is None:
            probe.lag_bytes = probe.lag_seconds = None
        else:
            probe.lag_bytes = max(0, primary_lsn - answer.lsn)
            probe.lag_seconds = self._lag_seconds(answer.lsn, now)
        # Behind the primary and not replaying (paused, or stuck on a conflict): routing
        # sends causal reads it cannot serve to the primary at once instead of waiting.
        node.replay_stalled = bool(probe.lag_bytes) and not advanced
        if answer.receiver is not None:
            probe.has_streamed = True
        too_far = self._too_far_behind(probe) or self._not_receiving(probe, primary_lsn)
        self._recover(probe, "lagging" if too_far else "up", now)
        replica_set.set_usable(node, not too_far, reason=too_far or "")

    def _not_receiving(self, probe: _Probe, primary_lsn: int | None) -> str | None:
        # A replica that streamed before and now has no streaming WAL receiver while the
        # primary answers is following nothing, or a primary that is gone (a promotion
        # happened elsewhere): its data only gets older, so it leaves at once rather than
        # after max_lag_seconds. Not applied when the primary does not answer either (the
        # replicas then hold the newest data there is, and keep serving reads), nor to
        # replicas never seen with a receiver (fed by restore_command, not streaming).
        if primary_lsn is None or not probe.has_streamed:
            return None
        if probe.receiver in ("streaming", "hidden"):
            return None
        status = probe.receiver or "no WAL receiver"
        return f"not streaming from the primary ({status})"

    def _apply_writable(
        self, replica_set: ReplicaSet, node: Node, probe: _Probe, answer: _Answer, now: float
    ) -> None:
        # Not in recovery: a promoted replica or a URL that names a primary. It is not
        # "lagging" (its old replay LSN means nothing now) and must never take reads meant
        # for a replica unless the application said it may.
        was = probe.server_role
        probe.server_role = "primary"
        node.note_writable()  # its connections made while it was a standby get READ ONLY
        probe.lsn = answer.lsn
        probe.lag_bytes = probe.lag_seconds = None
        self._recover(probe, "writable", now)
        allowed = self.allow_writable_replicas
        if was != "primary":
            log.log(
                logging.WARNING if allowed else logging.ERROR,
                "%s: replica %s accepts writes (pg_is_in_recovery() is false: promoted, or "
                "its URL names a primary); %s",
                self.name,
                node.name,
                "kept in rotation (allow_writable_replicas=True), its transactions run READ ONLY"
                if allowed
                else "out of rotation, no statement is sent to it",
            )
        replica_set.set_usable(node, allowed, reason="" if allowed else "accepts writes")

    def _check_split_brain(self, replica_set: ReplicaSet) -> None:
        # Two different servers of one set accepting writes: the old primary came back after
        # a promotion, and writes may land on either. Routing cannot fix that; say it loudly.
        writable: dict[str, list[str]] = {}
        for node in replica_set.nodes:
            probe = self._probes[node.name]
            if probe.state != "down" and probe.server_role == "primary" and probe.server:
                writable.setdefault(probe.server, []).append(node.name)
        split: tuple[str, ...] = ()
        if len(writable) > 1 and not self.allow_writable_replicas:
            split = tuple(sorted(name for names in writable.values() for name in names))
        if split == self._split_brain:
            return
        self._split_brain = split
        if split:
            log.error(
                "%s: SPLIT BRAIN: %d different servers accept writes (nodes %s); writes may be "
                "lost or diverge. Stop the old primary or point the primary URL at one server.",
                self.name,
                len(writable),
                ", ".join(split),
            )
        else:
            log.warning("%s: only one server accepts writes again", self.name)

    def _abort_unresponsive(self, replica_set: ReplicaSet, now: float) -> None:
        # A replica that stops answering (frozen, or a network that drops packets) holds every
        # read sent to it: the kernel still acknowledges the bytes, so no TCP timeout fires,
        # and a stopped server cannot enforce statement_timeout. Once it has not answered a
        # probe for read_timeout seconds, its connections' sockets are shut down: blocked
        # reads fail as a lost connection and routing retries them on another node.
        if self.read_timeout is None:
            return
        for node in replica_set.replicas:
            probe = self._probes[node.name]
            if probe.state != "down" or probe.aborted:
                continue
            since = probe.answered_at if probe.answered_at is not None else self._started_at
            if now - since >= self.read_timeout:
                probe.aborted = True
                closed = node.abort_connections()
                log.warning(
                    "%s: replica %s has not answered for %.1f s (read_timeout=%s): shut down "
                    "%d of its connections so that the reads waiting on it are retried elsewhere",
                    self.name,
                    node.name,
                    now - since,
                    self.read_timeout,
                    closed,
                )

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
        probe.checked_at = now
        probe.node.is_down = True
        # One outage, one step: the reads that were in flight when a node went down all fail
        # at once, and only a failed *retry* (at or after retry_at) doubles the backoff.
        if probe.state != "down":
            probe.backoff = self.min_backoff
        elif now >= probe.retry_at:
            probe.backoff = min(probe.backoff * 2, self.max_backoff)
        else:
            return  # the same outage, already counted
        probe.retry_at = now + probe.backoff
        if probe.state != "down":
            probe.node.count_breaker_opening()
            log.warning(
                "%s: node %s is down (%s); next probe in %.1f s",
                self.name,
                probe.node.name,
                probe.last_error,
                probe.backoff,
            )
        probe.state = "down"

    def _recover(self, probe: _Probe, state: NodeState, now: float) -> None:
        probe.answered_at = now
        probe.aborted = False
        probe.node.is_down = False
        if probe.state == "down":
            log.info("%s: node %s answers again", self.name, probe.node.name)
            # Pooled connections from before the outage are dead: drop them now rather than
            # let the first reads after the node's return find out (and take it down again).
            # Only for pools we made: a user's engine (and its pool) is theirs to manage.
            if probe.node.owns_pool:
                # An async pool's connections can only be closed on their event loop.
                probe.node.engine.dispose(close=not is_async_engine(probe.node.engine))
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
        if answer is None or not answer.in_recovery:
            return None
        self._observe_lsn(node, probe, answer.lsn)
        return node.replay_lsn

    def _late_answer(self, node: Node, probe: _Probe, future: Future[_Answer | None]) -> None:
        if not future.cancelled() and future.exception() is None:
            answer = future.result()
            if answer is not None and answer.in_recovery:
                self._observe_lsn(node, probe, answer.lsn)

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
            receiver=probe.receiver if node.is_replica else None,
            backoff=probe.backoff,
            split_brain=node.name in self._split_brain,
        )


def _describe(exc: BaseException) -> str:
    """A one-line reason without URLs or passwords (driver messages name host and port only)."""
    orig = getattr(exc, "orig", None) or exc
    message = mask_secrets(" ".join(str(orig).split()))
    return f"{type(orig).__name__}: {message[:200]}"


def _reinit_monitors_after_fork() -> None:
    for monitor in list(HealthMonitor._instances):  # noqa: SLF001 (this module's class)
        monitor._after_fork_in_child()  # noqa: SLF001


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_monitors_after_fork)
