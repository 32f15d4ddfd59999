"""Pool presets, pool sizing and the transaction-pooling guard (sqlalchemy_scale.pooling).

The first half is pure logic (no server); the second half runs every preset
through a real PgBouncer and asks PgBouncer (``SHOW CLIENTS``/``SHOW POOLS``) and
PostgreSQL (``inet_server_port()``, ``pg_stat_activity``) what happened.
"""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import NullPool, QueuePool

from sqlalchemy_scale.errors import ConfigurationError, ScaleError, TransactionPoolingError
from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.pooling import (
    PRESET_NAMES,
    TransactionPoolingWarning,
    check_transaction_pooling,
    guard_transaction_pooling,
    is_guarded,
    pool_preset,
    preset_needs_guard,
    size_pools,
)
from sqlalchemy_scale.topology import ReplicaSet

DRIVERS = ("psycopg2", "psycopg")
QUEUE_PRESETS = ("direct", "pgbouncer-transaction", "pgbouncer-session")
# PgBouncer's default server_idle_timeout; pooled connections must be recycled before it.
PGBOUNCER_SERVER_IDLE_TIMEOUT = 600

# -- presets (pure) --------------------------------------------------------------------------


def test_preset_names() -> None:
    """The four documented presets exist, in a stable order."""
    assert PRESET_NAMES == (
        "direct",
        "pgbouncer-transaction",
        "pgbouncer-session",
        "external-pooler-null",
    )


@pytest.mark.parametrize("name", QUEUE_PRESETS)
def test_queue_presets_set_every_pool_value(name: str) -> None:
    """Each pooled preset sets pool class, size, overflow, timeout, recycle, pre-ping and reset."""
    options = pool_preset(name)
    assert options["poolclass"] is QueuePool
    assert options["pool_size"] >= 1
    assert options["max_overflow"] >= 0
    assert 0 < options["pool_timeout"] < 30  # fails faster than SQLAlchemy's default
    assert options["pool_recycle"] > 0
    assert options["pool_pre_ping"] is True
    assert options["pool_reset_on_return"] == "rollback"


@pytest.mark.parametrize("name", ["pgbouncer-transaction", "pgbouncer-session"])
def test_pgbouncer_presets_recycle_below_pgbouncer_idle_timeout(name: str) -> None:
    """PgBouncer presets retire connections before PgBouncer's server_idle_timeout closes them."""
    assert pool_preset(name)["pool_recycle"] < PGBOUNCER_SERVER_IDLE_TIMEOUT


def test_session_preset_has_no_overflow() -> None:
    """In session mode an overflow connection could only wait for a server, so there is none."""
    assert pool_preset("pgbouncer-session")["max_overflow"] == 0


def test_null_preset_uses_nullpool_without_ping() -> None:
    """external-pooler-null opens a connection per checkout, so it neither pools nor pings."""
    options = pool_preset("external-pooler-null")
    assert options["poolclass"] is NullPool
    assert options["pool_pre_ping"] is False
    assert not {"pool_size", "max_overflow", "pool_timeout"} & options.keys()


@pytest.mark.parametrize("name", ["pgbouncer-transaction", "external-pooler-null"])
def test_transaction_presets_disable_psycopg3_prepares(name: str) -> None:
    """Behind a transaction pooler psycopg 3 gets prepare_threshold=None."""
    assert pool_preset(name, driver="psycopg")["connect_args"] == {"prepare_threshold": None}
    assert pool_preset(name, driver="psycopg_async")["connect_args"] == {"prepare_threshold": None}


@pytest.mark.parametrize("name", ["pgbouncer-transaction", "external-pooler-null"])
def test_transaction_presets_configure_asyncpg(name: str) -> None:
    """asyncpg gets no statement caches and a unique name for every prepared statement."""
    connect_args = pool_preset(name, driver="asyncpg")["connect_args"]
    assert connect_args["prepared_statement_cache_size"] == 0
    assert connect_args["statement_cache_size"] == 0
    make_name = connect_args["prepared_statement_name_func"]
    names = {make_name() for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith("__asyncpg_") for n in names)


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("driver", [None, "psycopg2", "pg8000"])
def test_no_connect_args_without_a_driver_that_prepares(name: str, driver: str | None) -> None:
    """psycopg2, unknown drivers and driver=None get no driver-specific connect_args."""
    assert "connect_args" not in pool_preset(name, driver=driver)


@pytest.mark.parametrize("name", ["direct", "pgbouncer-session"])
def test_session_state_presets_leave_psycopg3_alone(name: str) -> None:
    """Presets that keep one server connection per client leave psycopg 3's prepares on."""
    assert "connect_args" not in pool_preset(name, driver="psycopg")


def test_pool_preset_returns_a_fresh_dict() -> None:
    """Mutating a returned preset does not change the next one."""
    first = pool_preset("pgbouncer-transaction", driver="psycopg")
    first["pool_size"] = 99
    first["connect_args"]["prepare_threshold"] = 5
    second = pool_preset("pgbouncer-transaction", driver="psycopg")
    assert second["pool_size"] == 10
    assert second["connect_args"] == {"prepare_threshold": None}


def test_overrides_replace_values_and_merge_connect_args() -> None:
    """Overrides replace preset values; connect_args merge key by key."""
    options = pool_preset(
        "pgbouncer-transaction",
        driver="psycopg",
        pool_size=3,
        pool_pre_ping=False,
        echo=True,
        connect_args={"connect_timeout": 5},
    )
    assert options["pool_size"] == 3
    assert options["pool_pre_ping"] is False
    assert options["echo"] is True
    assert options["connect_args"] == {"prepare_threshold": None, "connect_timeout": 5}
    again = pool_preset(
        "pgbouncer-transaction", driver="psycopg", connect_args={"prepare_threshold": 2}
    )
    assert again["connect_args"] == {"prepare_threshold": 2}


def test_unknown_preset_lists_the_valid_names() -> None:
    """An unknown preset raises ConfigurationError naming every valid preset."""
    with pytest.raises(ConfigurationError) as info:
        pool_preset("pgbouncer")
    for name in PRESET_NAMES:
        assert name in str(info.value)
    assert isinstance(info.value, ArgumentError)
    with pytest.raises(ConfigurationError):
        preset_needs_guard("nope")


def test_null_preset_rejects_queue_pool_settings() -> None:
    """pool_size on the NullPool preset is a ConfigurationError, not a TypeError at create_engine."""
    with pytest.raises(ConfigurationError, match="NullPool, which has no max_overflow, pool_size"):
        pool_preset("external-pooler-null", pool_size=5, max_overflow=1)
    options = pool_preset("external-pooler-null", poolclass=QueuePool, pool_size=2)
    assert options["pool_size"] == 2


def test_preset_needs_guard() -> None:
    """Only presets whose pooler may switch server connections between transactions need the guard."""
    assert {n: preset_needs_guard(n) for n in PRESET_NAMES} == {
        "direct": False,
        "pgbouncer-transaction": True,
        "pgbouncer-session": False,
        "external-pooler-null": True,
    }


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("driver", DRIVERS)
def test_every_preset_builds_an_engine(name: str, driver: str) -> None:
    """create_engine accepts every preset for both drivers, and the pool gets its settings."""
    engine = create_engine(
        f"postgresql+{driver}://u:p@127.0.0.1:1/db", **pool_preset(name, driver=driver)
    )
    options = pool_preset(name)
    assert isinstance(engine.pool, options["poolclass"])
    if isinstance(engine.pool, QueuePool):
        assert engine.pool.size() == options["pool_size"]
        assert engine.pool._max_overflow == options["max_overflow"]
        assert engine.pool._recycle == options["pool_recycle"]
    assert engine.pool._pre_ping is options["pool_pre_ping"]
    engine.dispose()


# -- sizing (pure) ---------------------------------------------------------------------------


def test_size_pools_worked_example() -> None:
    """8 processes x 8 threads on a 4-core server: pools of 8, PgBouncer pool 9, no warnings."""
    sizing = size_pools(app_processes=8, threads_per_process=8, server_cores=4)
    assert sizing.engine_overrides() == {"pool_size": 8, "max_overflow": 0}
    assert sizing.client_connections == 64
    assert sizing.pgbouncer_settings() == {"default_pool_size": 9, "max_client_conn": 128}
    assert sizing.server_connections == 9
    assert sizing.available_connections == 97
    assert sizing.warnings == []
    assert "No limit is exceeded." in sizing.explain()


def test_size_pools_explains_the_direct_connection_cliff() -> None:
    """Pools that would exceed max_connections without PgBouncer are explained in words."""
    sizing = size_pools(app_processes=8, threads_per_process=10, server_cores=2, max_connections=40)
    assert sizing.pgbouncer_default_pool_size == 5
    assert sizing.direct_connections == 80
    [warning] = sizing.warnings
    assert "80 server connections" in warning
    assert "max_connections=40 leaves 37" in warning
    assert "too many clients already" in warning
    assert "at most 4 connections" in warning
    assert warning in sizing.explain()


def test_size_pools_explains_max_client_conn() -> None:
    """More client connections than PgBouncer's max_client_conn is explained with the fix."""
    sizing = size_pools(
        app_processes=20, threads_per_process=10, server_cores=8, max_connections=500
    )
    [warning] = sizing.warnings
    assert "200 client connections exceed PgBouncer's max_client_conn=100" in warning
    assert "at least 200" in warning
    assert sizing.pgbouncer_max_client_conn == 400


def test_size_pools_caps_the_server_pool_at_max_connections() -> None:
    """(cores * 2) + 1 is lowered, with a warning, when max_connections cannot hold it."""
    sizing = size_pools(
        app_processes=4,
        threads_per_process=50,
        server_cores=32,
        max_connections=40,
        max_client_conn=1000,
        other_connections=5,
        pools=2,
        reserve_pool_size=2,
    )
    assert sizing.available_connections == 32
    assert sizing.pgbouncer_default_pool_size == 15  # (32 - 2 reserve) // 2 pools
    assert sizing.server_connections == 32
    assert any("lowered default_pool_size to 15" in w for w in sizing.warnings)
    assert any("5 for other connections" in w for w in sizing.warnings)


def test_size_pools_never_exceeds_the_clients() -> None:
    """The server pool is no larger than the number of clients that can ever be busy."""
    sizing = size_pools(app_processes=1, threads_per_process=2, server_cores=8)
    assert sizing.pgbouncer_default_pool_size == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"app_processes": 0},
        {"threads_per_process": -1},
        {"server_cores": 0},
        {"other_connections": -1},
        {"max_connections": 3},
        {"max_connections": 10, "other_connections": 7},
    ],
)
def test_size_pools_rejects_impossible_input(kwargs: dict[str, int]) -> None:
    """Non-positive counts or a server with no room for PgBouncer raise ConfigurationError."""
    arguments = {"app_processes": 2, "threads_per_process": 4, "server_cores": 2, **kwargs}
    with pytest.raises(ConfigurationError, match="size_pools"):
        size_pools(**arguments)


# -- the guard's classification (pure) -------------------------------------------------------

HAZARDS = [
    ("SET statement_timeout = 5000", "session-level SET"),
    ("set search_path to tenant_1, public", "session-level SET"),
    ("SET SESSION work_mem = '64MB'", "session-level SET"),
    ("SET ROLE reporting", "session-level SET"),
    ("SET TIME ZONE 'UTC'", "session-level SET"),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "session-level SET",
    ),
    ("  \n  SET application_name = 'x'", "session-level SET"),
    ("/* app:web */ SET lock_timeout = '1s'", "session-level SET"),
    ("-- why\nSET lock_timeout = '1s'", "session-level SET"),
    ("SELECT 1; SET lock_timeout = '1s'", "session-level SET"),
    ("LISTEN jobs", "LISTEN"),
    ('listen "Jobs"', "LISTEN"),
    ("SELECT pg_advisory_lock(42)", "session advisory lock"),
    ("SELECT pg_advisory_lock(1, 2)", "session advisory lock"),
    ("SELECT pg_try_advisory_lock(%(key)s)", "session advisory lock"),
    ("SELECT pg_advisory_lock_shared(42)", "session advisory lock"),
    ('SELECT "pg_advisory_lock"(42)', "session advisory lock"),
    ("SELECT set_config('search_path', 'app', false)", "session-level SET"),
    ("SELECT SET_CONFIG('search_path', 'app', FALSE)", "session-level SET"),
    ("select PG_ADVISORY_LOCK (42)", "session advisory lock"),
    ("SELECT Pg_Advisory_Lock(42)", "session advisory lock"),
    ("CREATE TEMP TABLE scratch (id int)", "CREATE TEMP object that outlives the transaction"),
    ("CREATE TEMPORARY TABLE scratch (id int)", "CREATE TEMP object that outlives the transaction"),
    (
        "create local temporary table scratch (id int) on commit delete rows",
        "CREATE TEMP object that outlives the transaction",
    ),
    (
        "CREATE TEMP TABLE scratch AS SELECT 1 AS x",
        "CREATE TEMP object that outlives the transaction",
    ),
    ("CREATE TEMP VIEW v AS SELECT 1", "CREATE TEMP object that outlives the transaction"),
    ("CREATE TEMP SEQUENCE s", "CREATE TEMP object that outlives the transaction"),
    ("PREPARE q (int) AS SELECT $1", "PREPARE"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "DECLARE ... WITH HOLD"),
    ("declare c binary no scroll cursor with hold for select 1", "DECLARE ... WITH HOLD"),
]

SAFE = [
    "SELECT 1",
    "SELECT users.id FROM users WHERE users.name = %(name_1)s",
    "INSERT INTO users (name) VALUES (%(name)s) RETURNING users.id",
    "UPDATE users SET name = %(name)s WHERE users.id = %(id_1)s",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "SET LOCAL statement_timeout = 5000",
    "set local search_path to tenant_1",
    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "SET CONSTRAINTS ALL DEFERRED",
    "SELECT set_config('app.user', %(user)s, true)",
    "SELECT pg_advisory_xact_lock(42)",
    "SELECT pg_try_advisory_xact_lock(42)",
    "SELECT pg_advisory_xact_lock_shared(42)",
    "CREATE TEMP TABLE scratch (id int) ON COMMIT DROP",
    "CREATE TEMPORARY TABLE scratch ON COMMIT DROP AS SELECT 1 AS x",
    "CREATE TABLE settings (id int)",
    "CREATE INDEX ix ON t (a)",
    "DECLARE c CURSOR FOR SELECT 1",
    "DECLARE c NO SCROLL CURSOR WITHOUT HOLD FOR SELECT 1",
    "PREPARE TRANSACTION 'tx1'",
    "NOTIFY jobs",
    "SELECT 1;",
    "SELECT 'advisory notes' AS txt",
    "SELECT 1; SELECT 2",
]


@pytest.mark.parametrize(("statement", "construct"), HAZARDS)
def test_guard_flags_what_transaction_pooling_breaks(statement: str, construct: str) -> None:
    """Each listed construct is flagged, with a reason and a safe alternative."""
    hazard = check_transaction_pooling(statement)
    assert hazard is not None
    assert hazard.construct == construct
    assert hazard.reason and hazard.alternative


@pytest.mark.parametrize("statement", SAFE)
def test_guard_accepts_the_safe_alternatives(statement: str) -> None:
    """SET LOCAL, xact advisory locks, ON COMMIT DROP temp tables and plain DML are not flagged."""
    assert check_transaction_pooling(statement) is None


def test_guard_alternatives_name_the_safe_spelling() -> None:
    """The alternative offered for each construct is the transaction-scoped spelling."""
    alternatives = {
        "SET x = 1": "SET LOCAL",
        "SELECT pg_advisory_lock(1)": "pg_advisory_xact_lock",
        "CREATE TEMP TABLE t (a int)": "ON COMMIT DROP",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1": "without HOLD",
    }
    for statement, alternative in alternatives.items():
        hazard = check_transaction_pooling(statement)
        assert hazard is not None and alternative in hazard.alternative


def test_guard_modes_install_replace_and_remove() -> None:
    """Installing twice keeps one listener, "off" removes it, and a bad mode is refused."""
    engine = create_engine("postgresql+psycopg2://u:p@127.0.0.1:1/db")
    assert not is_guarded(engine)
    guard_transaction_pooling(engine)
    guard_transaction_pooling(engine, "warn")
    assert is_guarded(engine)
    assert [
        len(engine.dialect.dispatch.do_execute),
        len(engine.dialect.dispatch.do_executemany),
    ] == [1, 1]
    guard_transaction_pooling(engine, "off")
    assert not is_guarded(engine)
    assert len(engine.dialect.dispatch.do_execute_no_params) == 0
    with pytest.raises(ConfigurationError, match="'raise', 'warn' or 'off'"):
        guard_transaction_pooling(engine, "loud")  # type: ignore[arg-type]


def test_guard_follows_engines_made_with_execution_options() -> None:
    """Engines made from a guarded engine with execution_options() are guarded too."""
    engine = create_engine("postgresql+psycopg2://u:p@127.0.0.1:1/db")
    guard_transaction_pooling(engine)
    assert is_guarded(engine.execution_options(postgresql_readonly=True))
    assert not is_guarded(create_engine("postgresql+psycopg2://u:p@127.0.0.1:1/db"))


def test_transaction_pooling_error_is_a_scale_error() -> None:
    """TransactionPoolingError is caught by except ScaleError and carries the statement."""
    error = TransactionPoolingError("m", statement="LISTEN x", construct="LISTEN", alternative="a")
    assert isinstance(error, ScaleError)
    assert (error.statement, error.construct, error.alternative) == ("LISTEN x", "LISTEN", "a")


@pytest.mark.parametrize(
    ("pool", "guard", "guarded"),
    [
        ("pgbouncer-transaction", "raise", True),
        ("external-pooler-null", "warn", True),
        ("pgbouncer-transaction", "off", False),
        ("pgbouncer-session", "raise", False),
        ("direct", "raise", False),
        (None, "raise", False),
    ],
)
def test_replica_set_guards_transaction_pooled_presets(
    pool: str | None, guard: Any, guarded: bool
) -> None:
    """ReplicaSet installs the guard on every engine it builds from a transaction-pooled preset."""
    replicas = ReplicaSet(
        primary="postgresql+psycopg2://u:p@127.0.0.1:1/db",
        replicas=["postgresql+psycopg2://u:p@127.0.0.1:2/db"],
        pool=pool,
        pooling_guard=guard,
        monitor=False,
    )
    assert is_guarded(replicas.primary.engine) is guarded
    assert is_guarded(replicas.replicas[0].engine) is guarded
    replicas.dispose()


def test_replica_set_rejects_an_unknown_guard_mode() -> None:
    """A misspelt pooling_guard fails at construction."""
    with pytest.raises(ConfigurationError, match="pooling_guard"):
        ReplicaSet(primary="postgresql+psycopg2://u:p@h/db", pooling_guard="strict")  # type: ignore[arg-type]


# -- through a real PgBouncer ----------------------------------------------------------------


def _admin(cluster: LocalCluster, command: str) -> list[dict[str, Any]]:
    """Rows of a PgBouncer admin command as dicts keyed by column name."""
    assert cluster.pgbouncer is not None
    conn = psycopg2.connect(
        host="127.0.0.1",
        port=cluster.pgbouncer.port,
        dbname="pgbouncer",
        user=cluster.user,
        password=cluster.password,
    )
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(command)
            columns = [d.name for d in cur.description]
            return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
    finally:
        conn.close()


def _local_port(conn: Connection) -> int:
    """The client-side TCP port of a SQLAlchemy connection's DBAPI connection."""
    fd = conn.connection.dbapi_connection.fileno()  # type: ignore[union-attr]
    with socket.socket(fileno=os.dup(fd)) as sock:
        return int(sock.getsockname()[1])


def _server_port_via_pgbouncer(engine: Engine, cluster: LocalCluster) -> None:
    """Assert ``engine`` reaches the primary, and that PgBouncer lists it as its client."""
    with engine.connect() as conn:
        for _ in range(3):
            assert conn.execute(text("SELECT inet_server_port()")).scalar() == cluster.primary.port
            conn.commit()
        assert conn.execute(text("SELECT count(*) FROM pg_class")).scalar() > 0
        port = _local_port(conn)
        clients = _admin(cluster, "SHOW CLIENTS")
        assert any(c["port"] == port and c["database"] == "app" for c in clients), clients
        conn.rollback()


@pytest.fixture
def engines() -> Iterator[Callable[..., Engine]]:
    """Build engines for a test and dispose of them after it."""
    made: list[Engine] = []

    def make(url: str, **kwargs: Any) -> Engine:
        engine = create_engine(url, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.dispose()


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_works_through_transaction_pgbouncer(
    scale_cluster: LocalCluster, engines: Callable[..., Engine], name: str, driver: str
) -> None:
    """Every preset connects and runs statements through PgBouncer in transaction mode."""
    assert scale_cluster.pgbouncer is not None and scale_cluster.pgbouncer.mode == "transaction"
    engine = engines(scale_cluster.pgbouncer.url(driver), **pool_preset(name, driver=driver))
    _server_port_via_pgbouncer(engine, scale_cluster)
    pools = {p["database"]: p for p in _admin(scale_cluster, "SHOW POOLS")}
    assert pools["app"]["pool_mode"] == "transaction"


@pytest.mark.parametrize("driver", DRIVERS)
def test_session_preset_works_through_session_pgbouncer(
    scale_cluster_factory: Callable[..., LocalCluster],
    engines: Callable[..., Engine],
    driver: str,
) -> None:
    """pgbouncer-session runs through PgBouncer in session mode, holding one server connection."""
    cluster = scale_cluster_factory(replicas=0, pgbouncer="session")
    assert cluster.pgbouncer is not None
    engine = engines(
        cluster.pgbouncer.url(driver), **pool_preset("pgbouncer-session", driver=driver)
    )
    _server_port_via_pgbouncer(engine, cluster)
    with engine.connect() as conn:
        # Session mode keeps session state on the client's own server connection.
        conn.exec_driver_sql("SET application_name = 'session_preset'")
        conn.commit()
        assert conn.execute(text("SHOW application_name")).scalar() == "session_preset"
        conn.rollback()
    pools = {p["database"]: p for p in _admin(cluster, "SHOW POOLS")}
    assert pools["app"]["pool_mode"] == "session"
    assert not is_guarded(engine)


@pytest.mark.parametrize("driver", DRIVERS)
def test_direct_preset_reaches_the_primary_without_pgbouncer(
    scale_cluster: LocalCluster, engines: Callable[..., Engine], driver: str
) -> None:
    """The direct preset talks to PostgreSQL itself: PgBouncer never sees the client."""
    engine = engines(scale_cluster.primary.url(driver), **pool_preset("direct", driver=driver))
    with engine.connect() as conn:
        assert (
            conn.execute(text("SELECT inet_server_port()")).scalar() == scale_cluster.primary.port
        )
        port = _local_port(conn)
        assert all(c["port"] != port for c in _admin(scale_cluster, "SHOW CLIENTS"))
        conn.rollback()


def _terminate_pgbouncer_servers(cluster: LocalCluster) -> int:
    """Terminate the primary's backends that PgBouncer holds for ``app``; return how many."""
    pids = [s["remote_pid"] for s in _admin(cluster, "SHOW SERVERS") if s["database"] == "app"]
    rows = cluster.primary.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
    )
    return sum(1 for (done,) in rows if done)


def _run_same_statement(engine: Engine, times: int) -> None:
    with engine.connect() as conn:
        for i in range(times):
            assert conn.execute(text("SELECT :n + 1"), {"n": i}).scalar() == i + 1
            conn.commit()


def test_psycopg3_prepared_statements_survive_transaction_pooling(
    scale_cluster: LocalCluster, engines: Callable[..., Engine]
) -> None:
    """With the preset, psycopg 3 repeats a statement across server connections without errors."""
    assert scale_cluster.pgbouncer is not None
    url = scale_cluster.pgbouncer.url("psycopg")
    # Built by ReplicaSet, so this also proves it passes the URL's driver to the preset.
    with ReplicaSet(primary=url, pool="pgbouncer-transaction") as replica_set:
        preset = replica_set.primary.engine
        _run_same_statement(preset, 10)  # > prepare_threshold's default of 5
        assert _terminate_pgbouncer_servers(scale_cluster) >= 1
        _run_same_statement(preset, 10)  # new server connections: nothing prepared there
    # The control: psycopg 3's default prepares the statement and then misses it.
    control = engines(url)
    _run_same_statement(control, 10)
    assert _terminate_pgbouncer_servers(scale_cluster) >= 1
    # psycopg reports the missing statement directly, or, when it was pipelined behind
    # BEGIN, as a confused reply to BEGIN; both are the prepared statement gone missing.
    missing = r"prepared statement \S+ does not exist|received 2 results from command 'BEGIN'"
    with pytest.raises(DBAPIError, match=missing):
        _run_same_statement(control, 10)


@pytest.mark.fault
@pytest.mark.parametrize("driver", DRIVERS)
def test_pre_ping_recovers_after_pgbouncer_restart(
    scale_cluster_factory: Callable[..., LocalCluster],
    engines: Callable[..., Engine],
    driver: str,
) -> None:
    """A pooled connection made stale by a PgBouncer restart is replaced at the next checkout."""
    cluster = scale_cluster_factory(replicas=0, pgbouncer="transaction")
    assert cluster.pgbouncer is not None
    url = cluster.pgbouncer.url(driver)
    preset = engines(url, **pool_preset("pgbouncer-transaction", driver=driver))
    control = engines(
        url, **pool_preset("pgbouncer-transaction", driver=driver, pool_pre_ping=False)
    )
    connects = {preset: 0, control: 0}
    for engine in (preset, control):

        def count(*_: object, engine: Engine = engine) -> None:
            connects[engine] += 1

        event.listen(engine, "connect", count)
        with engine.connect() as conn:  # one connection, checked back into the pool
            assert conn.execute(text("SELECT 1")).scalar() == 1
    cluster.pgbouncer.restart()
    with preset.connect() as conn:
        assert conn.execute(text("SELECT inet_server_port()")).scalar() == cluster.primary.port
    assert connects[preset] == 2  # the stale connection was replaced, not reused
    with pytest.raises(DBAPIError), control.connect() as conn:  # the control reuses it and fails
        conn.execute(text("SELECT 1"))
    assert connects[control] == 1


def _seen_on_server(cluster: LocalCluster, token: str) -> int:
    """How many other backends show ``token`` in their last query or application_name."""
    pattern = f"%{token}%"
    [(count,)] = cluster.primary.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
        # An earlier probe's backend may still be exiting, its last query this one.
        "AND query NOT LIKE '%%pg_stat_activity%%' "
        "AND (query LIKE %s OR application_name LIKE %s)",
        (pattern, pattern),
    )
    return int(count)


GUARDED_STATEMENTS = {
    "session-level SET": "SET application_name = '{token}'",
    "LISTEN": "LISTEN {token}",
    "session advisory lock": "SELECT pg_advisory_lock({key}) AS {token}",
    "CREATE TEMP object that outlives the transaction": "CREATE TEMP TABLE {token} (id int)",
    "PREPARE": "PREPARE {token} AS SELECT 1",
    "DECLARE ... WITH HOLD": "DECLARE {token} CURSOR WITH HOLD FOR SELECT 1",
}


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("construct", GUARDED_STATEMENTS)
def test_guard_refuses_each_statement_before_the_server_sees_it(
    scale_cluster: LocalCluster, construct: str, driver: str
) -> None:
    """Through real transaction-mode PgBouncer the guard raises and the server never ran the statement."""
    assert scale_cluster.pgbouncer is not None
    token = f"guard_probe_{uuid.uuid4().hex[:12]}"
    key = int(uuid.uuid4().int % 2**31)
    statement = GUARDED_STATEMENTS[construct].format(token=token, key=key)
    with ReplicaSet(
        primary=scale_cluster.pgbouncer.url(driver), pool="pgbouncer-transaction"
    ) as replica_set:
        engine = replica_set.primary.engine
        with engine.connect() as conn:
            with pytest.raises(TransactionPoolingError) as info:
                conn.exec_driver_sql(statement)
            assert info.value.construct == construct
            assert token in str(info.value) and info.value.alternative in str(info.value)
            assert _seen_on_server(scale_cluster, token) == 0
            [(locks,)] = scale_cluster.primary.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s", (key,)
            )
            assert locks == 0
            assert scale_cluster.primary.execute(
                "SELECT count(*) FROM pg_class WHERE relname = %s", (token,)
            ) == [(0,)]
            # The connection is still usable, and the probe does see what was executed.
            assert conn.execute(text(f"SELECT '{token}'")).scalar() == token
            assert _seen_on_server(scale_cluster, token) == 1
            conn.rollback()


def test_guard_covers_replica_engines(scale_cluster: LocalCluster) -> None:
    """Replica engines (read-only option engines) built from the preset are guarded too."""
    assert scale_cluster.pgbouncer is not None
    with (
        ReplicaSet(
            primary=scale_cluster.pgbouncer.url(),
            replicas=[scale_cluster.pgbouncer.url(database="replica1")],
            pool="pgbouncer-transaction",
            monitor=False,
        ) as replica_set,
        replica_set.replicas[0].engine.connect() as conn,
    ):
        assert conn.execute(text("SELECT pg_is_in_recovery()")).scalar() is True
        with pytest.raises(TransactionPoolingError, match="LISTEN"):
            conn.exec_driver_sql("LISTEN jobs")
        conn.rollback()


def test_warn_mode_runs_the_statement_and_warns(scale_cluster: LocalCluster) -> None:
    """In "warn" mode the statement runs (inside its transaction) and a warning names it."""
    assert scale_cluster.pgbouncer is not None
    token = f"guard_warn_{uuid.uuid4().hex[:12]}"
    with (
        ReplicaSet(
            primary=scale_cluster.pgbouncer.url(),
            pool="pgbouncer-transaction",
            pooling_guard="warn",
        ) as replica_set,
        replica_set.primary.engine.connect() as conn,
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            conn.exec_driver_sql(f"LISTEN {token}")
        assert [w.category for w in caught] == [TransactionPoolingWarning]
        assert token in str(caught[0].message)
        assert _seen_on_server(scale_cluster, token) == 1  # it reached the server
        # Rolled back: the LISTEN never takes effect, so the shared server connection is clean.
        conn.rollback()


@pytest.mark.parametrize("driver", DRIVERS)
def test_installed_guard_refuses_session_set_config(
    scale_cluster: LocalCluster, driver: str
) -> None:
    """The guard installed on an engine refuses set_config(..., false) before the server sees
    it, exactly as check_transaction_pooling() flags it (one pre-check, not two copies)."""
    assert scale_cluster.pgbouncer is not None
    token = f"guard_probe_{uuid.uuid4().hex[:12]}"
    statement = f"SELECT set_config('application_name', '{token}', false)"
    hazard = check_transaction_pooling(statement)
    assert hazard is not None and hazard.construct == "session-level SET"
    with (
        ReplicaSet(
            primary=scale_cluster.pgbouncer.url(driver), pool="pgbouncer-transaction"
        ) as replica_set,
        replica_set.primary.engine.connect() as conn,
    ):
        with pytest.raises(TransactionPoolingError) as info:
            conn.exec_driver_sql(statement)
        assert info.value.construct == hazard.construct
        assert _seen_on_server(scale_cluster, token) == 0
        conn.rollback()
