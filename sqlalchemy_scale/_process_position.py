"""``read_your_writes="process"``: the newest commit this process made through a primary engine.

Every transaction that wrote through the primary :class:`~sqlalchemy.engine.Engine`
(a routing session, a plain ``Session(bind=replica_set.primary.engine)``, a
``Connection``) is followed by one query for the primary's WAL position
(:func:`~sqlalchemy_scale.consistency.read_commit_lsn`) before ``commit()``
returns, and the newest such position becomes the floor for every read routed
by that ReplicaSet in this process: a replica that has not replayed it is
passed over (the monitor's replay LSNs, else one bounded on-demand check), else
the read goes to the primary. Reads pay no round trip for the bookkeeping.

How a transaction is known to have written: a ``before_cursor_execute`` listener
on the primary engine marks the connection for INSERT/UPDATE/DELETE, DDL,
``text()``/driver SQL, and the SELECTs :func:`~sqlalchemy_scale.decide_role`
sends to the primary (locking reads, ``nextval()``...). A plain SELECT marks
nothing, so a read-only transaction's COMMIT costs nothing extra.
The position is read after the DBAPI commit by wrapping the engine dialect's
``do_commit`` (SQLAlchemy's ``commit`` event fires *before* COMMIT is sent); a write
on a connection in driver autocommit (``isolation_level="AUTOCOMMIT"``) committed as
it ran, and its position is read right after it (``after_cursor_execute``).
Two-phase commits (sharding's ``cross_shard_writes="two_phase"``) are tracked at their
``COMMIT PREPARED``, which is sent in autocommit.

When *not* to use it: many processes (each has its own floor; carry causal tokens
between them), or write-heavy processes whose reads should keep using replicas:
every write moves the floor past what replicas have replayed, so reads soon after
any write in the process go to the primary (see ``benchmarks/bench_async.py``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from .consistency import read_commit_lsn

__all__ = ["ProcessPosition", "ReadYourWrites", "install_process_position"]

log = logging.getLogger("sqlalchemy_scale.consistency")

ReadYourWrites = Literal["session", "process", "off"]


class ProcessPosition:
    """The newest WAL position committed through one primary engine by this process."""

    def __init__(self) -> None:
        #: The newest position, or None before the first tracked commit.
        self.position: int | None = None
        #: True after a commit whose position could not be read, until the primary's own
        #: position is (routing reads it before the next read, see Router.causal_position).
        self.unknown = False
        self._lock = threading.Lock()
        # id() of DBAPI connections whose current transaction wrote.
        self._wrote: set[int] = set()
        # Position of the latest commit on a DBAPI connection, for the routing session
        # whose commit it was (so it does not ask the primary a second time); dropped at
        # the connection's next commit and when it goes back to the pool, so it is never
        # taken for another commit (a shard's COMMIT, sent on the driver before this
        # tracker runs, finds nothing and reads its own).
        self._last: dict[int, int] = {}

    def observe(self, position: int) -> None:
        with self._lock:
            if self.position is None or position > self.position:
                self.position = position

    def take_commit_position(self, dbapi_connection: Any) -> int | None:
        """The position read after the commit just made on ``dbapi_connection``, once."""
        return self._last.pop(id(dbapi_connection), None)

    def _mark(self, dbapi_connection: Any) -> None:
        self._wrote.add(id(dbapi_connection))

    def _forget(self, dbapi_connection: Any) -> None:
        key = id(dbapi_connection)
        self._wrote.discard(key)
        # A position not taken by the end of its checkout belongs to no later commit.
        self._last.pop(key, None)

    def _after_commit(self, dbapi_connection: Any) -> None:
        key = id(dbapi_connection)
        # Whatever an earlier commit left is not this one's position.
        self._last.pop(key, None)
        if key not in self._wrote:
            return
        self._wrote.discard(key)
        # Read with the COMMIT itself when the connection can (psycopg 3, see
        # consistency.request_commit_position); else one more round trip.
        pipelined = getattr(dbapi_connection, "position", None)
        if isinstance(pipelined, int):
            self._last[key] = pipelined
            self.observe(pipelined)
            return
        position = self._read(dbapi_connection)
        if position is not None:
            self._last[key] = position

    def _after_autocommit_write(self, dbapi_connection: Any) -> None:
        # In driver autocommit the statement committed as it ran; no COMMIT follows, and
        # a position left on the connection is an earlier commit's: read it afresh.
        self._wrote.discard(id(dbapi_connection))
        self._read(dbapi_connection)

    def _read(self, dbapi_connection: Any) -> int | None:
        try:
            position = read_commit_lsn(dbapi_connection)
        except Exception as exc:  # committed; only the position is lost
            log.warning(
                "could not read the primary's WAL position after commit: %s", type(exc).__name__
            )
            self.unknown = True  # reads must see it all the same
            return None
        self.observe(position)
        return position


def _writes(context: Any, decide_role: Any) -> bool:
    if context is None:
        return True
    if context.isinsert or context.isupdate or context.isdelete or context.isddl:
        return True
    compiled = context.compiled
    if compiled is None:  # exec_driver_sql(): any SQL at all
        return True
    return bool(decide_role(compiled.statement)[0] == "primary")


def install_process_position(engine: Engine) -> ProcessPosition:
    """Track commits that wrote through ``engine`` (a primary's) into a new ProcessPosition."""
    from .routing import decide_role  # routing imports topology, which imports this module

    tracker = ProcessPosition()

    def before_cursor_execute(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if _writes(context, decide_role):
            tracker._mark(conn.connection.dbapi_connection)  # noqa: SLF001 (this module's class)

    def after_cursor_execute(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        # A write on a connection in AUTOCOMMIT (isolation_level="AUTOCOMMIT") committed as
        # it ran: its position is read now, since no commit() will follow it.
        dbapi_connection = conn.connection.dbapi_connection
        if id(dbapi_connection) in tracker._wrote and getattr(  # noqa: SLF001 (this module's class)
            dbapi_connection, "autocommit", False
        ):
            tracker._after_autocommit_write(dbapi_connection)  # noqa: SLF001 (this module's class)

    def on_rollback(conn: Connection) -> None:
        if not conn.invalidated:
            tracker._forget(conn.connection.dbapi_connection)  # noqa: SLF001 (this module's class)

    def on_reset(dbapi_connection: Any, record: Any, reset_state: Any) -> None:
        tracker._forget(dbapi_connection)  # noqa: SLF001 (this module's class)

    event.listen(engine, "before_cursor_execute", before_cursor_execute)
    event.listen(engine, "after_cursor_execute", after_cursor_execute)
    event.listen(engine, "rollback", on_rollback)
    event.listen(engine.pool, "reset", on_reset)
    # SQLAlchemy has no event after COMMIT; wrap this engine's dialect instance (every
    # create_engine() has its own) so the position is known before commit() returns.
    dialect: Any = engine.dialect
    do_commit = dialect.do_commit

    def do_commit_and_track(connection: Any) -> None:
        do_commit(connection)
        # SQLAlchemy passes the pool's proxy; the bookkeeping is by DBAPI connection.
        tracker._after_commit(getattr(connection, "dbapi_connection", connection))  # noqa: SLF001 (this module's class)

    dialect.do_commit = do_commit_and_track
    return tracker
