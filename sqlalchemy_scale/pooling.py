"""Pooling: ``create_engine`` presets, pool sizing, and the transaction-pooling guard.

Three things live here, all about how an application's connections reach PostgreSQL:

* :func:`pool_preset` returns plain ``create_engine`` keyword arguments for one
  of the deployment shapes in :data:`PRESET_NAMES` (``direct``,
  ``pgbouncer-transaction``, ``pgbouncer-session``, ``external-pooler-null``).
  Every value is a comment-documented default you may override.
* :func:`size_pools` turns processes, threads and server cores into app-side
  pool sizes and PgBouncer sizes, starting the server side at PostgreSQL's
  ``(cores * 2) + 1`` rule of thumb, and explains in words any total that would
  exceed ``max_connections`` or PgBouncer's ``max_client_conn``.
* :func:`guard_transaction_pooling` hooks SQLAlchemy's ``do_execute`` dialect
  events to refuse (or warn about) the statements transaction pooling silently
  breaks: session-level ``SET``, ``LISTEN``, session advisory locks, temporary
  tables that outlive the transaction, ``PREPARE`` and ``DECLARE ... WITH HOLD``.
  Under PgBouncer's ``pool_mode = transaction`` a client owns a server connection
  only until COMMIT/ROLLBACK, so any state such a statement creates stays on a
  server connection that the next transaction, probably someone else's, gets.

The ``pooling_guard`` story: :class:`~sqlalchemy_scale.ReplicaSet` installs the
guard on every engine it builds from a preset for which
:func:`preset_needs_guard` is true (``pgbouncer-transaction`` and
``external-pooler-null``), in the mode given by its ``pooling_guard`` argument:

* ``"raise"`` (the default, and what the test-suite uses): the statement is not
  sent; :class:`~sqlalchemy_scale.errors.TransactionPoolingError` names it and
  the safe alternative. Nothing reached the server.
* ``"warn"``: the statement runs and a :class:`TransactionPoolingWarning` is
  issued, for migrating an application that still has such statements.
* ``"off"``: no listener at all, for a pooler known to run in session mode.

The guard is a textual check of the statement, not a SQL parser: it reads the
first keyword of each ``;``-separated part and looks for session advisory lock
functions written in lower, upper or title case. Statements that do not start
with ``SET``, ``LISTEN``, ``CREATE``, ``PREPARE``, ``DECLARE`` or a comment and do
not mention ``advisory`` are accepted after one anchored regular-expression match
and three substring searches (see ``benchmarks/bench_pooling.py``).

When *not* to use this module: a process that connects straight to PostgreSQL
and needs session state (``LISTEN``, session advisory locks for migrations) should
use the ``direct`` preset, which installs no guard.
"""

from __future__ import annotations

import re
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from sqlalchemy import event
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, QueuePool

from .errors import ConfigurationError, TransactionPoolingError, render_url

__all__ = [
    "PRESET_NAMES",
    "PoolSizing",
    "PoolingGuardMode",
    "PoolingHazard",
    "TransactionPoolingWarning",
    "check_transaction_pooling",
    "guard_transaction_pooling",
    "is_guarded",
    "pool_preset",
    "preset_needs_guard",
    "size_pools",
]

PoolingGuardMode = Literal["raise", "warn", "off"]
_GUARD_MODES: Final[tuple[str, ...]] = get_args(PoolingGuardMode)


class TransactionPoolingWarning(UserWarning):
    """A statement that transaction pooling breaks ran because the guard is in ``"warn"`` mode."""


# -- presets ---------------------------------------------------------------------------------


def _unique_prepared_statement_name() -> str:
    # asyncpg names its prepared statements __asyncpg_stmt_1__, _2__, ... per client
    # connection; behind a transaction pooler two clients share a server connection and
    # the names collide. A UUID per statement cannot collide (SQLAlchemy's asyncpg docs).
    return f"__asyncpg_{uuid.uuid4()}__"


def _transaction_pooling_connect_args(driver: str | None) -> dict[str, Any]:
    """DBAPI ``connect()`` arguments a driver needs behind a transaction pooler."""
    if driver in ("psycopg", "psycopg_async"):
        # psycopg 3 prepares a statement server-side after it ran 5 times on a connection
        # and then refers to it by name; the next transaction may run on another server
        # connection where that name does not exist. None disables preparing.
        return {"prepare_threshold": None}
    if driver == "asyncpg":
        return {
            # SQLAlchemy's asyncpg adapter caches prepared statements per client connection;
            # they live on a server connection we do not keep, so cache none.
            "prepared_statement_cache_size": 0,
            # asyncpg's own statement cache, same reason.
            "statement_cache_size": 0,
            # Unique names, so statements prepared by two clients sharing a server
            # connection cannot clash ("prepared statement __asyncpg_stmt_1__ already exists").
            "prepared_statement_name_func": _unique_prepared_statement_name,
        }
    # psycopg2 never prepares server-side; an unknown driver (None) gets nothing we cannot
    # justify. Pass connect_args yourself for other drivers that prepare (e.g. pg8000).
    return {}


def _direct(driver: str | None) -> dict[str, Any]:
    return {
        # The application holds real PostgreSQL backends (a process and a few MB each), so
        # a bounded pool per process that reuses them.
        "poolclass": QueuePool,
        # SQLAlchemy's default; processes x (pool_size + max_overflow) must stay under
        # max_connections, see size_pools().
        "pool_size": 5,
        # A small burst allowance (SQLAlchemy's default is 10) that still keeps the
        # per-process ceiling low enough to check against max_connections.
        "max_overflow": 5,
        # Fail a request after 10 s instead of SQLAlchemy's 30 s: by then the caller's own
        # timeout (load balancer, HTTP client) has usually given up.
        "pool_timeout": 10,
        # Retire a connection after 30 minutes so long-lived backends give back the memory
        # their catalog and plan caches grew, and so no connection outlives typical
        # firewall/NAT idle limits between pings.
        "pool_recycle": 1800,
        # A restart or failover leaves dead connections in the pool; one SELECT 1 at
        # checkout replaces them instead of failing the request.
        "pool_pre_ping": True,
        # End whatever transaction a returned connection left open, so its locks and
        # snapshot are released (also SQLAlchemy's default, stated for the record).
        "pool_reset_on_return": "rollback",
    }


def _pgbouncer_transaction(driver: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        # A connection to PgBouncer is cheap (no backend behind it while idle), but opening
        # one costs a TCP and auth handshake; keep and reuse them.
        "poolclass": QueuePool,
        # One client connection per concurrent thread; PgBouncer's default_pool_size, not
        # this number, bounds the server backends.
        "pool_size": 10,
        # Bursts wait in PgBouncer's queue, which is cheap; still bounded so
        # processes x (pool_size + max_overflow) stays under max_client_conn.
        "max_overflow": 10,
        # As for direct: fail after 10 s rather than 30 s.
        "pool_timeout": 10,
        # Below PgBouncer's server_idle_timeout (600 s by default) and the 5-10 minute
        # client idle limits of managed poolers, so we retire a connection before the
        # pooler closes it under us.
        "pool_recycle": 300,
        # A PgBouncer restart or reload drops every client connection; the ping at checkout
        # (one round trip through PgBouncer) replaces them instead of failing the request.
        "pool_pre_ping": True,
        # Transaction pooling frees the server connection only at COMMIT/ROLLBACK; a
        # transaction left open by a returned connection would pin one for everybody.
        "pool_reset_on_return": "rollback",
    }
    connect_args = _transaction_pooling_connect_args(driver)
    if connect_args:
        options["connect_args"] = connect_args
    return options


def _pgbouncer_session(driver: str | None) -> dict[str, Any]:
    return {
        # Session pooling gives each client connection a server connection for as long as
        # it stays connected: behave like direct, with PgBouncer as the connection limit.
        "poolclass": QueuePool,
        # Each pooled connection holds a server connection; processes x pool_size must fit
        # PgBouncer's default_pool_size or clients wait in PgBouncer's queue for ever.
        "pool_size": 5,
        # No overflow: an overflow connection would need a server connection PgBouncer
        # does not have, so it could only wait, holding a client slot.
        "max_overflow": 0,
        # As for direct: fail after 10 s rather than 30 s.
        "pool_timeout": 10,
        # Below PgBouncer's server_idle_timeout (600 s) and managed poolers' idle limits,
        # and it rotates session state (SET, temp tables) that a connection accumulated.
        "pool_recycle": 300,
        # PgBouncer restarts drop client connections; replace them at checkout.
        "pool_pre_ping": True,
        # End any open transaction on return, as for direct.
        "pool_reset_on_return": "rollback",
        # No driver settings: in session mode prepared statements stay on their connection.
    }


def _external_pooler_null(driver: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        # Serverless functions and short-lived processes are frozen or killed with their
        # pools; open a connection to the external pooler per checkout and close it at
        # checkin, and let the pooler do the pooling.
        "poolclass": NullPool,
        # A connection opened a moment ago cannot be stale; a ping would be a wasted round
        # trip per checkout.
        "pool_pre_ping": False,
        # End any open transaction before the connection is closed, so the pooler gets
        # its server connection back at once.
        "pool_reset_on_return": "rollback",
    }
    # External poolers for serverless (RDS Proxy, Supavisor, Neon) usually multiplex
    # transactions, so assume transaction pooling and disable server-side prepares.
    connect_args = _transaction_pooling_connect_args(driver)
    if connect_args:
        options["connect_args"] = connect_args
    return options


@dataclass(frozen=True)
class _Preset:
    build: Callable[[str | None], dict[str, Any]]
    #: The pooler may hand each transaction a different server connection.
    transaction_pooled: bool


_PRESETS: Final[Mapping[str, _Preset]] = {
    "direct": _Preset(_direct, transaction_pooled=False),
    "pgbouncer-transaction": _Preset(_pgbouncer_transaction, transaction_pooled=True),
    "pgbouncer-session": _Preset(_pgbouncer_session, transaction_pooled=False),
    "external-pooler-null": _Preset(_external_pooler_null, transaction_pooled=True),
}

#: Names accepted by :func:`pool_preset` (and ``ReplicaSet(pool=...)``).
PRESET_NAMES: Final[tuple[str, ...]] = tuple(_PRESETS)

# Drivers whose engines are asyncio engines (create_async_engine).
_ASYNC_DRIVERS: Final = frozenset({"asyncpg", "psycopg_async"})

# NullPool accepts none of these; passing one makes create_engine fail with a TypeError.
_QUEUE_POOL_ONLY: Final = frozenset({"pool_size", "max_overflow", "pool_timeout", "pool_use_lifo"})


def _preset(name: str) -> _Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown pool preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}"
        ) from None


def pool_preset(name: str, *, driver: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Return ``create_engine`` keyword arguments for the deployment shape ``name``.

    ::

        engine = create_engine(url, **ss.pool_preset("pgbouncer-transaction", driver="psycopg"))

    :param name: one of :data:`PRESET_NAMES`:

        * ``"direct"``: the application connects to PostgreSQL itself;
        * ``"pgbouncer-transaction"``: through PgBouncer with ``pool_mode = transaction``;
        * ``"pgbouncer-session"``: through PgBouncer with ``pool_mode = session``;
        * ``"external-pooler-null"``: ``NullPool`` for serverless and short-lived
          processes behind an external pooler, assumed to pool transactions.
    :param driver: the URL's driver name (``url.get_driver_name()``: ``"psycopg2"``,
        ``"psycopg"``, ``"asyncpg"``, ``"psycopg_async"``). For asyncpg and
        psycopg_async, ``QueuePool`` becomes ``AsyncAdaptedQueuePool`` (for
        ``create_async_engine("postgresql+psycopg://...")`` pass
        ``driver="psycopg_async"``). Transaction-pooled presets then add the
        ``connect_args`` that driver needs (psycopg 3: ``prepare_threshold=None``;
        asyncpg: no statement caches and unique prepared statement names). ``None``
        means unknown: no driver-specific arguments.
    :param overrides: keyword arguments that replace the preset's; ``connect_args`` is
        merged key by key into the preset's.

    Returns a new dict each call. Raises :class:`~sqlalchemy_scale.ConfigurationError`
    for an unknown name, or for queue-pool settings (``pool_size``, ``max_overflow``,
    ``pool_timeout``) given to the ``NullPool`` preset.

    .. versionadded:: 0.1
    """
    options = _preset(name).build(driver)
    if driver in _ASYNC_DRIVERS and options.get("poolclass") is QueuePool:
        # QueuePool refuses asyncio engines; its asyncio twin takes the same arguments.
        options["poolclass"] = AsyncAdaptedQueuePool
    connect_args = overrides.pop("connect_args", None)
    options.update(overrides)
    if connect_args is not None:
        options["connect_args"] = {**options.get("connect_args", {}), **connect_args}
    if options.get("poolclass") is NullPool:
        wrong = sorted(_QUEUE_POOL_ONLY & options.keys())
        if wrong:
            raise ConfigurationError(
                f"pool preset {name!r} uses NullPool, which has no {', '.join(wrong)}; "
                "drop them or override poolclass"
            )
    return options


def preset_needs_guard(name: str) -> bool:
    """Whether engines built from preset ``name`` should get :func:`guard_transaction_pooling`.

    True for presets whose pooler may give each transaction a different server
    connection (``pgbouncer-transaction``, ``external-pooler-null``).
    """
    return _preset(name).transaction_pooled


# -- sizing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolSizing:
    """Pool sizes for one application behind PgBouncer, from :func:`size_pools`.

    App side, per process: :attr:`app_pool_size` and :attr:`app_max_overflow`
    (``create_engine`` arguments, also as :meth:`engine_overrides`). PgBouncer:
    :attr:`pgbouncer_default_pool_size` and :attr:`pgbouncer_max_client_conn`
    (also as :meth:`pgbouncer_settings`). :attr:`warnings` explains, in words,
    every total that exceeds a limit; :meth:`explain` renders it all.
    """

    app_processes: int
    threads_per_process: int
    server_cores: int
    #: ``pool_size`` per process: one connection per thread that can run a query.
    app_pool_size: int
    #: ``max_overflow`` per process: 0, since a thread never needs a second connection.
    app_max_overflow: int
    #: Client connections to PgBouncer when every thread is busy.
    client_connections: int
    #: PgBouncer ``default_pool_size``: server connections per (database, user) pool.
    pgbouncer_default_pool_size: int
    #: PgBouncer ``max_client_conn`` to configure: twice :attr:`client_connections`,
    #: because a rolling deploy runs old and new processes side by side.
    pgbouncer_max_client_conn: int
    #: PgBouncer's ``max_client_conn`` as it is configured now.
    max_client_conn: int
    #: Server backends PgBouncer may open: ``default_pool_size * pools + reserve_pool_size``.
    server_connections: int
    #: PostgreSQL ``max_connections``.
    max_connections: int
    #: ``max_connections`` minus superuser-reserved and other (non-PgBouncer) connections.
    available_connections: int
    #: Server backends the same pools would need without PgBouncer.
    direct_connections: int
    warnings: list[str] = field(default_factory=list)

    def engine_overrides(self) -> dict[str, int]:
        """The app-side sizes as ``create_engine`` / :func:`pool_preset` overrides."""
        return {"pool_size": self.app_pool_size, "max_overflow": self.app_max_overflow}

    def pgbouncer_settings(self) -> dict[str, int]:
        """The PgBouncer-side sizes as ``[pgbouncer]`` settings."""
        return {
            "default_pool_size": self.pgbouncer_default_pool_size,
            "max_client_conn": self.pgbouncer_max_client_conn,
        }

    def explain(self) -> str:
        """The sizes, the arithmetic behind them and the warnings, as text."""
        lines = [
            f"App side: pool_size={self.app_pool_size}, max_overflow={self.app_max_overflow} "
            f"per process ({self.threads_per_process} threads each need one connection); "
            f"{self.app_processes} processes x {self.app_pool_size} = "
            f"{self.client_connections} client connections to PgBouncer.",
            f"PgBouncer: default_pool_size={self.pgbouncer_default_pool_size} "
            f"(starting point (server_cores {self.server_cores} x 2) + 1 = "
            f"{self.server_cores * 2 + 1}), max_client_conn={self.pgbouncer_max_client_conn} "
            f"(2 x {self.client_connections}, room for a rolling deploy).",
            f"Server: at most {self.server_connections} backends from PgBouncer of the "
            f"{self.available_connections} that max_connections={self.max_connections} "
            "leaves for applications.",
        ]
        if self.warnings:
            lines.append("Warnings:")
            lines.extend(f"- {w}" for w in self.warnings)
        else:
            lines.append("No limit is exceeded.")
        return "\n".join(lines)


def size_pools(
    *,
    app_processes: int,
    threads_per_process: int,
    server_cores: int,
    max_connections: int = 100,
    max_client_conn: int = 100,
    superuser_reserved_connections: int = 3,
    other_connections: int = 0,
    pools: int = 1,
    reserve_pool_size: int = 0,
) -> PoolSizing:
    """Size app-side pools and PgBouncer (transaction mode) for one deployment.

    :param app_processes: application processes across all hosts (workers x hosts).
    :param threads_per_process: threads (or concurrent tasks) per process that run queries.
    :param server_cores: CPU cores of the PostgreSQL server.
    :param max_connections: the server's ``max_connections`` (PostgreSQL's default 100).
    :param max_client_conn: PgBouncer's configured ``max_client_conn`` (default 100).
    :param superuser_reserved_connections: slots only superusers may use (default 3).
    :param other_connections: connections that bypass PgBouncer (replication,
        monitoring, migrations, cron jobs).
    :param pools: PgBouncer pools, one per (database, user) pair in use; each gets
        ``default_pool_size`` server connections.
    :param reserve_pool_size: PgBouncer's ``reserve_pool_size`` (default 0).

    The server side starts at ``(server_cores * 2) + 1``, the PostgreSQL wiki's
    starting point for active connections, and is lowered to what
    ``max_connections`` allows and to the number of clients that can ever be busy.
    Raises :class:`~sqlalchemy_scale.ConfigurationError` for non-positive counts or a
    server that leaves no connection for PgBouncer.

    .. versionadded:: 0.1
    """
    for label, value in (
        ("app_processes", app_processes),
        ("threads_per_process", threads_per_process),
        ("server_cores", server_cores),
        ("max_connections", max_connections),
        ("max_client_conn", max_client_conn),
        ("pools", pools),
    ):
        if value < 1:
            raise ConfigurationError(f"size_pools: {label} must be at least 1, got {value}")
    for label, value in (
        ("superuser_reserved_connections", superuser_reserved_connections),
        ("other_connections", other_connections),
        ("reserve_pool_size", reserve_pool_size),
    ):
        if value < 0:
            raise ConfigurationError(f"size_pools: {label} must not be negative, got {value}")
    available = max_connections - superuser_reserved_connections - other_connections
    if available - reserve_pool_size < pools:
        raise ConfigurationError(
            f"size_pools: max_connections={max_connections} minus "
            f"{superuser_reserved_connections} superuser-reserved and {other_connections} other "
            f"connections leaves {available}, not enough for {pools} PgBouncer pool(s) "
            f"and reserve_pool_size={reserve_pool_size}"
        )

    warnings_: list[str] = []
    app_pool_size = threads_per_process
    client_connections = app_processes * app_pool_size
    reserved_text = (
        f"max_connections={max_connections} leaves {available} "
        f"({superuser_reserved_connections} reserved for superusers"
        + (f", {other_connections} for other connections" if other_connections else "")
        + ")"
    )

    starting_point = server_cores * 2 + 1
    pool_size = min(starting_point, client_connections)
    if pool_size * pools + reserve_pool_size > available:
        capped = (available - reserve_pool_size) // pools
        warnings_.append(
            f"default_pool_size={pool_size} x {pools} pool(s)"
            + (f" + reserve_pool_size={reserve_pool_size}" if reserve_pool_size else "")
            + f" = {pool_size * pools + reserve_pool_size} server connections exceed what "
            f"{reserved_text}; lowered default_pool_size to {capped}. Raise max_connections "
            "or use fewer (database, user) pairs to get the full pool."
        )
        pool_size = capped
    server_connections = pool_size * pools + reserve_pool_size

    if client_connections > max_client_conn:
        warnings_.append(
            f"{app_processes} processes x {app_pool_size} connections = {client_connections} "
            f"client connections exceed PgBouncer's max_client_conn={max_client_conn}: "
            f"connection {max_client_conn + 1} is refused with 'no more connections allowed "
            f"(max_client_conn)'. Set max_client_conn to at least {client_connections} "
            f"({2 * client_connections} leaves room for a rolling deploy)."
        )
    if client_connections > available:
        warnings_.append(
            f"Without PgBouncer these pools would need {client_connections} server connections "
            f"({app_processes} processes x {app_pool_size}), but {reserved_text}: connection "
            f"{available + 1} would fail with 'FATAL: sorry, too many clients already'. "
            "Connect through PgBouncer with these sizes, or give each process at most "
            f"{max(available // app_processes, 0)} connections."
        )

    return PoolSizing(
        app_processes=app_processes,
        threads_per_process=threads_per_process,
        server_cores=server_cores,
        app_pool_size=app_pool_size,
        app_max_overflow=0,
        client_connections=client_connections,
        pgbouncer_default_pool_size=pool_size,
        pgbouncer_max_client_conn=2 * client_connections,
        max_client_conn=max_client_conn,
        server_connections=server_connections,
        max_connections=max_connections,
        available_connections=available,
        direct_connections=client_connections,
        warnings=warnings_,
    )


# -- the transaction-pooling guard -------------------------------------------------------


@dataclass(frozen=True)
class PoolingHazard:
    """What a statement does that transaction pooling breaks, and what to write instead."""

    #: Short name of the construct, e.g. ``"session-level SET"``.
    construct: str
    #: Why transaction pooling breaks it.
    reason: str
    #: The safe alternative.
    alternative: str


_SET = PoolingHazard(
    "session-level SET",
    "the setting stays on the server connection that ran it, so it leaks into other "
    "clients' transactions and is missing from your next one",
    "SET LOCAL inside the transaction (or set_config(name, value, true)), or a per-role "
    "or per-database default (ALTER ROLE ... SET)",
)
_LISTEN = PoolingHazard(
    "LISTEN",
    "the subscription belongs to a server connection you give back at COMMIT, so "
    "notifications go to whichever client holds it next, or nowhere",
    "LISTEN on a dedicated connection straight to PostgreSQL (or through a "
    "session-mode pool), outside the transaction-pooled engine",
)
_ADVISORY = PoolingHazard(
    "session advisory lock",
    "the lock is held by a server connection until it is explicitly unlocked, not by you: "
    "your unlock may run on another server connection, and the lock leaks",
    "pg_advisory_xact_lock() / pg_try_advisory_xact_lock(), released at the end of the transaction",
)
_TEMP = PoolingHazard(
    "CREATE TEMP object that outlives the transaction",
    "the temporary object stays on the server connection after COMMIT, where the next "
    "transaction (maybe another client's) sees it, or yours does not",
    "CREATE TEMP TABLE ... ON COMMIT DROP inside one transaction, or a regular table",
)
_PREPARE = PoolingHazard(
    "PREPARE",
    "the prepared statement exists only on the server connection that prepared it, so a "
    "later EXECUTE fails with 'prepared statement does not exist' or runs another "
    "client's statement",
    "plain statements with bind parameters (and the preset's driver settings, which "
    "turn off driver-side prepares)",
)
_HOLD = PoolingHazard(
    "DECLARE ... WITH HOLD",
    "a holdable cursor outlives COMMIT on a server connection you no longer own",
    "a cursor without HOLD inside one transaction (SQLAlchemy's stream_results / "
    "yield_per), or keyset pagination across transactions",
)

# The fast pre-check: statement heads worth a closer look, matched case-insensitively after
# leading whitespace. "/*" and "--" let a leading comment reach the slow path, which strips
# it. A match fails at the first character that differs, so "SELECT" costs three.
_HEAD = re.compile(r"\s*(?:SET|LISTEN|CREATE|PREPARE|DECLARE|/\*|--)", re.I).match

_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)+", re.S)
_SET_RE = re.compile(r"SET\s+(?!LOCAL\b|TRANSACTION\b|CONSTRAINTS?\b)", re.I)
_SET_SESSION_TX = re.compile(r"SET\s+SESSION\s+CHARACTERISTICS\b", re.I)
_LISTEN_RE = re.compile(r"LISTEN\b", re.I)
_TEMP_RE = re.compile(
    r"CREATE\s+(?:OR\s+REPLACE\s+)?(?:(?:GLOBAL|LOCAL)\s+)?TEMP(?:ORARY)?\s+(\w+)", re.I
)
_ON_COMMIT_DROP = re.compile(r"\bON\s+COMMIT\s+DROP\b", re.I)
_PREPARE_RE = re.compile(r"PREPARE\b(?!\s+TRANSACTION\b)", re.I)
_HOLD_RE = re.compile(r"DECLARE\b.*?\bCURSOR\s+WITH\s+HOLD\b", re.I | re.S)
_ADVISORY_RE = re.compile(r'\b"?pg_(?:try_)?advisory_lock(?:_shared)?"?\s*\(', re.I)
# set_config(name, value, is_local => false): a session-level SET in function form.
_SET_CONFIG_RE = re.compile(r'\b"?set_config"?\s*\((?:[^,]*,){2}\s*false\s*\)', re.I)


def _might_be_hazard(statement: str) -> bool:
    # The only code every statement runs (in the guard's listener too): one anchored
    # regex match and substring searches, all in C. Title case is covered because
    # "dvisory" keeps its lower case there. A ";" that only ends the statement is ignored.
    return (
        _HEAD(statement) is not None
        or "dvisory" in statement
        or "DVISORY" in statement
        or "et_config" in statement
        or "ET_CONFIG" in statement
        or (";" in statement and ";" in statement.rstrip().rstrip(";"))
    )


def _classify_part(part: str) -> PoolingHazard | None:
    part = _COMMENTS.sub("", part, count=1)
    if _ADVISORY_RE.search(part):
        return _ADVISORY
    if _SET_CONFIG_RE.search(part):
        return _SET
    head = part[:8].upper()
    if head.startswith("SET"):
        if _SET_SESSION_TX.match(part) or _SET_RE.match(part):
            return _SET
        return None
    if head.startswith("LISTEN"):
        return _LISTEN if _LISTEN_RE.match(part) else None
    if head.startswith("CREATE"):
        temp = _TEMP_RE.match(part)
        if temp is None:
            return None
        if temp.group(1).upper() == "TABLE" and _ON_COMMIT_DROP.search(part):
            return None
        return _TEMP
    if head.startswith("PREPARE"):
        return _PREPARE if _PREPARE_RE.match(part) else None
    if head.startswith("DECLARE"):
        return _HOLD if _HOLD_RE.match(part) else None
    return None


def _classify(statement: str) -> PoolingHazard | None:
    # Splitting on ";" ignores quoting: a literal containing "; SET x" is flagged. That
    # errs on the side of refusing, and such literals are rare.
    for part in statement.split(";"):
        hazard = _classify_part(part)
        if hazard is not None:
            return hazard
    return None


def check_transaction_pooling(statement: str) -> PoolingHazard | None:
    """Return what ``statement`` does that transaction pooling breaks, or None if nothing.

    Flags session-level ``SET`` (not ``SET LOCAL``, ``SET TRANSACTION``,
    ``SET CONSTRAINTS``), ``LISTEN``, session advisory locks (``pg_advisory_lock``,
    ``pg_try_advisory_lock`` and their ``_shared`` forms, not the ``_xact_`` ones),
    ``CREATE TEMP`` objects except tables ``ON COMMIT DROP``, ``PREPARE`` and
    ``DECLARE ... WITH HOLD``, in any ``;``-separated part of ``statement``.
    """
    if not _might_be_hazard(statement):
        return None
    return _classify(statement)


def _message(hazard: PoolingHazard, statement: str, where: str) -> str:
    shown = " ".join(statement.split())
    if len(shown) > 200:
        shown = shown[:197] + "..."
    return (
        f"{hazard.construct} under transaction pooling ({where}): {shown!r}; "
        f"{hazard.reason}. Use {hazard.alternative}."
    )


_GuardListener = Callable[..., None]
# The dialect events the guard listens to: together they see every statement a cursor
# executes (single, no parameters, executemany, and insertmanyvalues batches).
_EXECUTE_EVENTS: Final = ("do_execute", "do_execute_no_params", "do_executemany")
# Dialects carrying a guard, so re-installing replaces it instead of adding a second one.
_guards: weakref.WeakKeyDictionary[Dialect, _GuardListener] = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def _make_guard(engine: Engine, mode: PoolingGuardMode) -> _GuardListener:
    # The listener lives on the dialect, which the engine holds (and _guards maps the dialect
    # to it): it must not hold the engine, or a dropped engine and its pool would never be
    # freed. It keeps only the URL as text, secrets masked.
    where = render_url(engine)

    # Signatures: do_execute(cursor, statement, parameters, context),
    # do_execute_no_params(cursor, statement, context), do_executemany(same as do_execute).
    # Returning None lets SQLAlchemy execute the statement as usual.
    def guard(cursor: Any, statement: str, *rest: Any) -> None:
        # The same pre-check as check_transaction_pooling(), called rather than inlined:
        # an inlined copy once missed set_config(..., false).
        if not _might_be_hazard(statement):
            return
        hazard = _classify(statement)
        if hazard is None:
            return
        if mode == "raise":
            raise TransactionPoolingError(
                _message(hazard, statement, where),
                statement=statement,
                construct=hazard.construct,
                alternative=hazard.alternative,
            )
        warnings.warn(_message(hazard, statement, where), TransactionPoolingWarning, stacklevel=2)

    return guard


def guard_transaction_pooling(engine: Engine, mode: PoolingGuardMode = "raise") -> None:
    """Refuse or warn about statements that transaction pooling silently breaks on ``engine``.

    :param engine: an engine whose connections go through a transaction pooler.
    :param mode: ``"raise"`` (default): the statement is not sent and
        :class:`~sqlalchemy_scale.errors.TransactionPoolingError` names it and the
        safe alternative; ``"warn"``: it runs and a :class:`TransactionPoolingWarning`
        is issued; ``"off"``: remove the guard.

    What is flagged is listed in :func:`check_transaction_pooling`. Calling again
    replaces the mode. :class:`~sqlalchemy_scale.ReplicaSet` calls this for the
    presets for which :func:`preset_needs_guard` is true.

    The guard listens to SQLAlchemy's dialect events ``do_execute``,
    ``do_execute_no_params`` and ``do_executemany``, which receive each statement
    just before the cursor executes it, rather than the engine event
    ``before_cursor_execute``: any engine-level listener moves every statement onto
    SQLAlchemy's event-dispatching path, which costs more than the check itself
    (``benchmarks/bench_pooling.py`` measures both). The dialect belongs to
    ``engine``, so engines made from it with ``engine.execution_options()`` are
    guarded too.

    .. versionadded:: 0.1
    """
    if mode not in _GUARD_MODES:
        raise ConfigurationError(
            f"pooling guard mode must be 'raise', 'warn' or 'off', got {mode!r}"
        )
    dialect = engine.dialect
    with _guards_lock:
        old = _guards.pop(dialect, None)
        if old is not None:
            for name in _EXECUTE_EVENTS:
                event.remove(engine, name, old)
        if mode == "off":
            return
        listener = _make_guard(engine, mode)
        for name in _EXECUTE_EVENTS:
            event.listen(engine, name, listener)
        _guards[dialect] = listener


def is_guarded(engine: Engine) -> bool:
    """Whether :func:`guard_transaction_pooling` is active on ``engine`` (or the engine
    it was made from with ``execution_options()``)."""
    return engine.dialect in _guards
