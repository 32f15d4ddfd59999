"""Recovery of two-phase commits left prepared: finish or roll back each by its recorded decision.

A process that dies (or loses a shard) between ``PREPARE TRANSACTION`` and the last
``COMMIT PREPARED`` leaves prepared transactions on the shards; they hold their locks
and block ``VACUUM``'s cleanup until someone finishes them. Each carries the name of
its transaction (gid ``ss2pc:<txid>:<shard id>``), and the committing process recorded
``(txid, 'commit')`` on the coordinator (the ShardSet's home shard) before its first
``COMMIT PREPARED`` (:mod:`~sqlalchemy_scale.sharding._two_phase` describes the protocol).

:func:`recover_prepared`, for every transaction with a part prepared longer than
``older_than`` seconds:

1. records ``(txid, 'abort')`` unless a decision exists (``INSERT ... ON CONFLICT DO
   NOTHING``: atomic against a committer recording ``'commit'`` at the same moment),
   then reads the decision stored;
2. ``'commit'``: ``COMMIT PREPARED`` on every shard still holding a part;
   ``'abort'``: ``ROLLBACK PREPARED``. A part another process finished meanwhile is
   reported as ``"already finished"``;
3. deletes the ``'commit'`` records no shard holds a part of any more (and ``'abort'``
   records older than :data:`~sqlalchemy_scale.sharding._two_phase.KEEP_ABORTED`),
   only when every shard answered.

It is safe to run at any time, from any number of processes at once, even while the
application commits: a transaction is only ever committed after its committer
recorded ``'commit'``, and rolled back only after ``'abort'`` was recorded, and the
record's primary key lets only one of the two exist. ``older_than`` (default 60 s)
only keeps recovery from rolling back transactions that are still being committed
(their committer then raises instead of committing). A shard that does not answer is
reported and its parts are finished by a later run; without the coordinator nothing is
decided. Prepared transactions whose gid this protocol did not make (another
application's, or :meth:`~sqlalchemy_scale.DirectorySharding.move`'s, which SQLAlchemy
names ``_sa_...``) are listed, never touched.

From the command line: ``sqlalchemy-scale recover --config topology.toml``.
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from ..errors import NodeUnavailableError
from . import _two_phase as two_phase
from .strategies import ShardId

if TYPE_CHECKING:
    from ._shard_set import ShardSet

__all__ = [
    "PreparedTransaction",
    "RecoveryAction",
    "RecoveryReport",
    "prepared_status",
    "prepared_transactions",
    "recover_prepared",
]

log = logging.getLogger("sqlalchemy_scale.sharding")
_T = TypeVar("_T")

_LIST = text(
    "SELECT gid, prepared, owner, database, "
    "extract(epoch FROM clock_timestamp() - prepared)::float8 AS age "
    "FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared"
)


@dataclass(frozen=True)
class PreparedTransaction:
    """A prepared transaction found on a shard (a row of ``pg_prepared_xacts``)."""

    shard_id: ShardId
    gid: str
    #: The sqlalchemy-scale transaction it belongs to; None for a gid made by something else.
    txid: str | None
    prepared_at: datetime.datetime
    age_seconds: float
    owner: str
    database: str


@dataclass(frozen=True)
class RecoveryAction:
    """What recovery did to one prepared part."""

    txid: str
    shard_id: ShardId
    gid: str
    decision: Literal["commit", "abort"]
    outcome: Literal["committed", "rolled back", "already finished", "failed"]
    error: str | None = None


@dataclass
class RecoveryReport:
    """The result of :func:`recover_prepared`."""

    actions: list[RecoveryAction] = field(default_factory=list)
    #: Parts left alone: younger than ``older_than``, or not made by sqlalchemy-scale.
    skipped: list[PreparedTransaction] = field(default_factory=list)
    #: Shards that could not be asked (shard id -> error); their parts wait for a later run.
    unreachable: dict[ShardId, str] = field(default_factory=dict)
    #: Decision records deleted because no shard holds a part of their transaction.
    forgotten: int = 0

    @property
    def is_complete(self) -> bool:
        """True when every shard answered and every part recovery acted on is finished."""
        return not self.unreachable and all(a.outcome != "failed" for a in self.actions)

    def __str__(self) -> str:
        lines = [
            f"{a.gid} on {a.shard_id}: decision {a.decision}, {a.outcome}"
            + (f" ({a.error})" if a.error else "")
            for a in self.actions
        ]
        lines += [
            f"{p.gid} on {p.shard_id}: left alone ("
            + ("not named by this protocol" if p.txid is None else f"{p.age_seconds:.0f} s old")
            + ")"
            for p in self.skipped
        ]
        lines += [f"shard {s}: unreachable ({e})" for s, e in self.unreachable.items()]
        return "\n".join(lines) or "no prepared transactions"


def _scan(
    shard_set: ShardSet,
) -> tuple[list[PreparedTransaction], dict[ShardId, str]]:
    found: list[PreparedTransaction] = []
    unreachable: dict[ShardId, str] = {}
    for shard_id in shard_set.shard_ids:
        engine = shard_set.replica_set(shard_id).primary.engine
        try:
            rows = _retrying(functools.partial(_list, engine))
        except DBAPIError as exc:
            unreachable[shard_id] = str(exc.orig).strip().splitlines()[0]
            continue
        for gid, prepared_at, owner, database, age in rows:
            parsed = two_phase.parse_gid(gid)
            found.append(
                PreparedTransaction(
                    shard_id=shard_id,
                    gid=gid,
                    txid=parsed[0] if parsed else None,
                    prepared_at=prepared_at,
                    age_seconds=float(age),
                    owner=owner,
                    database=database,
                )
            )
    return found, unreachable


def prepared_transactions(
    shard_set: ShardSet, *, older_than: float = 0.0
) -> list[PreparedTransaction]:
    """Prepared transactions on the shards' primaries, prepared at least ``older_than`` seconds
    ago, oldest first per shard. Shards that do not answer are logged (WARNING) and skipped."""
    found, unreachable = _scan(shard_set)
    for shard_id, error in unreachable.items():
        log.warning("prepared transactions of shard %s unknown: %s", shard_id, error)
    return [p for p in found if p.age_seconds >= older_than]


def prepared_status(shard_set: ShardSet, *, older_than: float = 60.0) -> str:
    """One status line: the prepared transactions older than ``older_than`` seconds, or none."""
    found, unreachable = _scan(shard_set)
    old = [p for p in found if p.age_seconds >= older_than]
    if not old:
        line = f"prepared transactions older than {older_than:g} s: none"
    else:
        oldest = max(old, key=lambda p: p.age_seconds)
        shards = sorted({p.shard_id for p in old})
        line = (
            f"prepared transactions older than {older_than:g} s: {len(old)} on {', '.join(shards)} "
            f"(oldest {oldest.age_seconds:.0f} s: {oldest.gid}); run `sqlalchemy-scale recover`"
        )
    if unreachable:
        line += f"; unknown on unreachable shard(s) {', '.join(sorted(unreachable))}"
    return line


def recover_prepared(shard_set: ShardSet, *, older_than: float = 60.0) -> RecoveryReport:
    """Commit or roll back every sqlalchemy-scale transaction with a part prepared for at least
    ``older_than`` seconds, by its recorded decision (see the module docs); returns what was done.

    Raises :class:`~sqlalchemy_scale.NodeUnavailableError` when the coordinator (home
    shard) cannot be reached: without it nothing can be decided.
    """
    if not older_than >= 0:
        raise ValueError(f"older_than must be >= 0 seconds, got {older_than!r}")
    home = shard_set.home_shard
    coordinator = shard_set.replica_set(home).primary.engine
    report = RecoveryReport()
    cconn = _coordinator_connection(coordinator, home)
    with cconn:
        # Records decided before this instant belong to transactions whose every part was
        # prepared before it, so the scan below sees each part still prepared.
        scan_started = cconn.scalar(text("SELECT clock_timestamp()"))
        found, report.unreachable = _scan(shard_set)
        parts: dict[str, list[PreparedTransaction]] = defaultdict(list)
        for prepared in found:
            if prepared.txid is None:
                report.skipped.append(prepared)
            else:
                parts[prepared.txid].append(prepared)
        held: set[str] = set()
        for txid, txid_parts in parts.items():
            if max(p.age_seconds for p in txid_parts) < older_than:
                report.skipped.extend(txid_parts)
                held.add(txid)
                continue
            decision = two_phase.decide(cconn, txid, sorted({p.shard_id for p in txid_parts}))
            for prepared in txid_parts:
                action = _finish(shard_set, prepared, txid, decision)
                report.actions.append(action)
                if action.outcome == "failed":
                    held.add(txid)
        if not report.unreachable:
            report.forgotten = _forget(cconn, scan_started, held)
    for action in report.actions:
        log.warning(
            "recovered two-phase transaction %s on shard %s: decision %s, %s%s",
            action.gid,
            action.shard_id,
            action.decision,
            action.outcome,
            f" ({action.error})" if action.error else "",
        )
    return report


def _coordinator_connection(coordinator: Engine, home: ShardId) -> Connection:
    """An autocommit connection to the coordinator with the decision table in place; a pooled
    connection the server closed (a restarted home shard) is replaced once."""
    for attempt in range(2):
        try:
            conn = coordinator.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                two_phase.ensure_decision_table(conn)
            except BaseException:
                conn.close()
                raise
            return conn
        except DBAPIError as exc:
            if exc.connection_invalidated and attempt == 0:
                continue
            raise NodeUnavailableError(
                f"the coordinator shard {home!r} cannot be reached ({exc.orig}); no prepared "
                "transaction was committed or rolled back",
                node=home,
                orig=exc,
            ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _finish(
    shard_set: ShardSet,
    prepared: PreparedTransaction,
    txid: str,
    decision: Literal["commit", "abort"],
) -> RecoveryAction:
    engine = shard_set.replica_set(prepared.shard_id).primary.engine
    outcome: Literal["committed", "rolled back", "already finished", "failed"]
    error = None
    try:
        if _retrying(functools.partial(two_phase.finish, engine, prepared.gid, decision)):
            outcome = "committed" if decision == "commit" else "rolled back"
        else:
            outcome = "already finished"  # its committer or another recovery finished it
    except DBAPIError as exc:
        outcome, error = "failed", str(exc.orig).strip().splitlines()[0]
    return RecoveryAction(txid, prepared.shard_id, prepared.gid, decision, outcome, error)


def _forget(cconn: Connection, scan_started: datetime.datetime, held: set[str]) -> int:
    """Delete decision records of transactions no shard holds a part of."""
    result = cconn.execute(
        text(
            f"DELETE FROM {two_phase.DECISION_TABLE} WHERE decided_at < :started "
            "AND NOT (txid = ANY(CAST(:held AS text[]))) "
            "AND (decision = 'commit' OR decided_at < :started - :keep_aborted)"
        ),
        {"started": scan_started, "held": sorted(held), "keep_aborted": two_phase.KEEP_ABORTED},
    )
    return int(result.rowcount or 0)


def _list(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(_LIST).all())


def _retrying(work: Callable[[], _T]) -> _T:
    """``work()``, once more if it failed on a pooled connection the server had closed (a
    restarted shard): that failure says nothing about the server now."""
    try:
        return work()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    return work()
