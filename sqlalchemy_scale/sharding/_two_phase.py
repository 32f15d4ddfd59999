"""The two-phase commit protocol across shards: transaction names, the recorded decision,
and phase two. Shared by the sharded session, :meth:`~sqlalchemy_scale.DirectorySharding.move`
and recovery (:mod:`~sqlalchemy_scale.sharding.recovery`).

The design is *presumed abort with one atomic decision*:

1. every shard written by one transaction is prepared (``PREPARE TRANSACTION``) under
   the global transaction id ``ss2pc:<txid>:<shard id>``, so the parts of one
   transaction name it and each other;
2. once every part is prepared, the committing process records the decision
   ``(txid, 'commit')`` in the table ``sqlalchemy_scale_2pc`` on the ShardSet's home
   shard (the *coordinator*), in its own autocommit transaction. The table's primary
   key makes the decision atomic: recovery records ``(txid, 'abort')`` with ``ON
   CONFLICT DO NOTHING``, so for each txid exactly one of the two is ever stored, and
   whoever loses reads the winner's;
3. only then ``COMMIT PREPARED`` on every part. Once one part is committed every other
   part must commit too, never roll back, even if one of them fails (a lost connection
   leaves its part prepared on the server, and recovery commits it by the record).

A transaction without a ``'commit'`` record was not committed anywhere, so recovery
may roll its prepared parts back; one with it is committed everywhere by recovery.
Once every part is committed, the committer's next decision deletes the record in the
same statement (recovery deletes those a process leaves behind); ``'abort'`` records
are kept (:data:`KEEP_ABORTED`) so that a committer that stalled between two PREPAREs
while recovery rolled back its first parts cannot record ``'commit'`` afterwards.

When *not* to rely on it: a coordinator (home shard) that is unreachable blocks the
decision, so no cross-shard transaction can commit until it answers (the prepared
parts keep their locks until recovery runs). PostgreSQL needs
``max_prepared_transactions > 0`` on every shard.

Test hook: :data:`_step_hook`, when set, is called with the name of each protocol
step as it completes (``"prepared:<shard>"``, ``"prepared"``, ``"decided"``,
``"committed:<shard>"``); the fault tests use it to kill the process at each step.
It is private and does nothing unless a test sets it.
"""

from __future__ import annotations

import datetime
import functools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from sqlalchemy import bindparam, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.base import TwoPhaseTransaction
from sqlalchemy.exc import DBAPIError, IntegrityError, ProgrammingError

from .._sa import keep_prepared
from ..errors import CommitOutcomeUnknown, CrossShardWriteError, NodeUnavailableError, sqlstate

__all__ = [
    "DECISION_TABLE",
    "GID_PREFIX",
    "KEEP_ABORTED",
    "Part",
    "commit_parts",
    "commit_prepared",
    "decide",
    "ensure_decision_table",
    "finish",
    "gid_for",
    "new_txid",
    "parse_gid",
    "prepare",
    "record_commit",
    "rollback_parts",
]

log = logging.getLogger("sqlalchemy_scale.sharding")

GID_PREFIX: Final = "ss2pc"
DECISION_TABLE: Final = "sqlalchemy_scale_2pc"
#: How long recovery keeps an 'abort' record after no shard holds its transaction.
KEEP_ABORTED: Final = datetime.timedelta(days=7)

Decision = Literal["commit", "abort"]

_CREATE = text(
    f"CREATE TABLE IF NOT EXISTS {DECISION_TABLE} ("
    "txid text PRIMARY KEY, "
    "decision text NOT NULL CHECK (decision IN ('commit', 'abort')), "
    "shards text[], "
    "decided_at timestamptz NOT NULL DEFAULT clock_timestamp())"
)
# The records of this process's transactions committed on every shard are deleted by its
# next decision, in the same statement (no round trip of their own).
_INSERT_COMMIT = text(
    f"WITH forgotten AS (DELETE FROM {DECISION_TABLE} "
    "WHERE txid = ANY(CAST(:forget AS text[])) AND decision = 'commit') "
    f"INSERT INTO {DECISION_TABLE} (txid, decision, shards) VALUES (:txid, 'commit', :shards)"
)
_INSERT_ABORT = text(
    f"INSERT INTO {DECISION_TABLE} (txid, decision, shards) VALUES (:txid, 'abort', :shards) "
    "ON CONFLICT (txid) DO NOTHING"
)
_READ = text(f"SELECT decision FROM {DECISION_TABLE} WHERE txid = :txid")

_FORGET: weakref.WeakKeyDictionary[Engine, list[str]] = weakref.WeakKeyDictionary()
_FORGET_LOCK = threading.Lock()
_FORGET_MAX: Final = 1000

#: Called with each protocol step's name as it completes; for fault tests only.
_step_hook: Callable[[str], None] | None = None


def step(name: str) -> None:
    """A protocol step completed: tell the fault tests' hook, if any."""
    if _step_hook is not None:
        _step_hook(name)


# -- names -------------------------------------------------------------------------------------


def new_txid() -> str:
    """A fresh id for one cross-shard transaction."""
    return uuid.uuid4().hex


def gid_for(txid: str, shard_id: str) -> str:
    """The ``PREPARE TRANSACTION`` name of shard ``shard_id``'s part of transaction ``txid``."""
    return f"{GID_PREFIX}:{txid}:{shard_id}"


def parse_gid(gid: str) -> tuple[str, str] | None:
    """``(txid, shard id)`` of a gid made by :func:`gid_for`; None for any other gid."""
    prefix, _, rest = gid.partition(":")
    txid, sep, shard_id = rest.partition(":")
    if prefix != GID_PREFIX or not sep or not txid:
        return None
    return txid, shard_id


# -- the decision ------------------------------------------------------------------------------


def ensure_decision_table(conn: Connection) -> None:
    """Create the decision table if it does not exist (``conn`` in autocommit)."""
    try:
        conn.execute(_CREATE)
    except (IntegrityError, ProgrammingError):
        # Two processes creating it at once: one wins, the other's catalog insert conflicts.
        if conn.scalar(text("SELECT to_regclass(:name)"), {"name": DECISION_TABLE}) is None:
            raise


def decide(conn: Connection, txid: str, shards: Sequence[str]) -> Decision:
    """Record 'abort' for ``txid`` unless a decision exists, and return the decision stored.

    Presumed abort: a transaction whose committer did not record 'commit' is rolled back;
    the primary key makes this atomic against a committer recording 'commit' right now.
    """
    conn.execute(_INSERT_ABORT, {"txid": txid, "shards": list(shards)})
    decision = conn.scalar(_READ, {"txid": txid})
    assert decision in ("commit", "abort"), decision
    return decision  # type: ignore[no-any-return]


def record_commit(
    coordinator: Engine, coordinator_name: str, txid: str, shards: Sequence[str]
) -> None:
    """Record the decision to commit ``txid``, after every part is prepared.

    Raises :class:`DecidedAbort` when recovery already decided to roll it back,
    :class:`~sqlalchemy_scale.NodeUnavailableError` when the coordinator could not be
    reached (nothing was recorded), and :class:`~sqlalchemy_scale.CommitOutcomeUnknown`
    when the decision's own outcome is unknown and cannot be read back.
    """
    try:
        conn = coordinator.connect().execution_options(isolation_level="AUTOCOMMIT")
    except DBAPIError as exc:
        raise NodeUnavailableError(
            f"the coordinator shard {coordinator_name!r} that records two-phase commit "
            f"decisions cannot be reached: {exc.orig}; nothing was committed",
            node=coordinator_name,
            orig=exc,
        ) from exc
    lost: BaseException | None = None
    forget = _take_forgotten(coordinator)
    params = {"txid": txid, "shards": list(shards), "forget": forget}
    with conn:
        try:
            try:
                conn.execute(_INSERT_COMMIT, params)
            except ProgrammingError as exc:
                if sqlstate(exc) != _UNDEFINED_TABLE:
                    raise
                ensure_decision_table(conn)  # the first decision on this coordinator
                conn.execute(_INSERT_COMMIT, params)
            return
        except IntegrityError:
            pass  # an 'abort' was recorded first: read it below
        except DBAPIError as exc:
            lost = exc  # maybe sent, outcome unknown: read it back (or decide 'abort' atomically)
    _give_back_forgotten(coordinator, forget)
    if _read_back(coordinator, coordinator_name, txid, shards, lost) == "abort":
        raise DecidedAbort(txid)


def _read_back(
    coordinator: Engine,
    coordinator_name: str,
    txid: str,
    shards: Sequence[str],
    lost: BaseException | None,
) -> Decision:
    """The decision for ``txid`` after our 'commit' record failed (or conflicted)."""
    try:
        with coordinator.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            return decide(conn, txid, shards)
    except DBAPIError as exc:
        raise CommitOutcomeUnknown(
            f"recording the decision to commit two-phase transaction {txid!r} on the "
            f"coordinator shard {coordinator_name!r} failed ({lost or exc}) and it cannot be "
            "read back: every part is prepared and keeps its locks until "
            "ShardSet.recover_prepared() (or `sqlalchemy-scale recover`) finishes it",
            node=coordinator_name,
            orig=lost or exc,
        ) from exc


def forget_commit(coordinator: Engine, txid: str) -> None:
    """Note that ``txid`` is committed on every shard: its record is deleted by this process's
    next decision on ``coordinator`` (or by recovery, if there is none)."""
    with _FORGET_LOCK:
        pending = _FORGET.setdefault(coordinator, [])
        if len(pending) < _FORGET_MAX:  # beyond that, recovery deletes them
            pending.append(txid)


def _take_forgotten(coordinator: Engine) -> list[str]:
    with _FORGET_LOCK:
        pending = _FORGET.pop(coordinator, [])
    return pending


def _give_back_forgotten(coordinator: Engine, txids: list[str]) -> None:
    with _FORGET_LOCK:
        pending = _FORGET.setdefault(coordinator, [])
        pending[:0] = txids[: max(0, _FORGET_MAX - len(pending))]


class DecidedAbort(Exception):
    """Recovery decided to roll the transaction back before its committer recorded 'commit'."""

    def __init__(self, txid: str) -> None:
        super().__init__(txid)
        self.txid = txid


def aborted_error(txid: str, shards: Sequence[str]) -> CrossShardWriteError:
    """The error a committer raises after recovery rolled its transaction back."""
    return CrossShardWriteError(
        f"two-phase transaction {txid!r} on shards {list(shards)} was rolled back: 'abort' "
        "was recorded for it before its commit could be (by recovery, which found it prepared "
        "for longer than its limit, or by this process after losing the coordinator "
        "connection while recording); nothing was committed"
    )


# -- the parts -----------------------------------------------------------------------------

_UNDEFINED_OBJECT: Final = "42704"  # "prepared transaction with identifier ... does not exist"
_UNDEFINED_TABLE: Final = "42P01"
_OBJECT_IN_USE: Final = "55000"  # "prepared transaction with identifier ... is busy"
_BUSY_ATTEMPTS: Final = 40  # at most about 2 s


@dataclass(frozen=True)
class Part:
    """One shard's part of a two-phase transaction: where it is and the gid it is prepared as."""

    shard_id: str
    engine: Engine
    gid: str


def _gid_statement(verb: str, gid: str) -> Any:
    # Utility statements take no bind parameters: the gid is rendered as a quoted literal.
    return text(f"{verb} :gid").bindparams(bindparam("gid", gid, literal_execute=True))


def prepare(conn: Connection, gid: str) -> None:
    """``PREPARE TRANSACTION`` the transaction open on ``conn`` as ``gid``.

    The server ends the transaction there; the part survives a crash or a restart of the
    server and the loss of ``conn``, until ``COMMIT PREPARED`` or ``ROLLBACK PREPARED``.
    The driver is then told the transaction is over (psycopg2 sends a ROLLBACK, which the
    server answers with a "no transaction in progress" warning; psycopg 3 saw the server
    go idle and sends nothing), so the COMMIT or ROLLBACK SQLAlchemy later asks of this
    connection sends nothing: a shard lost after its PREPARE cannot turn them into an
    error that would misreport the outcome. (The same round trip as the COMMIT it saves.)
    """
    conn.execute(_gid_statement("PREPARE TRANSACTION", gid))
    try:
        conn.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
    except Exception as exc:  # the part is prepared; only this connection is broken
        log.debug("connection lost after PREPARE TRANSACTION %s: %s", gid, exc)
        conn.invalidate(exc)


def finish(
    engine: Engine,
    gid: str,
    decision: Decision,
    *,
    on_done: Callable[[Connection], None] | None = None,
) -> bool:
    """COMMIT PREPARED (or ROLLBACK PREPARED) ``gid`` on an autocommit connection of
    ``engine``; False when no such prepared transaction exists (someone finished it).
    ``on_done`` is called with that connection once it has succeeded."""
    verb = "COMMIT PREPARED" if decision == "commit" else "ROLLBACK PREPARED"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for attempt in range(_BUSY_ATTEMPTS):
            try:
                conn.execute(_gid_statement(verb, gid))
            except DBAPIError as exc:
                code = sqlstate(exc)
                if code == _UNDEFINED_OBJECT:
                    return False
                if code != _OBJECT_IN_USE or attempt == _BUSY_ATTEMPTS - 1:
                    raise
            else:
                if on_done is not None:
                    on_done(conn)
                return True
            # Another process is finishing it right now (by the same record): wait for it.
            time.sleep(0.05)
    raise AssertionError("unreachable")  # pragma: no cover


def commit_parts(
    parts: Sequence[Part], *, on_commit: Callable[[Part, Connection], None] | None = None
) -> None:
    """Phase two after a 'commit' record: COMMIT PREPARED every part, all of them even after
    a failure, then raise :class:`CommitOutcomeUnknown` naming the parts that failed.

    A part that no longer exists was committed by recovery (it acts by the same record).
    ``on_commit`` is called with each part this call committed and its connection (to read
    the shard's WAL position after it); an error it raises is logged, not raised.
    """
    failed: list[tuple[Part, BaseException]] = []
    for part in parts:
        try:
            finish(
                part.engine,
                part.gid,
                "commit",
                on_done=None if on_commit is None else functools.partial(_after, on_commit, part),
            )
            step(f"committed:{part.shard_id}")
        except Exception as exc:
            failed.append((part, exc))
    if failed:
        names = {part.shard_id for part, _ in failed}
        committed = [part.shard_id for part in parts if part.shard_id not in names]
        pending = ", ".join(f"{part.shard_id!r} (gid {part.gid!r}: {exc})" for part, exc in failed)
        raise CommitOutcomeUnknown(
            f"the transaction is decided and committed on {committed}, and prepared but not "
            f"yet committed on {pending}; ShardSet.recover_prepared() (or `sqlalchemy-scale "
            "recover`) commits it there when the server answers (a prepared transaction "
            "holds its locks until then)",
            node=failed[0][0].shard_id,  # a part is named by its shard (on its primary)
            shard=failed[0][0].shard_id,
            orig=failed[0][1],
        )


def _after(on_commit: Callable[[Part, Connection], None], part: Part, conn: Connection) -> None:
    try:
        on_commit(part, conn)
    except Exception as exc:  # the part is committed; only what follows it is lost
        log.warning("after COMMIT PREPARED of %s: %s", part.shard_id, type(exc).__name__)


def rollback_parts(parts: Sequence[Part]) -> None:
    """ROLLBACK PREPARED every part of an undecided or aborted transaction; a part that does
    not exist (never prepared, or already rolled back) is skipped, one that fails is left to
    recovery (it rolls back what has no 'commit' record)."""
    for part in parts:
        try:
            finish(part.engine, part.gid, "abort")
        except Exception as exc:
            log.warning(
                "two-phase commit: %s (gid %s) stays prepared until recovery rolls it back: %s",
                part.shard_id,
                part.gid,
                exc,
            )


# -- DirectorySharding.move ----------------------------------------------------------------------


def commit_prepared(
    prepared: Sequence[tuple[str, TwoPhaseTransaction]],
    *,
    on_commit: Callable[[TwoPhaseTransaction], None] | None = None,
) -> None:
    """COMMIT PREPARED each ``(name, transaction)`` begun with SQLAlchemy's
    ``begin_twophase()``, all of them even after a failure (``on_commit`` is called after
    each success); then raise :class:`CommitOutcomeUnknown` naming the parts that failed
    and their gids."""
    failed: list[tuple[str, str, BaseException]] = []
    for name, trans in prepared:
        try:
            trans.commit()
            if on_commit is not None:
                on_commit(trans)
        except Exception as exc:
            # Keep the prepared transaction for recovery: cleanup must not roll it back.
            keep_prepared(trans)
            failed.append((name, str(trans.xid), exc))
    if failed:
        names = {f[0] for f in failed}
        committed = [name for name, _ in prepared if name not in names]
        pending = ", ".join(f"{name!r} (gid {gid!r}: {exc})" for name, gid, exc in failed)
        raise CommitOutcomeUnknown(
            f"the transaction is committed on {committed} and prepared but not yet committed "
            f"on {pending}; run COMMIT PREPARED '<gid>' there when the server answers (a "
            "prepared transaction holds its locks until then)",
            node=failed[0][0],
            orig=failed[0][2],
        )
