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

import logging
from collections.abc import Callable, Iterable
from contextvars import Token
from typing import Any, ClassVar, Final, cast

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, SessionTransaction, SessionTransactionOrigin, sessionmaker
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.util import EMPTY_DICT

from ._sa import is_flushing, transaction_connection
from .consistency import _COMMITTING, newer_token
from .errors import ConfigurationError
from .router import ROUTING_OPTIONS, Router, decide_role, drop_kept_connection, use_primary
from .topology import ReplicaSet, Role

__all__ = [
    "ROUTING_OPTIONS",
    "RoutingSession",
    "decide_role",
    "routing_sessionmaker",
    "use_primary",
]

log = logging.getLogger("sqlalchemy_scale.routing")

# Key under which per-call routing options travel from execute() to get_bind().
CALL_OPTIONS: Final = "_sqlalchemy_scale_options"

# Session.join_transaction_mode values under which a connection handed over inside a
# transaction is joined without being committed (SQLAlchemy's default is the first).
_JOINS_ROLLBACK_ONLY: Final = frozenset({"conditional_savepoint", "rollback_only"})


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
        _check_routing(replica_set, default_role)
        super().__init__(bind, **kw)
        self._route_over(replica_set, default_role, causal_token)

    def _route_over(
        self, replica_set: ReplicaSet, default_role: Role, causal_token: str | None
    ) -> None:
        """Set up routing over ``replica_set`` (checked by :func:`_check_routing`): the part
        of ``__init__`` after Session's."""
        self.replica_set = replica_set
        if causal_token is not None:
            self._causal_token = causal_token
        #: What this session's transaction has done on ``replica_set``, and where its next
        #: statement goes.
        # Positional: a class called with keywords takes CPython's slow path (per session).
        self.router = router = _SessionRouter(replica_set, default_role, causal_token, self)
        # One router per replica set routed over: the replica_set's, and any a subclass
        # adds for other binds (_add_replica_set), each with a primary engine of its own.
        self._routers: tuple[_SessionRouter, ...] = (router,)

    # Per-session and per-transaction state, as class defaults: a fresh session sets none.
    _causal_token: str | None = None
    # The router of the latest statement (None: a bind the caller chose, or no router).
    _last_router: _SessionRouter | None = None
    _committing: Token[Any] | None = None
    # The depth of this session's own execute() calls (only they get a replica
    # connection joined in "rollback_only" mode, see _SessionRouter).
    _executing = 0
    # Inside this session's connection(): its bind is for the transaction, as a statement's.
    _connecting = False

    # -- public state ------------------------------------------------------------------

    @property
    def default_role(self) -> Role:
        """``"replica"``: plain reads go to replicas; ``"primary"``: everything goes to the
        primary unless a statement says ``use_replica=True`` (settable, e.g. per request)."""
        return self.router.default_role

    @default_role.setter
    def default_role(self, role: Role) -> None:
        for router in self._routers:
            router.default_role = role

    @property
    def has_written(self) -> bool:
        """True once the current transaction has sent a write (or lock) to a primary."""
        if len(self._routers) == 1:
            return self.router.has_written
        return any(router.has_written for router in self._routers)

    @property
    def causal_token(self) -> str | None:
        """The newest causal token this session honours: the one it was given, or the
        primary's WAL position after its latest committed write (one token covering every
        primary the session routes over, each under its replica set's ``causal_scope``)."""
        if len(self._routers) == 1:
            return self.router.causal_token
        token = None
        for router in self._routers:
            token = newer_token(token, router.causal_token)
        return token

    @property
    def primary_connection(self) -> Connection | None:
        """The transaction's connection to the primary of ``replica_set``, once it has one."""
        return self._primary_connection(self.router)

    def _primary_connection(self, router: _SessionRouter) -> Connection | None:
        transaction = self.get_transaction()
        if transaction is None:
            return None
        return transaction_connection(transaction, router.replica_set.primary.engine)

    def is_primary_connection(self, connection: Connection | None) -> bool:
        """Whether ``connection`` is this transaction's connection to a primary it routes
        over (the commit-outcome check of :mod:`sqlalchemy_scale.consistency`)."""
        return connection is not None and any(
            self._primary_connection(router) is connection for router in self._routers
        )

    def note_unknown_commit(self, connection: Connection) -> None:
        """The COMMIT on ``connection`` (a primary's) was lost with its outcome unknown: the
        session's next read there must see whatever the primary has by then."""
        router = self._router_for(connection.engine)
        if router is not None:
            router.note_unknown_commit()

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

        The session's :class:`~sqlalchemy_scale.Router` decides, by the numbered
        precedence list of :meth:`Router.decide <sqlalchemy_scale.Router.decide>`
        (statement option, ``use_primary()`` block, transaction has written, session
        ``default_role``, causal token, statement kind).

        A read routed to a replica stays on the replica that served the transaction's
        first read. With no usable replica, reads go to the primary (logged once).
        An explicit ``bind`` argument is returned unchanged; when it is a primary routed
        over and the statement writes, the transaction has written there, as for any write.
        Asked for outside any transaction (``session.get_bind(clause=stmt)``), it says where
        the statement would go and changes nothing: the next transaction starts unwritten.
        """
        if bind is not None:
            self._last_router = None  # not ours: a failure on it is not a replica's
            if self._executing or self._connecting:  # a statement of this transaction
                bound = self._router_for(bind.engine)
                if bound is not None:
                    bound.record_bound_write(clause, is_flushing(self))
            return bind
        if self._picks_binds:
            router = self._route_for(mapper, clause)
            if not isinstance(router, _SessionRouter):  # a bind routed over no replica set
                self._last_router = None
                return router
        else:  # one replica set (no call on this path: it runs for every statement)
            router = self.router
        self._last_router = router
        flushing = is_flushing(self)
        if clause is None and not flushing:
            # A bare get_bind() (session.connection(), pandas.read_sql(q, session.get_bind()))
            # names no statement: the primary, with no effect on routing state. connection()
            # pins the transaction itself, since it hands out something to write through.
            return router.replica_set.primary.engine
        if not (self._executing or flushing or self._connecting or self.in_transaction()):
            # Asked outside any transaction and not to run a statement of ours (a user's
            # get_bind(clause=...)): where it would go, leaving the next transaction alone.
            return router.peek(router.decide(clause, flushing, kw.get(CALL_OPTIONS))).engine
        node = router.route(clause, flushing, kw.get(CALL_OPTIONS), self)  # positional: hot
        if node.is_replica:
            if self._executing and not router.replica_engine_used:
                # The transaction's replica connection, joined read-only (see
                # _SessionRouter's docstring): written out here, since every routed read
                # comes this way.
                conn = router.replica_connection
                if conn is not None:
                    return conn
                if self.join_transaction_mode in _JOINS_ROLLBACK_ONLY:
                    conn = node.engine.connect()
                    conn.begin()  # nothing is sent yet: the driver begins with the first statement
                    router.replica_connection = conn
                    return conn
                return node.engine
            # Session may connect the engine itself now; it then refuses a second connection
            # to the same engine in this transaction, so the rest of it uses the engine too.
            router.replica_engine_used = router.replica_connection is None
        return node.engine

    # -- several replica sets (a subclass routing several binds) -----------------------------

    #: True in a subclass whose :meth:`_route_for` picks a statement's bind.
    _picks_binds: ClassVar[bool] = False

    def _route_for(
        self, mapper: Any, clause: ClauseElement | None
    ) -> _SessionRouter | Engine | Connection:
        """The router of a statement: this session's one. A subclass routing several binds
        (:class:`~sqlalchemy_scale.flask.RoutingFlaskSession`) picks the bind here, and
        returns its router, or the bind's engine when no replica set routes it."""
        return self.router

    def _add_replica_set(
        self, replica_set: ReplicaSet, default_role: Role | None = None
    ) -> _SessionRouter:
        """Route statements on another primary (a bind) over ``replica_set`` too: a Router of
        its own in this session's transaction, keyed by its primary engine.

        Each replica set needs its own primary engine and ``causal_scope``: the scope names
        its position in the one causal token covering them all.
        """
        engine = replica_set.primary.engine
        for other in self._routers:
            if other.replica_set.primary.engine is engine or (
                other.replica_set.causal_scope == replica_set.causal_scope
            ):
                raise ConfigurationError(
                    f"ReplicaSet {replica_set.name!r} shares its primary engine or its "
                    f"causal_scope ({replica_set.causal_scope!r}) with ReplicaSet "
                    f"{other.replica_set.name!r} in one session; give each primary its own "
                    "engine and causal_scope"
                )
        router = _SessionRouter(
            replica_set,
            self.default_role if default_role is None else default_role,
            self._causal_token,
            self,
        )
        self._routers = (*self._routers, router)
        return router

    def _router_for(self, engine: Engine) -> _SessionRouter | None:
        """The router of the replica set whose primary engine is ``engine``, if any."""
        for router in self._routers:
            if router.replica_set.primary.engine is engine:
                return router
        return None

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
        self._connecting = True
        try:
            conn = super().connection(
                bind_arguments=bind_arguments, execution_options=execution_options
            )
        finally:
            self._connecting = False
        router = self._router_for(conn.engine)
        if router is not None:
            router.record_connection(conn.engine)
        return conn

    def _end_transaction(self) -> None:
        for router in self._routers:
            router.end_transaction()

    def rollback(self) -> None:
        """Roll back the current transaction (see :meth:`~sqlalchemy.orm.Session.rollback`).

        The replica's read-only transaction is ended first, and a failure there (its
        connection was lost) is logged and the connection discarded: rolling back a
        transaction that wrote nothing on the replica cannot lose anything, so it does
        not raise. (A ``with session.begin():`` block left by an exception rolls back
        through SQLAlchemy's own transaction object, which this cannot reach: there a lost
        replica connection still raises, chained to the block's exception.)
        """
        # (Not under a savepoint: SQLAlchemy rolls back to it first, on the replica too.)
        if self.get_nested_transaction() is None:
            for router in self._routers:
                router.roll_back_replica()
        super().rollback()

    # -- execution: options in, replica failures handled -----------------------------------

    # Per-call execution options are not passed to get_bind() by Session; carry the routing
    # ones in bind_arguments (which are). Doing it here rather than in a do_orm_execute hook
    # keeps SQLAlchemy's fast path: any do_orm_execute listener makes every ORM statement run
    # orm_pre_session_exec twice.
    def execute(
        self,
        statement: Any,
        params: Any = None,
        *,
        execution_options: Any = EMPTY_DICT,
        bind_arguments: Any = None,
        **kw: Any,
    ) -> Any:
        # _routed() written out, with Session.execute()'s keywords named (passing them on as
        # **kw costs a dict per call): every ORM load (session.get() included) comes here.
        if execution_options and not ROUTING_OPTIONS.isdisjoint(execution_options):
            bind_arguments = _with_routing_options(bind_arguments, execution_options)
        self._executing += 1
        try:
            try:
                if kw:  # SQLAlchemy's own private keywords (an ORM re-execution)
                    return Session.execute(
                        self,
                        statement,
                        params,
                        execution_options=execution_options,
                        bind_arguments=bind_arguments,
                        **kw,
                    )
                return Session.execute(
                    self,
                    statement,
                    params,
                    execution_options=execution_options,
                    bind_arguments=bind_arguments,
                )
            except (DBAPIError, OSError) as exc:
                self._after_failure(exc)
            return Session.execute(
                self,
                statement,
                params,
                execution_options=execution_options,
                bind_arguments=bind_arguments,
                **kw,
            )
        finally:
            self._executing -= 1

    def scalars(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self._routed(Session.scalars, statement, params, kw)

    def scalar(self, statement: Any, params: Any = None, **kw: Any) -> Any:
        return self._routed(Session.scalar, statement, params, kw)

    def _routed(
        self, method: Callable[..., Any], statement: Any, params: Any, kw: dict[str, Any]
    ) -> Any:
        options = kw.get("execution_options")
        if options and not ROUTING_OPTIONS.isdisjoint(options):
            _with_call_options(kw, options)
        self._executing += 1
        try:
            try:
                return method(self, statement, params, **kw)
            except (DBAPIError, OSError) as exc:  # OSError: asyncpg's refused connect, unwrapped
                self._after_failure(exc)  # raises unless the statement may run once more
            return method(self, statement, params, **kw)
        finally:
            self._executing -= 1

    def _after_failure(self, exc: DBAPIError | OSError) -> None:
        """Return to retry the statement once; raise otherwise.

        Only a *replica that failed as a node* (lost or refused connection) is handled: it
        is taken out of rotation, and the read is retried on another node if it was the
        transaction's first statement, nothing was written and nothing is pending in the
        session (a rollback must lose nothing). Any other error is re-raised untouched.
        """
        router = self._last_router
        node = None if router is None else router.failed_replica(exc)
        if router is None or node is None:
            raise exc
        drop_kept_connection(self, node, exc)  # the rollback below sends nothing on it
        transaction = self.get_transaction()
        router.check_retry(
            node,
            exc,
            clean=not (self.new or self.dirty or self.deleted)
            # With several routes, the failed read must be the transaction's first statement
            # on any of them: rolling back also rolls back the other primaries.
            and not _others_ran(self._routers, router)
            # Only a transaction the session began by itself may be rolled back and begun
            # again; one opened by `with session.begin():` belongs to the caller's block.
            # (None: the replica's connection failed before the transaction began.)
            and (transaction is None or transaction.origin is SessionTransactionOrigin.AUTOBEGIN),
        )
        if transaction is None:
            self._end_transaction()  # nothing began: only the routing state to reset
        else:
            self.rollback()


class _SessionRouter(Router):
    """A session's :class:`Router` for one replica set, with the replica connection its
    transaction holds (its primary connection is SQLAlchemy's: the session reads it from its
    transaction when a commit needs it).

    The replica connection (opened by :meth:`RoutingSession.get_bind` for the session's own
    statements, already in a transaction) is one Session joins in "rollback_only" mode: its
    commit() commits only the primary, and close() leaves the replica's read-only
    transaction to :meth:`end_transaction`, which ends it and ignores a failure (nothing was
    written there). So a replica that fails can neither decide nor obscure the outcome of
    the primary's COMMIT, whatever order SQLAlchemy would commit the session's connections
    in, and a read-only session does not raise at close. A bare ``get_bind()`` has no side
    effects, and a session that would commit joined connections (another
    ``join_transaction_mode``) gets the engine as before.
    """

    # Per-transaction state over class defaults (no __slots__ here: a new router sets none).
    # The transaction's replica connection, joined to the session in "rollback_only"
    # mode so that commit() never sends anything on it (see the class docstring).
    replica_connection: Connection | None = None
    replica_engine_used = False

    def roll_back_replica(self) -> None:
        """Roll back the replica's read-only transaction; a failure is logged, not raised."""
        conn = self.replica_connection
        if conn is not None and not conn.invalidated:
            roll_back_read_only(conn, self.where())

    def record_commit_position(self, primary_connection: Connection | None) -> None:
        """The transaction committed (on ``primary_connection``): if it wrote here, later
        reads must see the primary's position after its commit."""
        if not self.has_written:
            return
        replica_set = self.replica_set
        position = replica_set.position_after_commit(primary_connection)
        if position is not None:
            replica_set.note_primary_position(position)
            self.record_commit(position)
        elif replica_set.read_your_writes != "off":
            self.note_unknown_commit()  # committed, at a position that could not be read

    def end_transaction(self) -> None:
        conn = self.replica_connection
        if conn is not None:
            # A ROLLBACK that fails (the replica's backend was terminated, the server went
            # away) loses nothing: the connection is discarded, the failure logged.
            self.replica_connection = None
            try:
                conn.close()  # ROLLBACK, then back to the pool
            except DBAPIError as exc:
                _read_only_end_failed(conn, self, exc)
        self.replica_engine_used = False
        # Router.end_transaction(), without its frame (this runs for every transaction).
        self.has_written = False
        self.replica = None
        self.statements = 0
        self.last_node = None

    def where(self) -> str:
        node = self.replica
        return f"replica {node.name if node is not None else '?'} of {self.replica_set.name!r}"


def _others_ran(routers: Iterable[_SessionRouter], router: _SessionRouter) -> bool:
    return any(other.statements for other in routers if other is not router)


def _read_only_end_failed(conn: Connection, router: _SessionRouter, exc: DBAPIError) -> None:
    """Ending a replica connection's read-only transaction failed: log it, discard it."""
    _log_read_only_failure(router.where(), exc)
    if not conn.closed:  # SQLAlchemy 2.1 closes it even when the ROLLBACK fails
        conn.invalidate()
        conn.close()


def roll_back_read_only(conn: Connection, where: str) -> None:
    """End a replica connection's read-only transaction with the driver's own rollback
    (SQLAlchemy's rollback or close then finds the driver idle and sends nothing). A failure
    loses nothing (nothing was written there): it is logged, the connection discarded, and
    nothing raised."""
    try:
        conn.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
    except Exception as exc:
        _log_read_only_failure(where, exc)
        conn.invalidate(exc)


def _log_read_only_failure(where: str, exc: BaseException) -> None:
    orig = getattr(exc, "orig", None) or exc
    log.warning(
        "ending a read-only transaction on %s failed (%s); nothing was lost, the connection "
        "is discarded",
        where,
        type(orig).__name__,
    )


def _with_call_options(kw: dict[str, Any], options: Any) -> None:
    """Carry the routing options of ``options`` (passed to execute()) to get_bind()."""
    kw["bind_arguments"] = _with_routing_options(kw.get("bind_arguments"), options)


def _with_routing_options(bind_arguments: Any, options: Any) -> dict[str, Any]:
    """``bind_arguments`` plus the routing options of ``options``, for get_bind()."""
    routing = {k: options[k] for k in ROUTING_OPTIONS if k in options}
    return {**(bind_arguments or {}), CALL_OPTIONS: routing}


# Session events, not engine events: connection-level listeners would put every statement
# of the application's primary engine on SQLAlchemy's slower, event-dispatching path.


# before_commit and after_commit also fire when a savepoint is released
# (begin_nested()); only the outermost commit sends COMMIT.


@event.listens_for(RoutingSession, "before_commit")
def _before_commit(session: Session) -> None:
    if (
        isinstance(session, RoutingSession)
        and session.get_nested_transaction() is None
        and session._committing is None  # noqa: SLF001 (this module's class)
    ):
        session._committing = _COMMITTING.set(session)  # noqa: SLF001 (this module's class)


@event.listens_for(RoutingSession, "after_commit")
def _after_commit(session: Session) -> None:
    if (
        not isinstance(session, RoutingSession)
        or not session.has_written
        or session.get_nested_transaction() is not None
    ):
        return
    for router in session._routers:  # noqa: SLF001 (this module's class)
        # Each primary written to: its position (the psycopg 3 connections a ReplicaSet
        # opens read it with the COMMIT, while this session is consistency's committer).
        router.record_commit_position(session._primary_connection(router))  # noqa: SLF001


# A root transaction is neither a savepoint nor a subtransaction (SessionTransaction
# asserts as much of its parent); read from plain attributes, not the `parent` property,
# since this runs for every session.
_SUBTRANSACTION: Final = SessionTransactionOrigin.SUBTRANSACTION


@event.listens_for(RoutingSession, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if (
        not transaction.nested
        and transaction.origin is not _SUBTRANSACTION
        and isinstance(session, RoutingSession)
    ):
        for router in session._routers:  # noqa: SLF001 (this module's class)
            router.end_transaction()
        committing = session._committing  # noqa: SLF001
        if committing is not None:
            _COMMITTING.reset(committing)
            session._committing = None  # noqa: SLF001


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
    return _RoutingSessionmaker(
        class_=RoutingSession, replica_set=replica_set, default_role=default_role, **kw
    )


class _RoutingSessionmaker(sessionmaker[RoutingSession]):
    """The sessionmaker :func:`routing_sessionmaker` returns. A session is made as
    ``sessionmaker`` makes it (its keywords, then the call's), but without a second pass over
    Session's keywords through ``RoutingSession.__init__``: they go once to
    ``Session.__init__``, and the routing ones, checked when the sessionmaker was made (or
    configured), to the session's routing set-up. A fresh session's cost shows in a
    primary-key lookup. A ``class_`` with an ``__init__`` of its own is called as usual.
    """

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._routing, self._session_kw = _split_keywords(self.kw)
        self._plain_init = self.class_.__init__ is RoutingSession.__init__

    def configure(self, **new_kw: Any) -> None:
        # Checked before anything changes: a refused configure() leaves the factory as it was.
        self._routing, self._session_kw = _split_keywords({**self.kw, **new_kw})
        super().configure(**new_kw)

    def __call__(self, **local_kw: Any) -> RoutingSession:
        if not self._plain_init:
            return super().__call__(**local_kw)
        cls = self.class_
        session = cls.__new__(cls)
        if not local_kw:  # factory(): the sessionmaker's own keywords, as they are
            Session.__init__(session, **self._session_kw)
            session._route_over(*self._routing)  # noqa: SLF001 (this module's class)
            return session
        for key, value in self.kw.items():  # as sessionmaker.__call__ merges them
            if key == "info" and "info" in local_kw:
                local_kw["info"] = {**value, **local_kw["info"]}
            else:
                local_kw.setdefault(key, value)
        routing, session_kw = _split_keywords(local_kw)
        Session.__init__(session, **session_kw)
        session._route_over(*routing)  # noqa: SLF001 (this module's class)
        return session


def _split_keywords(
    kw: dict[str, Any],
) -> tuple[tuple[ReplicaSet, Role, str | None], dict[str, Any]]:
    """A routing sessionmaker's keywords, checked: ``(replica_set, default_role,
    causal_token)`` and Session's own."""
    replica_set = kw.get("replica_set")
    default_role = kw.get("default_role", "replica")
    _check_routing(replica_set, default_role)
    session_kw = {k: v for k, v in kw.items() if k not in _ROUTING_KEYWORDS}
    routing = (replica_set, default_role, kw.get("causal_token"))
    return cast("tuple[ReplicaSet, Role, str | None]", routing), session_kw


_ROUTING_KEYWORDS: Final = frozenset({"replica_set", "default_role", "causal_token"})


def _check_routing(replica_set: Any, default_role: Any) -> None:
    """Refuse what RoutingSession cannot route over, naming it."""
    if not isinstance(replica_set, ReplicaSet):
        raise ConfigurationError(
            f"RoutingSession needs replica_set=ReplicaSet(...), got {type(replica_set).__name__}"
        )
    if default_role != "replica" and default_role != "primary":
        raise ConfigurationError(
            f"default_role must be 'primary' or 'replica', got {default_role!r}"
        )
