"""The Router: what one transaction has done on one ReplicaSet, and where its next statement goes.

A :class:`Router` is the routing state machine shared by every session:
:class:`~sqlalchemy_scale.RoutingSession` is a thin Session around one, and
:class:`~sqlalchemy_scale.ShardedSession` holds one per shard. It answers
"why did this statement go there?" in one place:

* :meth:`Router.decide` applies the routing precedence (below) to a statement
  and returns the role it needs and the reason, changing nothing and sending
  nothing, so the rules can be checked without a server;
* :meth:`Router.record` makes the decision happen: it notes a write, picks the
  node (the transaction's replica, a replica that has replayed the causal
  position, or the primary as a fallback), counts it and tells listeners;
* :meth:`Router.record_connection` is the ``session.connection()`` rule,
  :meth:`Router.failed_replica` and :meth:`Router.check_retry` the replica-failure
  retry, :meth:`Router.causal_position` and :meth:`Router.record_commit` the
  causal position, and :meth:`Router.end_transaction` forgets the transaction.

The routing precedence is the numbered list in :meth:`Router.decide`'s docstring
(mirrored in the README); ``tests/test_router.py`` checks each rule without a server.

When *not* to use it directly: applications use the sessions; a Router is for
code that routes statements itself (a custom Session, a test of the rules).
It is not thread-safe, like the Session that holds it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, Final, ParamSpec, TypeAlias, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.sql.ddl import ExecutableDDLElement
from sqlalchemy.sql.elements import ClauseElement, ColumnClause, TextClause
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import Select, TableClause

from ._sa import select_head, select_head_of, statement_options
from .consistency import CausalContext, get_causal_context, parse_token, read_primary_position
from .decisions import RoutingDecision, fallback_reason, notify
from .errors import NodeUnavailableError, ReplicaWriteError, sqlstate
from .topology import Node, ReplicaSet, Role

__all__ = ["ROUTING_OPTIONS", "Decision", "Router", "decide_role", "pinned", "use_primary"]

log = logging.getLogger("sqlalchemy_scale.routing")

P = ParamSpec("P")
R = TypeVar("R")

#: Execution options read by the router (statement-level or per call).
ROUTING_OPTIONS: Final = frozenset({"use_primary", "use_replica"})

#: ``(role, reason, kind, writes)``: the role a statement needs, the rule that decided it,
#: its kind by :func:`decide_role` alone, and whether it counts as a write of the
#: transaction. A plain tuple: it is made for every statement.
Decision: TypeAlias = tuple[Role, str, str, bool]

# The pins in force in this context, innermost last: each entry is the set of pinned keys
# (0 = every session, id(session) = that session). Kept as a stack in the ContextVar itself
# rather than as Tokens on the use_primary object, so one object may be entered from several
# threads or asyncio tasks at once. Empty (the fast path) when nothing is pinned.
_PINS: ContextVar[tuple[frozenset[int], ...]] = ContextVar("sqlalchemy_scale_pins", default=())
_GLOBAL_PIN: Final = 0

# Rule 6's decision for a plain SELECT (decide_role: ("replica", "read")) with no option.
_PLAIN_READ: Final[Decision] = ("replica", "read", "read", False)

# Columns of a SELECT that are never a function nor wrap one (decide_role reads them as
# plain columns): what an ORM entity or attribute selects. A fast-path check only.
_NEVER_FUNCTIONS: Final = (TableClause, ColumnClause)

# Statements that certainly write or lock: use_replica=True on them is refused.
_DEFINITE_WRITES: Final = frozenset({"flush", "write", "ddl", "locking read"})

_DEBUG: Final = logging.DEBUG

# Reasons a statement must run on the primary because it writes or locks. Once one of these
# runs, the rest of the transaction stays on the primary.
# (A bare get_bind() never gets here; session.connection() pins the transaction itself.)
_WRITING_REASONS: Final = frozenset(
    {"flush", "write", "ddl", "locking read", "text", "unknown statement kind"}
)

# Functions that write (or need a transaction id) when selected: `SELECT nextval('s')`.
_WRITING_FUNCTIONS: Final = frozenset(
    {"nextval", "setval", "txid_current", "pg_current_xact_id", "pg_notify", "lo_create"}
)

# A position no replica reaches: causal_position() while a commit's position is unknown
# and the primary cannot say its own (the read goes to the primary).
_PRIMARY_ONLY: Final = 1 << 64

# 57P01-57P03: the server is shutting down, crashed, or not accepting connections.
_DOWN_SQLSTATES: Final = frozenset({"57P01", "57P02", "57P03"})


def decide_role(clause: ClauseElement | None, flushing: bool = False) -> tuple[Role, str]:
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
        try:
            for_update, columns = select_head(clause)
        except AttributeError:  # a compound SELECT
            for_update, columns = select_head_of(clause)
        if for_update is not None:
            return "primary", "locking read"
        for column in columns:
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


def pinned() -> tuple[frozenset[int], ...]:
    """The ``use_primary()`` pins in force in this context, innermost last (empty: none)."""
    return _PINS.get()


class use_primary:
    """Pin reads to the primary, as a ``with`` block or a decorator.

    ``ss.use_primary()`` pins every routing or sharded session in the current
    context (thread or asyncio task); ``session.use_primary()`` pins one
    session (in a sharded session: every shard's primary). Pins nest and are
    undone on exit; they live in a :class:`~contextvars.ContextVar`, so they are
    correct across threads and tasks, and one object may be used by several of
    them at once.

    As a decorator it wraps functions and coroutine functions. Generators are
    refused (``TypeError``): the pin would end before their body runs; open the
    ``with`` block inside the generator instead.
    """

    def __init__(self, session: object | None = None) -> None:
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


class Router:
    """What one transaction has done on one :class:`~sqlalchemy_scale.ReplicaSet`, and
    where its next statement goes (the precedence is in this module's docstring).

    :param replica_set: the primary and replicas routed over.
    :param default_role: ``"replica"`` (default) routes plain reads to replicas;
        ``"primary"`` routes everything to the primary unless a statement says
        ``use_replica=True``.
    :param causal_token: a causal token: reads go only to replicas that have replayed it.
    :param owner: the session the router routes for: ``owner.use_primary()`` pins it, and
        decisions name it. None: only ``ss.use_primary()`` pins it.
    :param follows_causal_context: whether the :func:`~sqlalchemy_scale.causal_context` in
        force steers reads (its position for the replica set's
        :attr:`~sqlalchemy_scale.ReplicaSet.causal_scope`) and learns the commits.

    .. versionadded:: 0.3
    """

    __slots__ = (
        "_causal",
        "_follows_context",
        "_pin_key",
        "_unknown_commit",
        "default_role",
        "fallback_reason",
        "has_written",
        "last_node",
        "replica",
        "replica_set",
        "statements",
    )

    def __init__(
        self,
        replica_set: ReplicaSet,
        default_role: Role = "replica",
        causal_token: str | None = None,
        owner: object | None = None,
        *,
        follows_causal_context: bool = True,
    ) -> None:
        self.replica_set = replica_set
        self.default_role: Role = default_role
        self._pin_key = id(owner if owner is not None else self)
        self._follows_context = follows_causal_context
        # The router's own causal position: made when a token is given or a commit is
        # recorded (most sessions never have one, and a Router is made per session).
        self._causal: CausalContext | None = None
        if causal_token is not None:  # a token covering several primaries: this one's part
            position = parse_token(causal_token).get(replica_set.causal_scope)
            self._causal = CausalContext()
            if position is not None:
                self._causal.observe_position(position, replica_set.causal_scope)
        # True after a commit whose outcome is unknown, until the primary's position is read.
        self._unknown_commit = False
        #: True once the current transaction has sent a write (or lock) to the primary.
        self.has_written = False
        #: The node serving this transaction's reads (a replica, or the primary as fallback).
        self.replica: Node | None = None
        #: Statements recorded in this transaction.
        self.statements = 0
        #: The node of the latest statement (None: a bind the caller chose).
        self.last_node: Node | None = None
        #: Why this transaction's reads fell back to the primary (for logs and listeners).
        self.fallback_reason = "fallback: no usable replica"

    @property
    def _scope(self) -> str | None:
        """The name of this primary's position in a causal token."""
        return self.replica_set.causal_scope

    def __repr__(self) -> str:
        return (
            f"Router({self.replica_set.name!r}, has_written={self.has_written}, "
            f"replica={self.replica.name if self.replica is not None else None!r})"
        )

    # -- deciding ---------------------------------------------------------------------------

    def decide(
        self,
        clause: ClauseElement | None,
        flushing: bool = False,
        call_options: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Where a statement goes by the precedence, and why: ``(role, reason, kind, writes)``.

        The first rule that applies decides:

        1. statement: ``execution_options(use_primary=True)`` or ``use_replica=True``
           (on the statement or passed to ``execute()``); ``use_replica`` on a
           statement that writes raises :class:`~sqlalchemy_scale.ReplicaWriteError`;
        2. block: inside ``with session.use_primary():`` or ``with ss.use_primary():``;
        3. transaction: once the current transaction has written (flush, DML, DDL,
           locking read, unmarked ``text()``), the primary until it ends;
        4. session: ``default_role="primary"``;
        5. causal token: a read needs a replica that has replayed the session's or the
           :func:`~sqlalchemy_scale.causal_context`'s token, else the primary;
        6. statement kind (:func:`decide_role`): writes, DDL, ``FOR UPDATE/SHARE``
           and unmarked ``text()`` go to the primary, other SELECTs to a replica.

        (Rule 5 is applied by :meth:`Router.record` when it picks the replica: a
        position is a fact about replicas, not about the statement.)

        Changes nothing and sends nothing. ``call_options`` are the routing options
        passed to ``execute()`` (they win over the statement's). Raises
        :class:`~sqlalchemy_scale.ReplicaWriteError` for ``use_replica=True`` on a
        statement that writes.
        """
        role, kind = decide_role(clause, flushing)
        options = call_options
        try:
            stmt_options: Mapping[str, Any] | None = statement_options(clause)
        except AttributeError:  # None (a flush), or a clause that is not a statement
            stmt_options = None
        if stmt_options:
            options = {**stmt_options, **options} if options else stmt_options
        # text() marked use_replica=True is the user's word that it only reads.
        writes = kind in _WRITING_REASONS and not (
            kind == "text" and options and options.get("use_replica")
        )
        reason = kind
        if options and options.get("use_primary"):
            role, reason = "primary", "use_primary option"
        elif options and options.get("use_replica"):
            if kind in _DEFINITE_WRITES:
                raise ReplicaWriteError(
                    f"use_replica=True was set on a statement that writes ({kind}); replica "
                    f"nodes of {self.replica_set.name!r} cannot run it, nothing was sent",
                    node="replica",
                    statement=str(clause) if clause is not None else None,
                )
            role, reason = "replica", "use_replica option"
        elif role == "replica":
            pins = _PINS.get()
            if pins and (_GLOBAL_PIN in pins[-1] or self._pin_key in pins[-1]):
                role, reason = "primary", "use_primary block"
            elif self.has_written:
                role, reason = "primary", "transaction has written"
            elif self.default_role == "primary":
                role, reason = "primary", "session default_role"
        return role, reason, kind, writes

    def route(
        self,
        clause: ClauseElement | None,
        flushing: bool = False,
        call_options: Mapping[str, Any] | None = None,
        session: Any = None,
    ) -> Node:
        """:meth:`decide` then :meth:`record`: the node that runs a statement about to be sent.

        The commonest statement, a plain ``Select`` (no ``FOR UPDATE``, no function among
        its columns, no routing option) in a transaction that has not written, outside any
        ``use_primary()`` block, with ``default_role="replica"``, is recorded as rule 6's
        read without the rules that cannot apply to it; any other goes through
        :meth:`decide`. ``tests/test_router.py`` checks that both ways agree.
        """
        if (
            clause.__class__ is Select
            and not (flushing or call_options or self.has_written or _PINS.get())
            and self.default_role == "replica"
        ):
            for_update, columns = select_head(clause)
            options = statement_options(clause)
            if for_update is None and (not options or ROUTING_OPTIONS.isdisjoint(options)):
                for column in columns:
                    if isinstance(column, _NEVER_FUNCTIONS):  # a table (an ORM entity), a column
                        continue
                    # A function may lock or write (decide_role judges which): the long way.
                    if isinstance(getattr(column, "element", column), FunctionElement):
                        break
                else:
                    # Rule 6's plain read, recorded as record() would: on the transaction's
                    # replica, or on the one the policy picks for its first read. A first
                    # read with a causal position to honour, or with no usable replica
                    # (where choose_replica() says None again), is left to record().
                    replica_set = self.replica_set
                    node = self.replica
                    if node is None:
                        if not (
                            self._causal is None
                            and replica_set.process_position is None
                            and (not self._follows_context or get_causal_context() is None)
                        ):
                            return self.record(_PLAIN_READ, clause, session)
                        node = replica_set.choose_replica()
                        if node is None:
                            return self.record(_PLAIN_READ, clause, session)
                        self.replica = node
                    node.count_statement()
                    self.statements += 1
                    self.last_node = node
                    if replica_set.decision_listeners or log.isEnabledFor(_DEBUG):
                        self._tell(node, "replica", "read", "read", clause, session)
                    return node
        return self.record(self.decide(clause, flushing, call_options), clause, session)

    def record(self, decision: Decision, statement: Any = None, session: Any = None) -> Node:
        """Make a decision happen: note a write, pick the node (the transaction's replica,
        one that has replayed the causal position, or the primary), count it, log it and
        tell the replica set's decision listeners (naming ``session``)."""
        role, reason, kind, writes = decision
        if writes:
            self.has_written = True
        replica_set = self.replica_set
        if role == "primary":
            node = replica_set.primary
            node.count_statement()
        elif (replica := self.replica) is not None:  # the transaction's reads stay on one
            node = replica
            node.count_statement()
        else:  # the transaction's first read (inline: this runs for most transactions)
            if (
                self._causal is None
                and replica_set.process_position is None
                and (not self._follows_context or get_causal_context() is None)
            ):
                position = None  # causal_position() without its call: no source to read
            else:
                position = self.causal_position()
                if position is not None:
                    position = self._capped(position)
            chosen = replica_set.choose_replica(position)
            if chosen is None:
                # The rest of this transaction reads from the primary too: no second
                # choice (and no second wait for a caught-up replica) per statement.
                self.fallback_reason = fallback_reason(replica_set, position)
                node = replica_set.primary
                node.count(fallback=True)
            else:
                node = chosen
                node.count_statement()
            self.replica = node
        self.statements += 1
        self.last_node = node
        if replica_set.decision_listeners or log.isEnabledFor(_DEBUG):  # else nobody watches
            self._tell(node, role, reason, kind, statement, session)
        return node

    def _tell(
        self, node: Node, role: Role, reason: str, kind: str, statement: Any, session: Any
    ) -> None:
        """Log a recorded decision at DEBUG and tell the replica set's listeners."""
        replica_set = self.replica_set
        if role == "replica" and node.role == "primary":
            reason = self.fallback_reason
        log.debug("[%s] %s: %s", node.name, replica_set.name, reason)
        if replica_set.decision_listeners:
            notify(
                replica_set.decision_listeners,
                RoutingDecision(session, replica_set, node, reason, kind, statement),
            )

    def peek(self, decision: Decision) -> Node:
        """The node a decision would use, recording nothing: for a bind asked for outside
        any transaction, which must not steer the next one."""
        if decision[0] == "primary":
            return self.replica_set.primary
        node = self.replica
        if node is None:
            node = self.replica_set.choose_replica(self.checked_causal_position())
        return node if node is not None else self.replica_set.primary

    def record_bound_write(self, clause: ClauseElement | None, flushing: bool = False) -> None:
        """A statement sent through an explicit bind to this set's primary: if it writes (or
        may: no statement), the rest of the transaction reads from the primary and its
        commit's position is recorded, as for a write routed here."""
        if bound_statement_writes(clause, flushing):
            self.has_written = True

    def record_connection(self, engine: Engine) -> bool:
        """The ``session.connection()`` rule: a connection to the primary may be written
        through, so the rest of the transaction reads from the primary. True if it was."""
        if engine is self.replica_set.primary.engine:
            self.has_written = True
            return True
        return False

    # -- replica failures -------------------------------------------------------------------

    def failed_replica(self, exc: BaseException) -> Node | None:
        """The replica the latest statement ran on, if ``exc`` says it failed as a node (a
        lost or refused connection, a server shutting down); it is taken out of rotation.
        None for any other error, which the caller re-raises untouched."""
        node = self.last_node
        if node is None or not node.is_replica or not is_node_failure(exc):
            return None
        self.replica_set.mark_down(node, exc)
        return node

    def check_retry(self, node: Node, exc: BaseException, *, clean: bool) -> None:
        """Return if the failed read may run once more on another node; raise
        :class:`~sqlalchemy_scale.NodeUnavailableError` otherwise.

        A retry is allowed for the transaction's first statement when nothing was written
        and the session is ``clean``: nothing pending, and the transaction (if any) one the
        session began by itself, so rolling it back loses nothing.
        """
        if not (self.statements == 1 and not self.has_written and clean):
            raise NodeUnavailableError(
                f"replica {node.name!r} of {self.replica_set.name!r} failed in the middle of a "
                f"transaction ({self.statements} statements in); it is out of rotation. "
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

    # -- causal position --------------------------------------------------------------------

    @property
    def causal_token(self) -> str | None:
        """The newest causal token honoured: the one given, or the primary's WAL position
        after the latest committed write."""
        causal = self._causal
        return None if causal is None else causal.token

    def causal_position(self) -> int | None:
        """The WAL position reads must see: the newest of the router's own, the process's
        (``read_your_writes="process"``) and the causal context's."""
        if self._unknown_commit and not self._read_unknown_commit():
            return _PRIMARY_ONLY
        scope = self._scope
        causal = self._causal
        own = None if causal is None else causal.position_for(scope)
        process = self.replica_set.process_position
        if process is not None and process.unknown and not self._read_process_position():
            return _PRIMARY_ONLY
        if process is not None and process.position is not None:
            own = process.position if own is None else max(own, process.position)
        if not self._follows_context:
            return own
        ctx = get_causal_context()
        if ctx is None:
            return own
        theirs = ctx.position_for(scope)
        if theirs is None:
            return own
        return theirs if own is None else max(own, theirs)

    def checked_causal_position(self) -> int | None:
        """:meth:`causal_position`, capped at the primary's (a token ahead of it is
        dropped where it is kept)."""
        position = self.causal_position()
        return None if position is None else self._capped(position)

    def _capped(self, position: int) -> int:
        checked = self.replica_set.check_causal_position(position)
        if checked != position:
            if self._causal is not None:
                self._causal.cap(checked, self._scope)
            ctx = get_causal_context() if self._follows_context else None
            if ctx is not None:
                ctx.cap(checked, self._scope)
        return checked

    def note_unknown_commit(self) -> None:
        """A commit here may have committed at a position nobody read (it ended with
        :class:`~sqlalchemy_scale.CommitOutcomeUnknown`, or the position query after it
        failed). The next read first reads the primary's position (past that commit, if
        it happened) and needs it, like a commit's; while the primary cannot tell, reads
        go to the primary."""
        self._unknown_commit = True
        if self._causal is None:
            self._causal = CausalContext()  # takes reads off the no-position fast path

    def _read_unknown_commit(self) -> bool:
        position = self._primary_position_now()
        if position is None:
            return False
        self._unknown_commit = False
        self.record_commit(position)
        return True

    def _read_process_position(self) -> bool:
        # A commit of this process whose position was lost: the primary's position now is
        # past it. (Another thread may do the same at once; both positions are correct.)
        process = self.replica_set.process_position
        assert process is not None
        position = self._primary_position_now()
        if position is None:
            return False
        process.unknown = False
        process.observe(position)
        return True

    def _primary_position_now(self) -> int | None:
        """The primary's WAL position read now (and noted), past any commit it has made;
        None if it cannot answer (no replica can then be shown to have a lost commit: the
        read goes to the primary)."""
        try:
            position = read_primary_position(self.replica_set.primary.engine)
        except Exception as exc:
            log.debug("%s: cannot read the primary's position: %s", self.replica_set.name, exc)
            return None
        self.replica_set.note_primary_position(position)
        return position

    def record_commit(self, position: int) -> None:
        """A transaction that wrote committed at ``position``: later reads must see it."""
        if self._causal is None:
            self._causal = CausalContext()
        self._causal.observe_position(position, self._scope)
        ctx = get_causal_context() if self._follows_context else None
        if ctx is not None:
            ctx.observe_position(position, self._scope)

    # -- end of transaction -----------------------------------------------------------------

    def end_transaction(self) -> None:
        """Forget the transaction: the next one starts with nothing written and no replica."""
        self.has_written = False
        self.replica = None
        self.statements = 0
        self.last_node = None


def bound_statement_writes(clause: ClauseElement | None, flushing: bool = False) -> bool:
    """Whether a statement sent through an explicit bind to a primary writes (or may: no
    statement), by the kinds that make a transaction "written" (:func:`decide_role`)."""
    return flushing or clause is None or decide_role(clause)[1] in _WRITING_REASONS


def drop_kept_connection(session: Session, node: Node, exc: BaseException) -> None:
    """After a replica failed as a node: if the server reported its own shutdown (57P0x)
    and SQLAlchemy kept the session's connection to it, invalidate that connection, so
    that a rollback (the session's or the caller's) sends nothing on it."""
    if isinstance(exc, DBAPIError) and not exc.connection_invalidated:
        with contextlib.suppress(DBAPIError, OSError):  # already gone: nothing to drop
            session.connection(bind_arguments={"bind": node.engine}).invalidate()


def is_node_failure(exc: BaseException) -> bool:
    """Whether an error says the node itself failed, rather than the statement."""
    # A disconnect SQLAlchemy detected, or an OperationalError without a SQLSTATE: libpq's
    # own "could not connect" / "server closed the connection" errors. Errors the server
    # reports (syntax, conflicts with recovery, ...) carry a SQLSTATE and are not node failures.
    # asyncpg's connect() raises OSError (refused, unreachable), which SQLAlchemy passes on.
    if isinstance(exc, OSError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = sqlstate(exc.orig)
    # A query in flight when its server dies gets 57P01 "unexpected postmaster exit".
    # asyncpg reports it as a plain DBAPIError, psycopg as an OperationalError.
    if state in _DOWN_SQLSTATES:
        return True
    return isinstance(exc, OperationalError) and state is None
