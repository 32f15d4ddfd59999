"""Causal (read-your-writes) consistency by WAL position.

A *causal token* is the primary's WAL position right after a transaction that
wrote has committed (``pg_current_wal_insert_lsn()``, past the commit record even
for an asynchronous commit), as PostgreSQL prints it: a
string like ``"0/16B3748"``. A replica whose ``pg_last_wal_replay_lsn()`` has
reached the token has replayed that commit, so a read served by it sees the
write. That is exact, unlike "stick to the primary for N seconds".

Tokens are opaque to users, safe to hand to a client (they reveal only a WAL
position) and comparable with :func:`newer_token`. A client cannot use one to pin
reads to the primary: a token ahead of the primary's own WAL position was made by no
commit, and is logged once and ignored (:meth:`ReplicaSet.check_causal_position
<sqlalchemy_scale.ReplicaSet.check_causal_position>`, :func:`reject_position`). They travel:

- within a session: a :class:`~sqlalchemy_scale.RoutingSession` records its own
  commits (``session.causal_token``) and its later reads honour them;
- between sessions of one request: ``with ss.causal_context(token):`` shares a
  :class:`CausalContext` (a :class:`~contextvars.ContextVar`) that every routing
  session in the block reads and advances;
- between requests: the web integrations put ``context.token`` in a cookie or header.

When *not* to rely on it: writes made by other applications, or through
connections the session does not own, are not tracked; pin the primary for those.
Logical replicas and other databases have unrelated WAL positions: a token is only
meaningful within one primary's replication tree.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol
from urllib.parse import quote, unquote

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import ExceptionContext

from .errors import CommitOutcomeUnknown, ConfigurationError, sqlstate

if TYPE_CHECKING:
    from sqlalchemy.orm import SessionTransaction

log = logging.getLogger("sqlalchemy_scale.consistency")

__all__ = [
    "CausalContext",
    "causal_context",
    "current_causal_context",
    "format_lsn",
    "format_token",
    "newer_token",
    "parse_lsn",
    "parse_token",
]

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")

_CONTEXT: ContextVar[CausalContext | None] = ContextVar("sqlalchemy_scale_causal", default=None)


def parse_lsn(token: str) -> int:
    """The WAL position of a token as an integer (``"0/16B3748"`` -> ``23803720``).

    Raises :class:`~sqlalchemy_scale.ConfigurationError` for anything that is not an LSN,
    so a tampered cookie cannot be mistaken for a position.
    """
    match = _LSN.match(token.strip()) if isinstance(token, str) else None
    if match is None:
        raise ConfigurationError(
            f"not a causal token (a PostgreSQL LSN like '0/16B3748'): {str(token)[:40]!r}"
        )
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(position: int) -> str:
    """The token for a WAL position, in PostgreSQL's own notation."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


#: Where a position belongs inside a token: None for the one primary of a plain
#: :class:`~sqlalchemy_scale.ReplicaSet`, else its :attr:`ReplicaSet.causal_scope
#: <sqlalchemy_scale.ReplicaSet.causal_scope>` (a shard id, a Flask bind key).
Scope = str | None


def parse_token(token: str) -> dict[Scope, int]:
    """The WAL positions a token carries, by scope.

    A plain LSN (``"0/16B3748"``) is one position of no scope: what a
    :class:`~sqlalchemy_scale.RoutingSession` on one :class:`~sqlalchemy_scale.ReplicaSet`
    produces. A token covering several primaries (the shards a
    :class:`~sqlalchemy_scale.ShardedSession` wrote to, the binds of a Flask app) is
    ``scope=LSN`` pairs joined by ``&``, each scope percent-encoded (``s0=0/16B3748&s1=0/9A0``;
    the unscoped position, if any, has an empty scope). Raises
    :class:`~sqlalchemy_scale.ConfigurationError` for anything else, so a tampered cookie
    cannot be mistaken for positions.
    """
    if not isinstance(token, str) or "=" not in token:
        return {None: parse_lsn(token)}
    positions: dict[Scope, int] = {}
    for part in token.strip().split("&"):
        name, sep, lsn = part.partition("=")
        if not sep or len(positions) >= _MAX_SCOPES:
            raise ConfigurationError(f"not a causal token: {token[:40]!r}")
        try:
            scope: Scope = unquote(name, errors="strict") if name else None
        except UnicodeDecodeError:
            raise ConfigurationError(f"not a causal token: {token[:40]!r}") from None
        if scope in positions:
            raise ConfigurationError(f"not a causal token (scope twice): {token[:40]!r}")
        positions[scope] = parse_lsn(lsn)
    return positions


def format_token(positions: Mapping[Scope, int]) -> str | None:
    """The token for positions by scope (:func:`parse_token`'s inverse); None for none."""
    if not positions:
        return None
    if len(positions) == 1 and None in positions:
        return format_lsn(positions[None])
    return "&".join(
        f"{_quote_scope(scope)}={format_lsn(position)}"
        for scope, position in sorted(positions.items(), key=lambda item: item[0] or "")
    )


def _quote_scope(scope: Scope) -> str:
    # Percent-encoded, "." too: a signed token is "<token>.<signature>".
    return "" if scope is None else quote(scope, safe="").replace(".", "%2E")


def newer_token(a: str | None, b: str | None) -> str | None:
    """A token at least as new as both: per primary (scope), the later position (None
    counts as older than any token; tokens covering several primaries are merged).

    A position already found ahead of its primary (see :func:`reject_position`) is
    dropped, so a forged token cannot outlive the real ones that follow it.
    """
    merged = CausalContext(a)
    merged.observe(b)
    return merged.token


# Positions of tokens found ahead of their primary's own WAL position, by scope: no commit
# made them (forged, or from another cluster). Kept, bounded, so they are ignored wherever
# they turn up again and warned about once.
_REJECTED: dict[tuple[Scope, int], None] = {}
_REJECTED_MAX: Final = 1024
_REJECTED_LOCK = threading.Lock()
# The most scopes one token may carry (a cookie stays small; a forged one stays cheap).
_MAX_SCOPES: Final = 64


def reject_position(position: int, *, primary: int, where: str, scope: Scope = None) -> None:
    """Remember that a token's position (of ``scope``) is ahead of its primary (at
    ``primary``); the first time, log a warning. Such a position is ignored from then on."""
    with _REJECTED_LOCK:
        if (scope, position) in _REJECTED:
            return
        if len(_REJECTED) >= _REJECTED_MAX:
            del _REJECTED[next(iter(_REJECTED))]
        _REJECTED[scope, position] = None
    log.warning(
        "ignoring causal token %s: it is ahead of the WAL position of the primary of %s (%s), "
        "so no commit produced it (forged, or from another cluster); reads use the "
        "primary's position instead",
        format_lsn(position),
        where,
        format_lsn(primary),
    )


class CausalContext:
    """The causal token shared by every routing session in a ``causal_context`` block.

    Sessions read the position of their primary (:meth:`position_for`) before routing a
    read and advance it after committing a write; a web integration reads :attr:`token`
    at the end of the request to hand it back to the client. One context (and its one
    token) covers any number of primaries, each under its scope (see :func:`parse_token`).
    """

    __slots__ = ("_positions", "_token")

    def __init__(self, token: str | None = None) -> None:
        self._positions: dict[Scope, int] = {}
        self._token: str | None = None
        self.observe(token)

    @property
    def token(self) -> str | None:
        """The token covering every position observed (one opaque string), or None."""
        return self._token

    @property
    def position(self) -> int | None:
        """The unscoped position (a plain :class:`~sqlalchemy_scale.ReplicaSet`'s), or None."""
        return self._positions.get(None)

    @property
    def positions(self) -> Mapping[Scope, int]:
        """Every position observed, by scope (read-only view)."""
        return MappingProxyType(self._positions)

    def position_for(self, scope: Scope) -> int | None:
        """The position reads of the primary of ``scope`` must see, or None."""
        return self._positions.get(scope)

    def observe(self, token: str | None) -> None:
        """Advance the context to ``token``'s positions where they are newer (invalid tokens
        raise; a position already found ahead of its primary is ignored)."""
        if token is None:
            return
        for scope, position in parse_token(token).items():
            self.observe_position(position, scope)

    def observe_position(self, position: int, scope: Scope = None) -> None:
        """:meth:`observe` for one WAL position of ``scope``, given as an integer."""
        if _REJECTED and (scope, position) in _REJECTED:
            return
        current = self._positions.get(scope)
        if current is None or position > current:
            self._positions[scope] = position
            self._token = format_token(self._positions)

    def cap(self, position: int, scope: Scope = None) -> None:
        """Bring the position of ``scope`` back to ``position`` (its primary's own) if it is
        ahead of it: its token was one no commit produced."""
        current = self._positions.get(scope)
        if current is not None and current > position:
            self._positions[scope] = position
            self._token = format_token(self._positions)

    def __repr__(self) -> str:
        return f"CausalContext(token={self._token!r})"


@contextmanager
def causal_context(token: str | None = None) -> Iterator[CausalContext]:
    """Make every routing session in the block read at least ``token``'s writes.

    Yields the :class:`CausalContext`; after the block its ``token`` is the newest
    write committed inside it (or the token given). Blocks nest: an inner block starts
    from the outer block's token and the outer block learns the inner block's commits.
    """
    outer = _CONTEXT.get()
    ctx = CausalContext(outer.token if outer is not None else None)
    ctx.observe(token)
    reset = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(reset)
        if outer is not None:
            outer.observe(ctx.token)


def current_causal_context() -> CausalContext | None:
    """The innermost active :func:`causal_context`, or None."""
    return _CONTEXT.get()


#: :func:`current_causal_context` as the ContextVar's own getter, without a Python frame:
#: routing asks for every transaction's first read.
get_causal_context: Final = _CONTEXT.get


#: The primary's WAL insert position, read right after a commit: past the commit record
#: whatever ``synchronous_commit`` the transaction ran with (a ``SET LOCAL
#: synchronous_commit = off`` is already undone when this runs, so the setting cannot be
#: asked). At worst it is a little ahead of what has been flushed and streamed, and a read
#: goes to the primary until the next WAL flush; it is never behind the commit. Also the
#: block size, for :func:`reachable_position`, the first time on a connection.
WAL_POSITION_SQL: Final = (
    "SELECT pg_current_wal_insert_lsn()::text, current_setting('wal_block_size')::int"
)
#: The same position once the connection's server's block size is known (it is fixed when
#: the server is built, and a connection talks to one server): ``current_setting()`` costs
#: the server about as much as the rest of the statement.
WAL_INSERT_SQL: Final = "SELECT pg_current_wal_insert_lsn()"

# Key of the block size in a pooled connection's info (SQLAlchemy's ConnectionRecord.info).
_BLOCK_SIZE: Final = "sqlalchemy_scale_wal_block_size"

# Page header sizes (SizeOfXLogShortPHD, SizeOfXLogLongPHD).
_PAGE_HEADERS: Final = (24, 40)


def reachable_position(lsn: str, block_size: int) -> int:
    """A WAL position as a replica will report it once it has replayed everything before it.

    A position just past a page header (a fresh page with no record on it yet) is the page
    boundary to a replica, whose replay LSN is the end of the last record: without this,
    a token could stay 24 bytes ahead of every replica until the next write.
    """
    value = parse_lsn(lsn)
    offset = value % block_size
    return value - offset if offset in _PAGE_HEADERS else value


def read_primary_position(engine: Engine) -> int:
    """The primary's WAL position now (one round trip), as :data:`WAL_POSITION_SQL` reads it
    after a commit: no token a commit produced can be ahead of it."""
    with engine.connect() as conn:
        pooled = conn.connection
        return read_commit_lsn(pooled.dbapi_connection, pooled.info)


def read_commit_lsn(dbapi_connection: Any, info: dict[Any, Any] | None = None) -> int:
    """Ask the primary for its WAL position on a connection whose transaction just committed.

    Runs in driver autocommit mode (a client-side switch for psycopg2 and psycopg 3), so
    it costs exactly one round trip and leaves no transaction open behind it. ``info`` (the
    pooled connection's) keeps the server's block size after the first call.
    """
    block_size = info.get(_BLOCK_SIZE) if info is not None else None
    was_autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(WAL_POSITION_SQL if block_size is None else WAL_INSERT_SQL)
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        dbapi_connection.autocommit = was_autocommit
    if block_size is None:
        block_size = int(row[1])
        if info is not None:
            info[_BLOCK_SIZE] = block_size
    return reachable_position(str(row[0]), block_size)


# -- hooks on a primary engine: commit position and commit outcome -------------------------

#: COMMIT and the position query in one simple-query message: the server finishes the
#: COMMIT (commit record written and flushed, synchronous standbys waited for) before it
#: runs the SELECT, so the position is read past the commit record exactly as when
#: :data:`WAL_POSITION_SQL` is sent after the COMMIT. A COMMIT that fails stops the
#: message there; a query that fails after a COMMIT that succeeded only loses the position
#: (each statement's result is read on its own). Sent by psycopg 3 connections of primary
#: engines the ReplicaSet built (see :func:`install_primary_hooks`) once the query has
#: answered on the connection (the first commit sends them apart, and a query the server
#: refuses then is not sent again); psycopg2 keeps a separate round trip, because it
#: tracks the transaction on the client and would send its own COMMIT after ours.
COMMIT_AND_POSITION_SQL: Final = "COMMIT; " + WAL_INSERT_SQL


class _Committer(Protocol):
    """What the error hook needs from the routing session whose commit is in progress."""

    def is_primary_connection(self, connection: Connection | None) -> bool: ...

    def get_transaction(self) -> SessionTransaction | None: ...

    def note_unknown_commit(self, connection: Connection) -> None: ...


# The routing session whose outermost commit is in progress in this context: set by its
# before_commit hook (which fires before the flush that may open the primary connection),
# cleared when its transaction ends.
_COMMITTING: ContextVar[_Committer | None] = ContextVar("sqlalchemy_scale_committing", default=None)

# SQLSTATE classes that say the connection, not the transaction, failed: 08 connection
# exception (PgBouncer's "server conn crashed?" is 08P01), 57 operator intervention
# (57P01 pg_terminate_backend, 57014 cancel). At COMMIT they leave the outcome unknown:
# the commit record may already be written.
_LOST_CLASSES: Final = ("08", "57")


def _connection_lost(context: ExceptionContext) -> bool:
    if context.is_disconnect:
        return True
    orig = context.original_exception
    code = sqlstate(orig)
    return code is None or code[:2] in _LOST_CLASSES


def _in_commit(context: ExceptionContext) -> bool:
    """Whether an error on a primary is its routing session's COMMIT failing.

    The driver's commit() fails with no statement; so does a ROLLBACK. They are told apart
    by the session's transaction: SQLAlchemy commits connections only once the transaction
    is prepared (flushed, no longer active), and in that state it sends nothing else on a
    connection whose commit has not yet failed.
    """
    if context.statement is not None or context.connection is None:
        return False
    committer = _COMMITTING.get()
    if committer is None or not committer.is_primary_connection(context.connection):
        return False
    transaction = committer.get_transaction()
    return transaction is not None and not transaction.is_active


def _positioned_connection_class() -> type[Any]:
    """A psycopg 3 connection whose commit() also reads the WAL position, when asked to.

    The COMMIT and the position query go out as one simple-query message, sent and
    answered as psycopg sends its own COMMIT (:meth:`psycopg.Connection.wait` on psycopg's
    ``send``/``fetch`` generators: other threads run while the server works). Each
    statement's result is read in turn, so the COMMIT's own answer decides the outcome:
    a COMMIT that failed is raised as psycopg raises it
    (:func:`psycopg.errors.error_from_result`), so SQLAlchemy wraps it, calls handle_error
    and invalidates a lost connection as for the driver's own commit(); a COMMIT that
    succeeded is reported as committed whatever happens to the query after it (refused,
    cancelled, its connection lost), with no position: the session then reads the
    primary's own before its next read (Router.note_unknown_commit). psycopg's later
    commit() finds the connection idle and sends nothing.
    """
    global _POSITIONED
    if _POSITIONED is None:
        import psycopg
        from psycopg import generators
        from psycopg.pq import ExecStatus, TransactionStatus
        from psycopg.pq.abc import PGresult

        first, later = WAL_POSITION_SQL.encode(), COMMIT_AND_POSITION_SQL.encode()

        class PositionedConnection(psycopg.Connection[Any]):
            # Set when a sharded session's transaction begins on this connection (a routing
            # session's commit asks by being the committer, _COMMITTING); the position is
            # left for the session's after_commit hook, and forgotten at the next commit.
            wants_position = False
            position: int | None = None
            # None until the position query first answered on this connection; 0 if the
            # server refused it (no EXECUTE on pg_current_wal_insert_lsn()).
            block_size: int | None = None

            def commit(self) -> None:
                wanted = self.wants_position or _COMMITTING.get() is not None
                self.wants_position = False
                self.position = None
                block_size = self.block_size
                if (
                    not wanted
                    or block_size == 0
                    or self.closed
                    or self.pgconn.transaction_status != TransactionStatus.INTRANS
                ):
                    super().commit()
                    return
                if block_size is None:
                    # The first time, COMMIT alone and then the query: one that the server
                    # refuses must not make a COMMIT that succeeded look failed.
                    super().commit()
                    results, _ = self._results(first)
                    if not results or results[0].status != ExecStatus.TUPLES_OK:
                        self.block_size = 0  # never asked again on this connection
                        return
                    row = results[0]
                    block_size = self.block_size = int(row.get_value(0, 1) or 0)
                else:
                    results, failure = self._results(later)
                    if not results or results[0].status != ExecStatus.COMMAND_OK:
                        self._raise_commit_failure(results, failure)
                    if len(results) < 2 or results[1].status != ExecStatus.TUPLES_OK:
                        # Committed: only the position is lost (the session reads the
                        # primary's own before its next read).
                        log.warning(
                            "could not read the primary's WAL position with COMMIT: %s",
                            _describe_result(results[1:], failure),
                        )
                        return
                    row = results[1]
                lsn = row.get_value(0, 0)
                if lsn is not None and block_size:
                    self.position = reachable_position(lsn.decode(), block_size)

            def _results(self, command: bytes) -> tuple[list[PGresult], Exception | None]:
                """Send ``command`` (one simple-query message) and read each statement's
                result in turn until the last: those received, and the error that ended
                the reading early (the connection lost), if one did."""
                results: list[PGresult] = []
                try:
                    with self.lock:
                        self.pgconn.send_query(command)
                        self.wait(generators.send(self.pgconn))
                        while (result := self.wait(generators.fetch(self.pgconn))) is not None:
                            results.append(result)
                except psycopg.Error as exc:
                    return results, exc
                return results, None

            def _raise_commit_failure(
                self, results: list[PGresult], failure: Exception | None
            ) -> NoReturn:
                error: Exception
                if results:
                    error = psycopg.errors.error_from_result(
                        results[0], encoding=self.info.encoding
                    )
                else:
                    assert failure is not None
                    error = failure
                if type(error) is psycopg.DatabaseError and (self.closed or not results):
                    # No SQLSTATE and the connection gone: psycopg's own commit() says
                    # OperationalError here, and so do we.
                    raise psycopg.OperationalError(str(error)) from None
                raise error

            def rollback(self) -> None:
                self.wants_position = False
                super().rollback()

        _POSITIONED = PositionedConnection
    return _POSITIONED


def _describe_result(results: list[Any], failure: BaseException | None) -> str:
    """Why a position query got no row: its error's SQLSTATE, or the driver error's type."""
    from psycopg.pq import DiagnosticField

    for result in results:
        code = result.error_field(DiagnosticField.SQLSTATE)
        if code:
            return f"SQLSTATE {code.decode()}"
    return type(failure).__name__ if failure is not None else "no answer"


_POSITIONED: type[Any] | None = None


def request_commit_position(conn: Connection) -> None:
    """Ask ``conn``'s driver connection to read the WAL position with its next COMMIT
    (a no-op unless :func:`install_primary_hooks` gave it that ability)."""
    dbapi_connection = conn.connection.dbapi_connection
    if _POSITIONED is not None and isinstance(dbapi_connection, _POSITIONED):
        dbapi_connection.wants_position = True
        dbapi_connection.position = None


def install_primary_hooks(
    engine: Engine,
    *,
    set_name: str,
    node_name: str,
    owns_engine: bool = False,
    commit_positions: bool = True,
) -> None:
    """Listen on a primary's engine so that a connection lost during a routing session's
    COMMIT raises :class:`~sqlalchemy_scale.CommitOutcomeUnknown`, and, on a psycopg 3
    engine the ReplicaSet built itself (``owns_engine``) that records ``commit_positions``
    (``read_your_writes`` is not ``"off"``), open connections whose COMMIT carries the WAL
    position query (:data:`COMMIT_AND_POSITION_SQL`).

    Both are dialect events (``handle_error`` runs only when an error happens,
    ``do_connect`` only for a new connection): connection-level events would put every
    statement on SQLAlchemy's event-dispatching path, which costs a write transaction
    more than the round trip saved. A ``do_connect`` listener that returns a connection
    ends the chain, so listeners added to such an engine *after* the ReplicaSet was
    built do not run; add them to an engine you build and pass in instead.
    """

    def on_error(context: ExceptionContext) -> BaseException | None:
        # A lost connection during COMMIT leaves the outcome unknown: the server may have
        # committed before it went.
        if context.engine is not engine or not _in_commit(context):
            return None
        if not _connection_lost(context):
            return None
        committer = _COMMITTING.get()
        if committer is not None and context.connection is not None:
            # Its later reads must see this commit if it happened.
            committer.note_unknown_commit(context.connection)
        orig = context.original_exception
        return CommitOutcomeUnknown(
            f"the connection to primary {node_name!r} of {set_name!r} was lost during COMMIT; "
            "the transaction may or may not have committed. Read back what it wrote to "
            f"reconcile before retrying ({type(orig).__name__}: {' '.join(str(orig).split())[:160]})",
            node=node_name,
            orig=orig,
        )

    event.listen(engine, "handle_error", on_error)
    # psycopg_async's dialect also says driver "psycopg": its connections are async ones.
    if (
        owns_engine
        and commit_positions
        and engine.dialect.driver == "psycopg"
        and not engine.dialect.is_async
    ):
        connection_class = _positioned_connection_class()

        def on_connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
            return connection_class.connect(*cargs, **cparams)

        event.listen(engine, "do_connect", on_connect)


def take_commit_position(conn: Connection | None) -> int | None:
    """The WAL position read with the COMMIT just made on ``conn``, if it was."""
    if conn is None or conn.invalidated or conn.closed:
        return None
    dbapi_connection = conn.connection.dbapi_connection
    if _POSITIONED is None or not isinstance(dbapi_connection, _POSITIONED):
        return None
    position: int | None = dbapi_connection.position
    dbapi_connection.position = None
    return position


def commit_position(conn: Connection | None) -> int | None:
    """The primary's WAL position after the commit just made on ``conn`` (one round trip),
    or None if there is no usable connection or the position cannot be read."""
    if conn is None or conn.invalidated or conn.closed:
        return None
    try:
        pooled = conn.connection
        return read_commit_lsn(pooled.dbapi_connection, pooled.info)
    except Exception as exc:  # the commit succeeded; only the token is lost
        log.warning(
            "could not read the primary's WAL position after commit: %s", type(exc).__name__
        )
        return None
