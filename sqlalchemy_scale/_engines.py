"""How a ReplicaSet's engines are made: read-only replicas, their hooks, and fork safety.

:class:`~sqlalchemy_scale.ReplicaSet` (:mod:`sqlalchemy_scale.topology`) decides which
nodes exist; this module makes each replica's engine safe to route reads to:

* every transaction on a replica is read-only: a hot standby refuses writes itself, and on
  any other server (a writable URL named as a replica, a standby seen promoted) it begins
  ``READ ONLY`` by the driver's own flag (psycopg2 ``readonly``, psycopg ``read_only``),
  which the driver sends inside ``BEGIN``: no round trip, and it survives transaction
  pooling. The flag is set once per DB-API connection, by a pool ``connect`` event, so
  nothing runs per checkout or per statement (:func:`make_read_only`);
* a user's own replica engine is not changed: the ReplicaSet reads through a view of it
  (:func:`read_only_view`) with the user's dialect, settings and engine events, over a pool
  of its own made like the user's (``Pool.recreate()``);
* a statement that would end a replica's ``READ ONLY`` transaction is refused before it is
  sent (:func:`refuse_transaction_control`), and one the server refuses as a write becomes
  :class:`~sqlalchemy_scale.errors.ReplicaWriteError` naming the node
  (:func:`replica_write_error`);
* connections are known to their node (:func:`track_connections`), and a forked child
  drops the pools this package owns (:func:`dispose_at_fork`).

Why not ``default_transaction_read_only=on`` as a connection option: ``SET TRANSACTION
READ WRITE`` overrides it, and PgBouncer refuses (or, configured with
``ignore_startup_parameters = options``, drops) the ``options`` startup parameter.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.engine.interfaces import ExceptionContext

from ._sa import proxied_events_flag
from .errors import ReplicaWriteError, sqlstate
from .health import PROBING
from .node import Node

__all__ = [
    "READ_ONLY_SQLSTATE",
    "ReadOnlyView",
    "dispose_at_fork",
    "make_read_only",
    "read_only_view",
    "refuse_transaction_control",
    "replica_write_error",
    "reports_hot_standby",
    "track_connections",
    "transaction_control",
    "with_installed_driver",
]

# SQLSTATE 25006: read_only_sql_transaction ("cannot execute INSERT in a read-only transaction").
READ_ONLY_SQLSTATE = "25006"


def reports_hot_standby(driver_connection: Any) -> bool:
    """Whether the server said, when this connection was made, that it is a hot standby.

    PostgreSQL 14 and newer report ``in_hot_standby`` with the connection's other
    parameters (no round trip), and report it again when a promotion changes it. psycopg2
    and psycopg 3 read it from ``connection.info``, asyncpg from its settings; a server or
    pooler that does not report it is not taken for a standby.
    """
    info = getattr(driver_connection, "info", None)  # psycopg2 and psycopg 3
    parameter_status = getattr(info, "parameter_status", None)
    if parameter_status is not None:
        return bool(parameter_status("in_hot_standby") == "on")
    get_settings = getattr(driver_connection, "get_settings", None)  # asyncpg
    if get_settings is not None:
        return getattr(get_settings(), "in_hot_standby", None) == "on"
    return False


# record.info key: this pooled connection was made without the read-only flag (its server
# said it was a hot standby), so it gets the flag if that server is later seen writable.
_STANDBY_ONLY = "sqlalchemy_scale.standby_only"


def make_read_only(engine: Engine, node: Node) -> None:
    """Make every replica transaction of an engine whose pool we own ``READ ONLY``.

    The driver's flag, set once per new DB-API connection by a pool ``connect`` event
    (nothing per checkout or per statement), on every connection except one to a server
    that says it is a hot standby (:func:`reports_hot_standby`): a standby refuses every
    write itself, with the same error (SQLSTATE 25006), while ``BEGIN READ ONLY`` costs
    PostgreSQL before 16 a walk over all its settings at the end of every transaction
    (about 1.4% of a fresh session's primary-key get here).

    Once the health monitor sees the node's server accept writes (a promoted standby,
    :meth:`Node.note_writable`), every connection gets the flag: new ones at connect
    (whatever a pooler's cached parameters say), and ones made while it was a standby at
    their next checkout (a pool ``checkout`` listener, added only then).
    """
    dialect: Any = engine.dialect  # PGDialect: set_readonly() is PostgreSQL-specific

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        if not node.seen_writable and reports_hot_standby(record.driver_connection):
            record.info[_STANDBY_ONLY] = True
            return
        record.info.pop(_STANDBY_ONLY, None)
        dialect.set_readonly(dbapi_connection, True)

    def on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.pop(_STANDBY_ONLY, None):
            dialect.set_readonly(dbapi_connection, True)

    def flag_every_connection() -> None:
        event.listen(engine.pool, "checkout", on_checkout)

    event.listen(engine.pool, "connect", on_connect)
    node.when_writable(flag_every_connection)


class ReadOnlyView(Engine):
    """An engine over a pool of its own that shares a user's engine's dialect, settings
    and engine events: mixed into SQLAlchemy's ``OptionEngine`` class by
    :func:`read_only_view`, never instantiated alone."""

    if not TYPE_CHECKING:
        # The view's own pool, a plain instance attribute (set by read_only_view() and by
        # Engine.dispose()): this class attribute hides OptionEngine's property, which
        # would read (and replace) the user's engine's pool, and costs a Python call at
        # every checkout.
        pool = None
        # Whether the view's connections dispatch engine events: the user's engine's flag,
        # read by a C-level getter (SQLAlchemy reads it several times per statement), until
        # a listener is added to the view itself.
        _has_events = proxied_events_flag()


def read_only_view(engine: Engine) -> ReadOnlyView:
    """A read-only engine for a replica engine the user owns.

    Like ``engine.execution_options()`` (an ``OptionEngine``: the user's dialect, settings
    and engine event listeners, including ones added later), but over a pool of its own,
    made by the user's pool's ``recreate()`` (same creator, size, overflow, timeouts and the
    pool event listeners it has now), which the ReplicaSet then makes read-only
    (:func:`make_read_only`). The user's own engine and its pool are left as they were: its
    connections never carry the read-only flag.

    .. versionchanged:: 0.3 a pool of its own. The view used to share the user's pool and
       set the flag at each checkout (and reset it at checkin), which cost a fresh
       session's primary-key lookup about 3% over an engine built from a URL. The ReplicaSet
       now opens its replica connections in its own pool: the user's pool stays idle unless
       the user uses the engine directly, in which case both pools may hold connections.
    """
    option_engine = type(engine.execution_options())  # SQLAlchemy's OptionEngine class
    # A class per view: a listener added to the view sets its class's event flag for good.
    make: Callable[[Engine, dict[str, Any]], ReadOnlyView] = type(
        "ReadOnlyView", (ReadOnlyView, option_engine), {}
    )
    pool = engine.pool.recreate()
    view = make(engine, {})
    view.pool = pool
    dispose_at_fork(view)
    return view


# Engines whose pools this package made (ReplicaSet-built engines, read-only views): a
# forked child drops their pooled connections without closing them, as SQLAlchemy advises
# for os.fork(), so it never shares the parent's sockets.
_OWN_POOLS: weakref.WeakSet[Engine] = weakref.WeakSet()


def dispose_at_fork(engine: Engine) -> None:
    """Drop (without closing) ``engine``'s pooled connections in a forked child."""
    _OWN_POOLS.add(engine)


def _after_fork_in_child() -> None:
    for engine in list(_OWN_POOLS):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


def with_installed_driver(url: URL) -> URL:
    """A bare ``postgresql://`` URL with SQLAlchemy's default driver when it is installed,
    else with psycopg2, the driver this package installs (SQLAlchemy 2.1's default is
    psycopg 3, which is an extra here)."""
    if url.drivername != "postgresql":
        return url
    try:
        url.get_dialect().import_dbapi()
    except ImportError:
        return url.set(drivername="postgresql+psycopg2")
    return url


def track_connections(node: Node) -> None:
    """Register every DB-API connection opened to a replica with its node.

    A pool ``connect`` event on the node's own pool (an engine the ReplicaSet built, or the
    read-only view of a user's engine): it is copied into the health monitor's pool
    (``Pool.recreate()``), so probe connections are tracked too.
    """

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        node.track_connection(dbapi_connection)

    event.listen(node.engine.pool, "connect", on_connect)
    if not node.owns_engine:
        return  # do_connect is a dialect event: a user's engine shares its dialect
    dbapi = node.engine.dialect.loaded_dbapi

    def refuse_while_down(dialect: Any, record: Any, cargs: Any, cparams: Any) -> None:
        # A replica out of rotation because it stopped answering gets no new connection
        # except the monitor's: a read caught re-connecting (its pre-ping failed when
        # the monitor shut the socket down) fails at once and is retried elsewhere,
        # instead of waiting connect_timeout on a frozen server. As a driver error
        # without SQLSTATE, which is what a refused connection is.
        if node.is_down and not node.is_usable and not PROBING.get():
            raise dbapi.OperationalError(
                f"replica {node.name!r} is out of rotation and not answering; "
                "no connection attempted"
            )

    event.listen(node.engine, "do_connect", refuse_while_down)


# Statements that end a replica's READ ONLY transaction or make it read-write, so that what
# follows them (in the same string, or the next statement) could write on a server that
# accepts writes: `COMMIT; INSERT ...`, `SET TRANSACTION READ WRITE; INSERT ...`.
_TXN_HEAD = re.compile(
    r"\s*(?:COMMIT|END|ROLLBACK|ABORT|BEGIN|START|SET|RESET|PREPARE|/\*|--)", re.I
).match
_TXN_CONTROL = re.compile(
    r"(?:COMMIT|END|ABORT|BEGIN|START\s+TRANSACTION|PREPARE\s+TRANSACTION)\b"
    # ROLLBACK, but not ROLLBACK TO SAVEPOINT (begin_nested() on a replica's transaction).
    r"|ROLLBACK\b(?!\s+(?:(?:WORK|TRANSACTION)\s+)?TO\b)"
    r"|SET\s+(?:SESSION\s+CHARACTERISTICS\s+AS\s+)?TRANSACTION\b.*\bREAD\s+WRITE\b"
    r"|(?:SET|RESET)\b.*\b(?:default_)?transaction_read_only\b"
    r"|RESET\s+ALL\b",
    re.I | re.S,
)
_LEADING_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)+", re.S)


def transaction_control(statement: str) -> str | None:
    """The part of ``statement`` that ends or re-opens its transaction read-write, or None."""
    if _TXN_HEAD(statement) is None and ";" not in statement:
        return None  # the fast path: every SELECT
    for part in statement.split(";"):
        part = _LEADING_COMMENTS.sub("", part, count=1)
        if _TXN_CONTROL.match(part):
            return " ".join(part.split())[:80]
    return None


# The verdict of transaction_control() per statement string: a routed read's SQL is the
# same string object each time (SQLAlchemy's compiled cache), so its check is one dict
# lookup. Bounded: cleared when full (a workload of ad-hoc text() strings just recomputes).
_VERDICTS: dict[str, str | None] = {}
_MAX_VERDICTS = 2000


def _remember_verdict(statement: str) -> str | None:
    verdict = transaction_control(statement)
    if len(_VERDICTS) >= _MAX_VERDICTS:
        _VERDICTS.clear()
    _VERDICTS[statement] = verdict
    return verdict


def refuse_transaction_control(
    engine: Engine, set_name: str, node_name: str, *, owns: bool
) -> None:
    """Refuse, before it is sent, a replica statement that would end its ``READ ONLY``
    transaction (a ``text()`` marked ``use_replica=True`` is the caller's word that it only
    reads; this keeps the word even on a server that accepts writes).

    A dialect-level ``do_execute`` listener, like the pooling guard: no engine events on the
    statement path. For a user's engine (whose dialect the read-only view shares) it acts
    only on the view's own connections. Like the pooling guard it splits on ``;`` without
    parsing, so a ``DO`` block whose body holds ``END`` after a ``;`` is refused too.

    """
    view = weakref.ref(engine) if not owns else None

    def check(cursor: Any, statement: str, *rest: Any) -> None:
        try:
            part = _VERDICTS[statement]
        except KeyError:
            part = _remember_verdict(statement)
        if part is None:
            return
        if view is not None:
            context = rest[-1] if rest else None
            root = getattr(context, "root_connection", None)
            if root is None or root.engine is not view():
                return
        raise ReplicaWriteError(
            f"{part!r} would end the READ ONLY transaction of replica {node_name!r} of "
            f"{set_name!r}, so what follows could write there; nothing was sent. Run "
            "transaction control through the session (commit(), rollback()), not in text()",
            node=node_name,
            statement=statement,
        )

    for name in ("do_execute", "do_execute_no_params", "do_executemany"):
        event.listen(engine, name, check)


def replica_write_error(engine: Engine, set_name: str, node_name: str) -> Any:
    """A ``handle_error`` listener turning a replica's read-only refusal (SQLSTATE 25006)
    into :class:`~sqlalchemy_scale.errors.ReplicaWriteError` naming the node."""
    # Weakly: the listener lives on the engine's dialect (see install_primary_hooks).
    engine_ref = weakref.ref(engine)

    def handle_error(context: ExceptionContext) -> BaseException | None:
        if context.engine is not engine_ref():
            return None
        if sqlstate(context.original_exception) != READ_ONLY_SQLSTATE:
            return None
        statement = context.statement
        return ReplicaWriteError(
            f"a statement that writes reached replica {node_name!r} of {set_name!r} and was "
            f"rejected there (nothing was written): {context.original_exception}".strip()
            + "; route writes to the primary (use_primary=True or session.use_primary())",
            node=node_name,
            statement=statement,
        )

    return handle_error
