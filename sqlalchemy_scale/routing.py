"""Replica routing: a Session whose ``get_bind`` sends writes to the primary and reads to replicas.

"Why did this statement go there?" is answered in this file:
:meth:`RoutingSession.get_bind` applies the precedence list in its docstring,
:func:`decide_role` classifies a statement by its kind, and the
:class:`~sqlalchemy_scale.topology.ReplicaSet`'s policy picks the replica.

Nothing here adds a round trip: the decision is made in-process from the
statement object, execution options and the session's own state.

When *not* to use it: code that must read what another process has just
committed (replication is asynchronous) should pin the primary with
:meth:`RoutingSession.use_primary` or carry a causal token, and
read-modify-write code should use ``SELECT ... FOR UPDATE`` (which is routed to
the primary) or :meth:`RoutingSession.use_primary`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from typing import Any, Final, ParamSpec, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, SessionTransaction, SessionTransactionOrigin, sessionmaker
from sqlalchemy.sql.ddl import ExecutableDDLElement
from sqlalchemy.sql.elements import ClauseElement, TextClause
from sqlalchemy.sql.functions import FunctionElement

from .consistency import (
    _COMMITTING,
    CausalContext,
    current_causal_context,
    request_commit_position,
)
from .decisions import RoutingDecision, fallback_reason, notify
from .errors import ConfigurationError, NodeUnavailableError, ReplicaWriteError
from .topology import Node, ReplicaSet, Role, _sqlstate

__all__ = [
    "ROUTING_OPTIONS",
    "RoutingSession",
    "decide_role",
    "routing_sessionmaker",
    "use_primary",
]

log = logging.getLogger("sqlalchemy_scale.routing")

P = ParamSpec("P")
R = TypeVar("R")

#: Execution options read by the router (statement-level or per call).
ROUTING_OPTIONS: Final = frozenset({"use_primary", "use_replica"})

# Key under which per-call routing options travel from execute() to get_bind().
_CALL_OPTIONS: Final = "_sqlalchemy_scale_options"

# The pins in force in this context, innermost last: each entry is the set of pinned keys
# (0 = every session, id(session) = that session). Kept as a stack in the ContextVar itself
# rather than as Tokens on the use_primary object, so one object may be entered from several
# threads or asyncio tasks at once. Empty (the fast path) when nothing is pinned.
_PINS: ContextVar[tuple[frozenset[int], ...]] = ContextVar("sqlalchemy_scale_pins", default=())
_GLOBAL_PIN: Final = 0

# Statements that certainly write or lock: use_replica=True on them is refused.
_DEFINITE_WRITES: Final = frozenset({"flush", "write", "ddl", "locking read"})

# Reasons a statement must run on the primary because it writes or locks. Once one of these
# runs, the rest of the transaction stays on the primary.
# (A bare get_bind() never gets here; session.connection() pins the transaction itself.)
_WRITING_REASONS: Final = frozenset(
    {"flush", "write", "ddl", "locking read", "text", "unknown statement kind"}
)


# Session.join_transaction_mode values under which a connection handed over inside a
# transaction is joined without being committed (SQLAlchemy's default is the first).
_JOINS_ROLLBACK_ONLY: Final = frozenset({"conditional_savepoint", "rollback_only"})


# Functions that write (or need a transaction id) when selected: `SELECT nextval('s')`.
_WRITING_FUNCTIONS: Final = frozenset(
    {"nextval", "setval", "txid_current", "pg_current_xact_id", "pg_notify", "lo_create"}
)


def decide_role(clause: ClauseElement | None, *, flushing: bool = False) -> tuple[Role, str]:
    """Return the role a statement needs by its kind alone, and the reason.

    Flushes, INSERT/UPDATE/DELETE, DDL, ``SELECT ... FOR UPDATE/SHARE``, SELECTs of
    advisory-lock or writing functions (``pg_advisory_xact_lock()``, ``nextval()``) and
    ``text()`` go to the primary; other SELECTs go to a replica. A ``text()``
    statement marked ``execution_options(use_replica=True)`` is handled by the
    caller's option check before this function is consulted.
    """
    if flushing:
        return "primary", "flush"
    if clause is None:
        # session.connection() or a bind lookup with no statement: the caller may write.
        return "primary", "no statement"
    if getattr(clause, "is_select", False):
        if getattr(clause, "is_text", False):  # text().columns(): rows, but any SQL at all
            return "primary", "text"
        if getattr(clause, "_for_update_arg", None) is not None:
            return "primary", "locking read"
        for column in getattr(clause, "_raw_columns", ()):
            function = getattr(column, "element", column)  # through a label
            if isinstance(function, FunctionElement):
                name = function.name.lower()
                if "advisory" in name:  # a lock taken on a replica excludes nothing
                    return "primary", "locking read"
                if name in _WRITING_FUNCTIONS:
                    return "primary", "write"
        return "replica", "read"
    if clause.is_dml:
        return "primary", "write"
    if isinstance(clause, ExecutableDDLElement):
        return "primary", "ddl"
    if isinstance(clause, TextClause):
        return "primary", "text"
    return "primary", "unknown statement kind"


class use_primary:
    """Pin reads to the primary, as a ``with`` block or a decorator.

    ``ss.use_primary()`` pins every :class:`RoutingSession` in the current
    context (thread or asyncio task); ``session.use_primary()`` pins one
    session. Pins nest and are undone on exit; they live in a
    :class:`~contextvars.ContextVar`, so they are correct across threads and tasks,
    and one object may be used by several of them at once.

    As a decorator it wraps functions and coroutine functions. Generators are
    refused (``TypeError``): the pin would end before their body runs; open the
    ``with`` block inside the generator instead.
    """

    def __init__(self, session: RoutingSession | None = None) -> None:
        self._key = _GLOBAL_PIN if session is None else id(session)
        self._session = session

    def __enter__(self) -> None:
        pins = _PINS.get()
        top = pins[-1] | {self._key} if pins else frozenset({self._key})
        _PINS.set((*pins, top))

    def __exit__(self, *exc: object) -> None:
        _PINS.set(_PINS.get()[:-1])

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"use_primary() cannot decorate the generator {fn.__qualname__}: the pin "
                "would end before its body runs; use `with ...use_primary():` inside it"
            )
        session = self._session
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with use_primary(session):
                    return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with use_primary(session):
                return fn(*args, **kwargs)

        return wrapper


class RoutingSession(Session):
    """A :class:`~sqlalchemy.orm.Session` that routes each statement to the primary or a replica.

    :param replica_set: the :class:`~sqlalchemy_scale.ReplicaSet` to route over.
    :param default_role: ``"replica"`` (default) routes plain reads to replicas;
        ``"primary"`` routes everything to the primary unless a statement opts in
        with ``execution_options(use_replica=True)``, the safe default for write paths.
    :param causal_token: a causal token (see :mod:`sqlalchemy_scale.consistency`): reads
        go only to replicas that have replayed it, else to the primary.

    Other keyword arguments are :class:`~sqlalchemy.orm.Session`'s. Build it with
    :func:`routing_sessionmaker` or ``sessionmaker(class_=RoutingSession, replica_set=...)``.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        bind: Engine | Connection | None = None,
        *,
        replica_set: ReplicaSet,
        default_role: Role = "replica",
        causal_token: str | None = None,
        **kw: Any,
    ) -> None:
        if not isinstance(replica_set, ReplicaSet):
            raise ConfigurationError(
                f"RoutingSession needs replica_set=ReplicaSet(...), got {type(replica_set).__name__}"
            )
        if default_role not in ("primary", "replica"):
            raise ConfigurationError(
                f"default_role must be 'primary' or 'replica', got {default_role!r}"
            )
        super().__init__(bind, **kw)
        self.replica_set = replica_set
        self.default_role: Role = default_role
        self._causal = CausalContext(causal_token)
        self._has_written = False
        self._txn_replica: Node | None = None
        self._txn_statements = 0
        self._last_node: Node | None = None
        self._primary_connection: Connection | None = None
        #: Why this transaction's reads fell back to the primary (for logs and listeners).
        self._fallback_reason = "fallback: no usable replica"
        self._committing: Token[Any] | None = None
        # The transaction's replica connection, joined to the session in "rollback_only"
        # mode so that commit() never sends anything on it (see _replica_bind), and the
        # depth of this session's own execute() calls (only they get such a connection).
        self._replica_connection: Connection | None = None
        self._replica_engine_used = False
        self._executing = 0

    # -- public state ------------------------------------------------------------------

    @property
    def has_written(self) -> bool:
        """True once the current transaction has sent a write (or lock) to the primary."""
        return self._has_written

    @property
    def causal_token(self) -> str | None:
        """The newest causal token this session honours: the one it was given, or the
        primary's WAL position after its latest committed write."""
        return self._causal.token

    def use_primary(self) -> use_primary:
        """Pin this session's statements to the primary: ``with session.use_primary(): ...``
        (also usable as a decorator)."""
        return use_primary(self)

    # -- routing -------------------------------------------------------------------------

    def get_bind(
        self,
        mapper: Any = None,
        *,
        clause: ClauseElement | None = None,
        bind: Engine | Connection | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        """Return the engine that runs a statement.

        The first rule that applies decides:

        1. statement: ``execution_options(use_primary=True)`` or ``use_replica=True``
           (on the statement or passed to ``execute()``); ``use_replica`` on a
           statement that writes raises :class:`~sqlalchemy_scale.ReplicaWriteError`;
        2. block: inside ``with session.use_primary():`` or ``with ss.use_primary():``;
        3. transaction: once the current transaction has written (flush, DML, DDL,
           locking read, unmarked ``text()``), the primary until it ends;
        4. session: ``RoutingSession(default_role="primary")``;
        5. causal token: a read needs a replica that has replayed the session's or the
           :func:`~sqlalchemy_scale.causal_context`'s token, else the primary;
        6. statement kind (:func:`decide_role`): writes, DDL, ``FOR UPDATE/SHARE``
           and unmarked ``text()`` go to the primary, other SELECTs to a replica.

        A read routed to a replica stays on the replica that served the transaction's
        first read. With no usable replica, reads go to the primary (logged once).
        An explicit ``bind`` argument is returned unchanged.
        """
        if bind is not None:
            self._last_node = None  # not ours: a failure on it is not a replica's
            return bind
        if clause is None and not self._flushing:
            # A bare get_bind() (session.connection(), pandas.read_sql(q, session.get_bind()))
            # names no statement: the primary, with no effect on routing state. connection()
            # pins the transaction itself, since it hands out something to write through.
            return self.replica_set.primary.engine
        role, reason = decide_role(clause, flushing=self._flushing)
        kind = reason
        options = kw.get(_CALL_OPTIONS)
        stmt_options: Mapping[str, Any] | None = getattr(clause, "_execution_options", None)
        if stmt_options:
            options = {**stmt_options, **options} if options else stmt_options
        if reason in _WRITING_REASONS and not (
            reason == "text" and options and options.get("use_replica")
        ):
            # text() marked use_replica=True is the user's word that it only reads.
            self._has_written = True
        if options and options.get("use_primary"):
            role, reason = "primary", "use_primary option"
        elif options and options.get("use_replica"):
            if reason in _DEFINITE_WRITES:
                raise ReplicaWriteError(
                    f"use_replica=True was set on a statement that writes ({reason}); replica "
                    f"nodes of {self.replica_set.name!r} cannot run it, nothing was sent",
                    node="replica",
                    statement=str(clause) if clause is not None else None,
                )
            role, reason = "replica", "use_replica option"
        elif role == "replica":
            pins = _PINS.get()
            if pins and (_GLOBAL_PIN in pins[-1] or id(self) in pins[-1]):
                role, reason = "primary", "use_primary block"
            elif self._has_written:
                role, reason = "primary", "transaction has written"
            elif self.default_role == "primary":
                role, reason = "primary", "session default_role"
        node = self._node_for(role)
        self._txn_statements += 1
        self._last_node = node
        listeners = self.replica_set.decision_listeners
        if listeners or log.isEnabledFor(logging.DEBUG):  # nobody watching: nothing more
            if role == "replica" and node.role == "primary":
                reason = self._fallback_reason
            log.debug("[%s] %s: %s", node.name, self.replica_set.name, reason)
            if listeners:
                notify(
                    listeners, RoutingDecision(self, self.replica_set, node, reason, kind, clause)
                )
        if node.is_replica:
            if self._executing and not self._replica_engine_used:
                return self._replica_bind(node)
            # Session may connect the engine itself now; it then refuses a second connection
            # to the same engine in this transaction, so the rest of it uses the engine too.
            self._replica_engine_used = self._replica_connection is None
        return node.engine

    def _replica_bind(self, node: Node) -> Engine | Connection:
        """The transaction's connection to its replica, already in a transaction.

        Session joins a connection handed to it inside a transaction in "rollback_only"
        mode: its commit() commits only the primary, and close() leaves the replica's
        read-only transaction to :meth:`_end_transaction`, which ends it and ignores a
        failure (nothing was written there). So a replica that fails can neither decide
        nor obscure the outcome of the primary's COMMIT, whatever order SQLAlchemy would
        commit the session's connections in, and a read-only session does not raise at
        close. Only for this session's own statements: a bare ``get_bind()`` has no side
        effects, and a session that would commit joined connections (another
        ``join_transaction_mode``) gets the engine as before.
        """
        conn = self._replica_connection
        if conn is None:
            if self.join_transaction_mode not in _JOINS_ROLLBACK_ONLY:
                return node.engine
            conn = node.engine.connect()
            conn.begin()  # nothing is sent yet: the driver begins with the first statement
            self._replica_connection = conn
        return conn

    def close(self) -> None:
        """Close the session; a server lost while its transaction is being discarded (the
        ROLLBACK fails as a disconnect) is logged, not raised: an open transaction dies with
        its connection, so nothing is lost, and the connection has been invalidated."""
        try:
            super().close()
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            self._end_transaction()
            log.warning(
                "%s: a connection was lost while the session closed (%s); its transaction was "
                "discarded with it",
                self.replica_set.name,
                type(exc.orig).__name__,
            )

    def connection(self, bind_arguments: Any = None, execution_options: Any = None) -> Connection:
        """The transaction's connection for a bind (the primary unless ``bind_arguments``
        say otherwise). A connection to the primary may be written through, so the rest of
        the transaction reads from the primary too."""
        conn = super().connection(
            bind_arguments=bind_arguments, execution_options=execution_options
        )
        if conn.engine is self.replica_set.primary.engine:
            self._has_written = True
        return conn

    def _causal_position(self) -> int | None:
        own = self._causal.position
        process = self.replica_set.process_position  # read_your_writes="process"
        if process is not None and process.position is not None:
            own = process.position if own is None else max(own, process.position)
        ctx = current_causal_context()
        if ctx is None or ctx.position is None:
            return own
        return ctx.position if own is None else max(own, ctx.position)

    def _checked_causal_position(self) -> int | None:
        position = self._causal_position()
        if position is None:
            return None
        checked = self.replica_set.check_causal_position(position)
        if checked != position:  # a token ahead of the primary: drop it where it is kept
            self._causal.cap(checked)
            ctx = current_causal_context()
            if ctx is not None:
                ctx.cap(checked)
        return checked

    def _node_for(self, role: Role) -> Node:
        replica_set = self.replica_set
        if role == "primary":
            replica_set.primary.count()
            return replica_set.primary
        node = self._txn_replica
        if node is None:
            position = self._checked_causal_position()
            node = replica_set.choose_replica(position)
            if node is None:
                # The rest of this transaction reads from the primary too: no second
                # choice (and no second wait for a caught-up replica) per statement.
                self._fallback_reason = fallback_reason(replica_set, position)
                self._txn_replica = node = replica_set.primary
                node.count(fallback=True)
                return node
            self._txn_replica = node
        node.count()
        return node

    def _end_transaction(self) -> None:
        if self._replica_connection is not None:
            conn, self._replica_connection = self._replica_connection, None
            _end_read_only(conn, self._where(self._txn_replica))
        self._has_written = False
        self._txn_replica = None
        self._txn_statements = 0
        self._last_node = None
        self._primary_connection = None
        self._replica_engine_used = False

    def rollback(self) -> None:
        """Roll back the current transaction (see :meth:`~sqlalchemy.orm.Session.rollback`).

        The replica's read-only transaction is ended first, and a failure there (its
        connection was lost) is logged and the connection discarded: rolling back a
        transaction that wrote nothing on the replica cannot lose anything, so it does
        not raise. (A ``with session.begin():`` block left by an exception rolls back
        through SQLAlchemy's own transaction object, which this cannot reach: there a lost
        replica connection still raises, chained to the block's exception.)
        """
        conn = self._replica_connection
        # (Not under a savepoint: SQLAlchemy rolls back to it first, on the replica too.)
        if conn is not None and not conn.invalidated and self.get_nested_transaction() is None:
            try:
                # The driver's own rollback: SQLAlchemy's rollback then finds the driver
                # idle and sends nothing.
                conn.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
            except Exception as exc:
                _log_read_only_failure(self._where(self._txn_replica), exc)
                conn.invalidate()
        super().rollback()

    def _where(self, node: Node | None) -> str:
        return f"replica {node.name if node is not None else '?'} of {self.replica_set.name!r}"

    # -- causal tokens -------------------------------------------------------------------

    def _record_commit(self, position: int) -> None:
        self._causal.observe_position(position)
        ctx = current_causal_context()
        if ctx is not None:
            ctx.observe_position(position)

    # -- execution: options in, replica failures handled -----------------------------------

    # Per-call execution options are not passed to get_bind() by Session; carry the routing
    # ones in bind_arguments (which are). Doing it here rather than in a do_orm_execute hook
    # keeps SQLAlchemy's fast path: any do_orm_execute listener makes every ORM statement run
    # orm_pre_session_exec twice.
    def execute(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self._routed(super().execute, statement, params, kw)

    def scalars(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self._routed(super().scalars, statement, params, kw)

    def scalar(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self._routed(super().scalar, statement, params, kw)

    def _routed(
        self, method: Callable[..., Any], statement: Any, params: Any, kw: dict[str, Any]
    ) -> Any:
        kw = _with_call_options(kw)
        self._executing += 1
        try:
            try:
                return method(statement, params, **kw)
            except (DBAPIError, OSError) as exc:  # OSError: asyncpg's refused connect, unwrapped
                self._after_failure(exc)  # raises unless the statement may run once more
            return method(statement, params, **kw)
        finally:
            self._executing -= 1

    def _after_failure(self, exc: DBAPIError | OSError) -> None:
        """Return to retry the statement once; raise otherwise.

        Only a *replica that failed as a node* (lost or refused connection) is handled: it
        is taken out of rotation, and the read is retried on another node if it was the
        transaction's first statement, nothing was written and nothing is pending in the
        session (a rollback must lose nothing). Any other error is re-raised untouched.
        """
        node = self._last_node
        if node is None or not node.is_replica or not _is_node_failure(exc):
            raise exc
        self.replica_set.mark_down(node, exc)
        if isinstance(exc, DBAPIError) and not exc.connection_invalidated:
            # The server reported its own shutdown (57P0x) and SQLAlchemy kept the connection:
            # drop it, so that the rollback below (or the caller's) sends nothing on it.
            with contextlib.suppress(DBAPIError, OSError):  # already gone: nothing to drop
                self.connection(bind_arguments={"bind": node.engine}).invalidate()
        transaction = self.get_transaction()
        retryable = (
            self._txn_statements == 1
            and not self._has_written
            and not (self.new or self.dirty or self.deleted)
            # Only a transaction the session began by itself may be rolled back and begun
            # again; one opened by `with session.begin():` belongs to the caller's block.
            # (None: the replica's connection failed before the transaction began.)
            and (transaction is None or transaction.origin is SessionTransactionOrigin.AUTOBEGIN)
        )
        if not retryable:
            raise NodeUnavailableError(
                f"replica {node.name!r} of {self.replica_set.name!r} failed in the middle of a "
                f"transaction ({self._txn_statements} statements in); it is out of rotation. "
                "Roll back and run the unit of work again.",
                node=node.name,
                orig=getattr(exc, "orig", exc),
            ) from exc
        log.warning(
            "%s: replica %s failed a read (%s); retrying it once on another node",
            self.replica_set.name,
            node.name,
            type(getattr(exc, "orig", exc)).__name__,
        )
        node.count_retry()
        if transaction is None:
            self._end_transaction()  # nothing began: only the routing state to reset
        else:
            self.rollback()


def _end_read_only(conn: Connection, where: str) -> None:
    """End a replica connection's read-only transaction and return it to its pool.

    A ROLLBACK that fails (the replica's backend was terminated, the server went away)
    loses nothing: the connection is discarded, the failure logged, and nothing raised.
    """
    try:
        conn.close()  # ROLLBACK, then back to the pool
    except DBAPIError as exc:
        _log_read_only_failure(where, exc)
        if not conn.closed:  # SQLAlchemy 2.1 closes it even when the ROLLBACK fails
            conn.invalidate()
            conn.close()


def _log_read_only_failure(where: str, exc: BaseException) -> None:
    orig = getattr(exc, "orig", None) or exc
    log.warning(
        "ending a read-only transaction on %s failed (%s); nothing was lost, the connection "
        "is discarded",
        where,
        type(orig).__name__,
    )


def _is_node_failure(exc: DBAPIError | OSError) -> bool:
    # A disconnect SQLAlchemy detected, or an OperationalError without a SQLSTATE: libpq's
    # own "could not connect" / "server closed the connection" errors. Errors the server
    # reports (syntax, conflicts with recovery, ...) carry a SQLSTATE and are not node failures.
    # asyncpg's connect() raises OSError (refused, unreachable), which SQLAlchemy passes on.
    if isinstance(exc, OSError):
        return True
    if exc.connection_invalidated:
        return True
    sqlstate = _sqlstate(exc.orig)
    # 57P01-57P03: the server is shutting down, crashed, or not accepting connections (a
    # query in flight when its server dies gets 57P01 "unexpected postmaster exit").
    # asyncpg reports it as a plain DBAPIError, psycopg as an OperationalError.
    if sqlstate in _DOWN_SQLSTATES:
        return True
    return isinstance(exc, OperationalError) and sqlstate is None


_DOWN_SQLSTATES: Final = frozenset({"57P01", "57P02", "57P03"})


def _with_call_options(kw: dict[str, Any]) -> dict[str, Any]:
    options = kw.get("execution_options")
    if options and not ROUTING_OPTIONS.isdisjoint(options):
        routing = {k: options[k] for k in ROUTING_OPTIONS if k in options}
        kw["bind_arguments"] = {**(kw.get("bind_arguments") or {}), _CALL_OPTIONS: routing}
    return kw


# Session events, not engine events: connection-level listeners would put every statement
# of the application's primary engine on SQLAlchemy's slower, event-dispatching path.


@event.listens_for(RoutingSession, "after_begin")
def _after_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    if (
        isinstance(session, RoutingSession)
        and connection.engine is session.replica_set.primary.engine
    ):
        session._primary_connection = connection
        if session.replica_set.read_your_writes != "off":
            request_commit_position(connection)


# before_commit and after_commit also fire when a savepoint is released
# (begin_nested()); only the outermost commit sends COMMIT.


@event.listens_for(RoutingSession, "before_commit")
def _before_commit(session: Session) -> None:
    if (
        isinstance(session, RoutingSession)
        and session.get_nested_transaction() is None
        and session._committing is None
    ):
        session._committing = _COMMITTING.set(session)


@event.listens_for(RoutingSession, "after_commit")
def _after_commit(session: Session) -> None:
    if (
        not isinstance(session, RoutingSession)
        or not session._has_written
        or session.get_nested_transaction() is not None
    ):
        return
    position = session.replica_set.position_after_commit(session._primary_connection)
    if position is not None:
        session.replica_set.note_primary_position(position)
        session._record_commit(position)


@event.listens_for(RoutingSession, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and isinstance(session, RoutingSession):
        session._end_transaction()
        if session._committing is not None:
            _COMMITTING.reset(session._committing)
            session._committing = None


def routing_sessionmaker(
    replica_set: ReplicaSet, *, default_role: Role = "replica", **kw: Any
) -> sessionmaker[RoutingSession]:
    """A :class:`~sqlalchemy.orm.sessionmaker` of :class:`RoutingSession` over ``replica_set``.

    Keyword arguments are ``sessionmaker``'s (``expire_on_commit=False`` is a good
    choice with replicas: it avoids re-reading just-committed rows from a replica).

    .. versionadded:: 0.1
    """
    if isinstance(replica_set, ReplicaSet) and replica_set.is_async:
        raise ConfigurationError(
            f"ReplicaSet {replica_set.name!r} has async engines; use "
            "ss.async_routing_sessionmaker() for it"
        )
    return sessionmaker(
        class_=RoutingSession, replica_set=replica_set, default_role=default_role, **kw
    )
