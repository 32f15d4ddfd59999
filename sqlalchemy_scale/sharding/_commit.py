"""How a sharded session's transaction ends: what it wrote on which shards, and its COMMIT.

:class:`ShardWrites` is the session's record of the shards its transaction wrote to (and
the cross-shard rule checked before a second one is written). :func:`install` hooks the
commit into SQLAlchemy's session events; at ``before_commit``, once the last flush is done:

* one shard written: its COMMIT is sent here, on the session's connection, so that a lost
  connection is told apart from a refusal: :class:`~sqlalchemy_scale.CommitOutcomeUnknown`
  naming the shard and its node, or the server's own error;
* several shards: ``cross_shard_writes="best_effort"`` commits them in turn
  (:mod:`._best_effort`), ``"two_phase"`` prepares them, records the decision and sends
  ``COMMIT PREPARED`` to each (:mod:`._two_phase`);
* after each shard's commit its primary's WAL position is recorded in that shard's
  :class:`~sqlalchemy_scale.Router` (and the :func:`~sqlalchemy_scale.causal_context` in
  force), under the shard's scope: the session's ``causal_token`` covers every shard written;
* a shard whose COMMIT (or ``COMMIT PREPARED``) was lost with its outcome unknown, or whose
  position could not be read, is noted instead (:meth:`Router.note_unknown_commit
  <sqlalchemy_scale.Router.note_unknown_commit>`): the session's next read of it first asks
  its primary for its position then, so a read-back sees the commit if it happened.

The COMMITs are sent through the driver connection: SQLAlchemy's own COMMIT of these
connections afterwards finds the driver idle and sends nothing (psycopg2 and psycopg 3).
Connections to shards' replicas have their read-only transactions ended first, and a lost
one is logged and discarded (:func:`end_replica_reads`): it decides nothing. Connections to
the primaries of shards only read are committed by SQLAlchemy as before.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final, cast

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction

from .._sa import committing_connections, exclude_from_commit, transaction_connection
from ..consistency import request_commit_position
from ..errors import (
    CommitOutcomeUnknown,
    CrossShardWriteError,
    NodeUnavailableError,
    PartialCommitError,
    render_url,
)
from ..routing import roll_back_read_only
from . import _best_effort as best_effort
from . import _two_phase as two_phase
from ._shard_set import ShardSet
from ._user_choosers import commit_shard_by_shard
from .strategies import ShardId

if TYPE_CHECKING:
    from .session import ShardedSession

__all__ = ["ShardWrites", "commit_one", "end_replica_reads", "install", "is_late_write"]

log = logging.getLogger("sqlalchemy_scale.sharding")

# decide_role() kinds refused once commit() has begun committing the shards.
_LATE_WRITES: Final = frozenset({"flush", "write", "ddl"})


class ShardWrites:
    """The shards the current transaction of one sharded session has written to, in order
    of first write, and the state of its commit."""

    __slots__ = ("names", "partial", "preparing", "shard_set", "written")

    def __init__(self, shard_set: ShardSet | None, names: dict[int, str] | None = None) -> None:
        self.shard_set = shard_set
        #: shard id -> the shard primary's engine, for each shard written.
        self.written: dict[ShardId, Engine] = {}
        #: True once commit() has begun committing the shards: writes are refused.
        self.preparing = False
        #: The transaction whose shard-by-shard commit raised PartialCommitError, if any.
        self.partial: SessionTransaction | None = None
        #: A user-chooser session's shard names by id() of their engines.
        self.names = names or {}

    @property
    def shards(self) -> list[ShardId]:
        """The shards written, in ShardSet order."""
        assert self.shard_set is not None
        return [s for s in self.shard_set.shard_ids if s in self.written]

    def note(self, shard_id: ShardId, engine: Engine) -> None:
        """Record a write to ``shard_id``; raise CrossShardWriteError (nothing sent) when it
        is a second shard and the ShardSet refuses cross-shard writes."""
        if shard_id in self.written:
            return
        assert self.shard_set is not None
        if self.written and self.shard_set.cross_shard_writes == "refuse":
            raise CrossShardWriteError(
                f"this transaction already wrote to shard(s) {self.shards} and now writes "
                f"to {shard_id!r}; nothing was committed. Use "
                "ShardSet(cross_shard_writes='two_phase') (PostgreSQL two-phase commit, needs "
                "max_prepared_transactions > 0) or write each shard in its own transaction"
            )
        self.written[shard_id] = engine

    def end(self) -> None:
        """The transaction ended: nothing written, nothing being committed."""
        self.written = {}
        self.preparing = False


def install(session_class: type[ShardedSession]) -> None:
    """Listen on ``session_class``'s events: the commit of written shards, and the request
    for the WAL position with each shard primary's COMMIT."""
    event.listen(session_class, "before_commit", _before_commit)
    event.listen(session_class, "after_begin", _after_begin)


def _after_begin(
    any_session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    session = cast("ShardedSession", any_session)  # listened for on that class only
    if session.has_user_choosers:
        return
    shard_set = session.shard_set
    for shard_id in shard_set.shard_ids:
        replica_set = shard_set.replica_set(shard_id)
        if connection.engine is replica_set.primary.engine:
            if replica_set.read_your_writes != "off":
                # psycopg 3 connections the ReplicaSet opened read the position with COMMIT.
                request_commit_position(connection)
            return


def _before_commit(any_session: Session) -> None:
    session = cast("ShardedSession", any_session)  # listened for on that class only
    transaction = session.get_transaction()
    if transaction is None or transaction.nested or transaction.parent is not None:
        return
    writes = session.shard_writes
    if writes.partial is transaction:
        raise CrossShardWriteError(
            "this transaction's best-effort commit already stopped at a shard "
            "(PartialCommitError); roll it back before using the session again"
        )
    if session.has_user_choosers:
        if not session.twophase:
            session.flush()
            writes.partial = transaction
            commit_shard_by_shard(transaction, writes.names, list(writes.names.values()))
            writes.partial = None
        return
    session.flush()  # the last flush may write to another shard: decide after it
    # From here writes are refused (get_bind): SQLAlchemy flushes again after this listener.
    writes.preparing = True
    end_replica_reads(session.shard_set, transaction)
    shard_ids = writes.shards
    connections = [
        (s, conn)
        for s in shard_ids
        if (conn := transaction_connection(transaction, writes.written[s])) is not None
    ]
    if not connections:
        return
    shard_set = session.shard_set
    if len(shard_ids) == 1:
        shard_id, conn = connections[0]
        try:
            commit_one(shard_set, shard_id, conn)
        except CommitOutcomeUnknown:
            session.router(shard_id).note_unknown_commit()  # a read-back must see it
            raise
        _record_position(session, shard_id, conn)
        return
    mode = shard_set.cross_shard_writes
    if mode == "best_effort":
        writes.partial = transaction
        try:
            best_effort.commit_shards(
                connections, on_commit=lambda s, c: _record_position(session, s, c)
            )
        except PartialCommitError as exc:
            for shard_id in exc.unknown:  # its COMMIT was lost: it may have committed
                session.router(shard_id).note_unknown_commit()  # a read-back must see it
            raise
        writes.partial = None
        return
    if mode != "two_phase":  # get_bind refuses earlier; this is the safety net
        raise CrossShardWriteError(
            f"the transaction wrote to shards {shard_ids}; nothing was committed"
        )
    _commit_two_phase(session, connections)


def end_replica_reads(shard_set: ShardSet, transaction: SessionTransaction) -> None:
    """End the read-only transactions of the shards' replica connections before the commit,
    and keep SQLAlchemy's commit from sending COMMIT on them.

    A replica connection lost since its last read (its backend terminated, its server
    restarted) must not decide the outcome of a commit of other connections, nor fail the
    commit of a session that only read: ending a transaction that wrote nothing cannot lose
    anything, so a failure is logged, the connection discarded, and nothing raised (as
    :class:`~sqlalchemy_scale.RoutingSession` does with its replica connection).
    """
    replica_engines = {
        id(node.engine)
        for shard_id in shard_set.shard_ids
        for node in shard_set.replica_set(shard_id).replicas
    }
    if not replica_engines:
        return
    for conn in committing_connections(transaction):
        if id(conn.engine) not in replica_engines:
            continue
        exclude_from_commit(transaction, conn)
        roll_back_read_only(conn, f"a replica ({render_url(conn.engine)})")


def commit_one(shard_set: ShardSet, shard_id: ShardId, conn: Connection) -> None:
    """COMMIT the one shard a transaction wrote to, on its driver connection.

    A connection lost during COMMIT raises :class:`~sqlalchemy_scale.CommitOutcomeUnknown`
    naming the shard and its node (the server may have committed before it went); a COMMIT
    the server refused raises its error as SQLAlchemy would (nothing was committed).
    """
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None
    try:
        dbapi_connection.commit()
    except Exception as exc:
        if not best_effort.connection_lost(exc):
            raise sa_exc.DBAPIError.instance(
                None, None, exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
            ) from exc
        conn.invalidate(exc)
        node = shard_set.replica_set(shard_id).primary.name
        raise CommitOutcomeUnknown(
            f"the connection to the primary {node!r} of shard {shard_id!r} was lost during "
            "COMMIT; the transaction may or may not have committed there. Read back what it "
            f"wrote to reconcile before retrying ({type(exc).__name__}: "
            f"{best_effort.describe(exc)})",
            node=node,
            shard=shard_id,
            orig=exc,
        ) from exc
    log.debug("shard %s committed", shard_id)


def _record_position(
    session: ShardedSession, shard_id: ShardId, conn: Connection, *, by_driver: bool = True
) -> None:
    """After ``shard_id`` committed on ``conn`` (by its driver, or by a ``COMMIT PREPARED``
    statement): later reads of it must see the commit."""
    replica_set = session.shard_set.replica_set(shard_id)
    position = replica_set.position_after_commit(conn, by_driver=by_driver)
    if position is not None:
        replica_set.note_primary_position(position)
        session.router(shard_id).record_commit(position)
    elif replica_set.read_your_writes != "off":
        session.router(shard_id).note_unknown_commit()  # its position could not be read


def _commit_two_phase(
    session: ShardedSession, connections: list[tuple[ShardId, Connection]]
) -> None:
    """PREPARE every written shard under one txid, record the decision, COMMIT PREPARED each
    (the protocol of :mod:`~sqlalchemy_scale.sharding._two_phase`).

    The session's connections stay plain transactions: ``PREPARE TRANSACTION`` ends each
    on its server (and the driver is told so), so the COMMIT (or ROLLBACK) SQLAlchemy asks
    of them afterwards sends nothing, and phase two runs on separate autocommit
    connections. (The drivers' own two-phase API fixes the gid when the transaction
    begins, before the transaction that names it exists.)
    """
    shard_set = session.shard_set
    txid = two_phase.new_txid()
    parts: list[two_phase.Part] = []
    for shard_id, connection in connections:
        engine = shard_set.replica_set(shard_id).primary.engine
        part = two_phase.Part(shard_id, engine, two_phase.gid_for(txid, shard_id))
        try:
            two_phase.prepare(connection, part.gid)
        except BaseException:
            # Nothing is decided: roll back what was prepared (and this part, in case its
            # PREPARE ran before the error); the session rolls back the rest.
            two_phase.rollback_parts([*parts, part])
            raise
        parts.append(part)
        two_phase.step(f"prepared:{shard_id}")
    names = [part.shard_id for part in parts]
    log.debug("prepared two-phase commit %s on shards %s", txid, names)
    two_phase.step("prepared")
    coordinator = shard_set.replica_set(shard_set.home_shard).primary.engine
    try:
        two_phase.record_commit(coordinator, shard_set.home_shard, txid, names)
    except two_phase.DecidedAbort:
        two_phase.rollback_parts(parts)
        raise two_phase.aborted_error(txid, names) from None
    except NodeUnavailableError:
        two_phase.rollback_parts(parts)  # nothing recorded, and only we would record 'commit'
        raise
    # Any other error (CommitOutcomeUnknown, an interrupt) leaves the parts prepared: recovery
    # commits them if the 'commit' record exists and rolls them back if it does not.
    two_phase.step("decided")
    recorded: set[ShardId] = set()

    def on_commit(part: two_phase.Part, conn: Connection) -> None:
        _record_position(session, part.shard_id, conn, by_driver=False)
        recorded.add(part.shard_id)

    try:
        two_phase.commit_parts(parts, on_commit=on_commit)
    except CommitOutcomeUnknown as exc:
        log.error("two-phase commit: %s", exc)
        raise
    finally:
        for part in parts:
            if part.shard_id not in recorded:
                # Its COMMIT PREPARED was lost (outcome unknown), or recovery committed it:
                # a read-back must see it if it committed.
                session.router(part.shard_id).note_unknown_commit()
    two_phase.forget_commit(coordinator, txid)


def is_late_write(kind: str) -> bool:
    """Whether a statement of this :func:`~sqlalchemy_scale.decide_role` kind writes, and so
    is refused once commit() has begun committing the shards."""
    return kind in _LATE_WRITES
