"""Pooling benchmarks: the transaction-pooling guard's cost, and the connection cliff.

Run with::

    python3 -m pytest benchmarks/bench_pooling.py -p no:cacheprovider --benchmark-only -s

1. ``test_guard_overhead``: ``SELECT 1`` through the same PgBouncer on an engine
   without the guard, a second one without it (the noise floor), one with a no-op
   ``before_cursor_execute`` listener (why the guard uses dialect events instead)
   and one with the guard, one statement each in turn in one run; prints median
   wall and client-CPU time per statement and their ratios to the unguarded
   engine, plus the check's in-process cost on a short and on a long statement.
2. ``test_connection_cliff``: a server with ``max_connections = 40``; 8 worker
   processes, each with 8 threads and wanting a pool of 10, send a bounded burst
   of requests. Once straight to PostgreSQL with SQLAlchemy's default pools, once
   through PgBouncer (transaction mode) with the ``pgbouncer-transaction`` preset
   and :func:`~sqlalchemy_scale.size_pools`'s PgBouncer settings. Prints errors,
   p50/p99 latency and the peak number of server backends (sampled from
   ``pg_stat_activity``) side by side. Request counts and a hard deadline bound
   the run to well under two minutes on two cores.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.pooling import (
    check_transaction_pooling,
    guard_transaction_pooling,
    pool_preset,
    size_pools,
)

# -- 1. guard overhead -----------------------------------------------------------------------

ROUNDS = 6000  # statements per engine, interleaved one by one across the engines
SELECT_1 = text("SELECT 1")
LONG_STATEMENT = (
    "SELECT users.id, users.name, users.email, users.created_at, users.status "
    "FROM users JOIN orders ON orders.user_id = users.id "
    "WHERE users.id = %(id_1)s AND users.status IN (%(status_1_1)s, %(status_1_2)s) "
    "AND orders.created_at > %(created_at_1)s ORDER BY users.created_at DESC LIMIT %(param_1)s"
)


def _block(engine: Engine, n: int = 200) -> None:
    with engine.connect() as conn:
        for _ in range(n):
            conn.execute(SELECT_1)
        conn.rollback()


def _in_process_cost(statement: str, n: int = 200_000) -> float:
    """Nanoseconds check_transaction_pooling adds to a statement, minus a no-op call."""

    def noop(statement: str) -> None:
        return None

    def timed(fn: Callable[[str], object]) -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn(statement)
        return time.perf_counter() - start

    return (timed(check_transaction_pooling) - timed(noop)) / n * 1e9


def _dispatch_cost(engine: Engine, n: int = 200_000) -> float:
    """Nanoseconds per statement of the loop SQLAlchemy runs over ``engine``'s do_execute
    listeners (as in ``Connection._exec_single_context``), on SELECT 1."""
    dialect = engine.dialect
    start = time.perf_counter()
    for _ in range(n):
        for fn in () if not dialect._has_events else dialect.dispatch.do_execute:
            if fn(None, "SELECT 1", {}, None):
                break
    return (time.perf_counter() - start) / n * 1e9


def test_guard_overhead(benchmark: Any, scale_cluster_factory: Callable[..., LocalCluster]) -> None:
    """The guard adds nothing measurable to a SELECT 1 round trip through PgBouncer."""
    cluster = scale_cluster_factory(replicas=0, pgbouncer="transaction")
    assert cluster.pgbouncer is not None
    url = cluster.pgbouncer.url("psycopg2")
    options = pool_preset("pgbouncer-transaction", driver="psycopg2")
    plain = create_engine(url, **options)
    # A second unguarded engine: the A/A ratio is the noise floor of this measurement.
    plain_again = create_engine(url, **options)
    # What the obvious hook would cost: any before_cursor_execute listener, even a no-op,
    # moves every statement onto SQLAlchemy's engine-event path.
    engine_event = create_engine(url, **options)
    event.listen(engine_event, "before_cursor_execute", lambda *args: None)
    guarded = create_engine(url, **options)
    guard_transaction_pooling(guarded, "raise")
    engines = {
        "unguarded": plain,
        "unguarded (A/A)": plain_again,
        "no-op before_cursor_execute": engine_event,
        "guarded": guarded,
    }
    names = list(engines)
    connections = {name: engine.connect() for name, engine in engines.items()}
    wall: dict[str, list[int]] = {name: [] for name in names}
    cpu: dict[str, list[int]] = {name: [] for name in names}
    try:
        for conn in connections.values():
            for _ in range(200):  # warm up: compile cache, server connection
                conn.execute(SELECT_1)
        # One statement per engine in turn, rotating the order, so drift and position
        # effects fall on every engine alike. Each connection stays in one transaction,
        # so PgBouncer keeps its server connection: only the client side differs.
        for round_ in range(ROUNDS):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                conn = connections[name]
                start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
                conn.execute(SELECT_1)
                cpu[name].append(time.thread_time_ns() - start_cpu)
                wall[name].append(time.perf_counter_ns() - start)
    finally:
        for conn in connections.values():
            conn.rollback()
            conn.close()
    try:
        median = {name: statistics.median(wall[name]) / 1e3 for name in names}
        median_cpu = {name: statistics.median(cpu[name]) / 1e3 for name in names}
        ratio = {name: median[name] / median["unguarded"] for name in names}
        cpu_ratio = {name: median_cpu[name] / median_cpu["unguarded"] for name in names}
        short_ns = _in_process_cost("SELECT 1")
        long_ns = _in_process_cost(LONG_STATEMENT)
        dispatch_ns = _dispatch_cost(guarded) - _dispatch_cost(plain)
        benchmark.extra_info.update(
            {
                "unguarded_us": round(median["unguarded"], 1),
                "guarded_us": round(median["guarded"], 1),
                "guarded_over_unguarded": round(ratio["guarded"], 3),
                "aa_ratio": round(ratio["unguarded (A/A)"], 3),
                "before_cursor_execute_noop_over_unguarded": round(
                    ratio["no-op before_cursor_execute"], 3
                ),
                "client_cpu_guarded_over_unguarded": round(cpu_ratio["guarded"], 3),
                "client_cpu_aa_ratio": round(cpu_ratio["unguarded (A/A)"], 3),
                "check_ns_select_1": round(short_ns),
                "check_ns_long_statement": round(long_ns),
                "dispatch_and_check_ns": round(dispatch_ns),
            }
        )
        print()
        print(
            f"guard overhead: SELECT 1 through PgBouncer (transaction mode), median of "
            f"{ROUNDS} statements per engine, interleaved"
        )
        print(f"  {'engine':<29}{'wall us':>9}{'ratio':>8}{'client CPU us':>15}{'ratio':>8}")
        for name in names:
            print(
                f"  {name:<29}{median[name]:>9.1f}{ratio[name]:>8.3f}"
                f"{median_cpu[name]:>15.1f}{cpu_ratio[name]:>8.3f}"
            )
        print(
            f"  check_transaction_pooling in-process: {short_ns:.0f} ns (SELECT 1), "
            f"{long_ns:.0f} ns ({len(LONG_STATEMENT)}-character SELECT); with SQLAlchemy's "
            f"listener dispatch: {dispatch_ns:.0f} ns per statement"
        )
        benchmark.pedantic(_block, args=(guarded,), rounds=5, iterations=1)
    finally:
        for engine in engines.values():
            engine.dispose()


# -- 2. the connection cliff -----------------------------------------------------------------

MAX_CONNECTIONS = 40
WORKERS = 8
THREADS = 8
WANTED_POOL = 10
REQUESTS_PER_THREAD = 25  # 8 x 8 x 25 = 1600 requests per scenario
QUERY = "SELECT pg_sleep(0.002)"  # a request that holds a server connection for ~2 ms
DEADLINE = 30.0  # seconds a scenario may run before its threads stop sending
BACKENDS = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


def _worker(
    url: str,
    engine_kwargs: dict[str, Any],
    barrier: Any,
    results: Any,
) -> None:
    """One application process: THREADS threads sharing one engine, each sending requests."""
    engine = create_engine(url, **engine_kwargs)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def thread() -> None:
        query = text(QUERY)
        mine: list[float] = []
        failed: list[str] = []
        deadline = time.monotonic() + DEADLINE
        for _ in range(REQUESTS_PER_THREAD):
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            try:
                with engine.connect() as conn:
                    conn.execute(query)
                    conn.commit()
            except Exception as exc:
                failed.append(str(exc).strip().splitlines()[0][:120])
            else:
                mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)
            errors.extend(failed)

    barrier.wait(timeout=60)  # every process built its engine; the burst starts together
    threads = [threading.Thread(target=thread) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DEADLINE + 15)
    results.put((latencies, errors))
    engine.dispose()


class _Sampler:
    """Samples the number of client backends on the server every few milliseconds."""

    def __init__(self, cluster: LocalCluster) -> None:
        self._conn = psycopg2.connect(
            host="127.0.0.1",
            port=cluster.primary.port,
            dbname=cluster.database,
            user=cluster.user,
            password=cluster.password,
        )
        self._conn.autocommit = True
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def backends(self) -> int:
        with self._conn.cursor() as cur:
            cur.execute(BACKENDS)
            return int(cur.fetchone()[0])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.backends())
            self._stop.wait(0.005)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()


def _scenario(cluster: LocalCluster, url: str, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run the burst once; return counts, latency percentiles and the peak backends."""
    ctx = multiprocessing.get_context("fork")  # workers share this module without re-import
    barrier = ctx.Barrier(WORKERS + 1)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(url, engine_kwargs, barrier, results))
        for _ in range(WORKERS)
    ]
    for w in workers:
        w.start()
    with _Sampler(cluster) as sampler:  # connected after fork: the workers do not share it
        start = time.perf_counter()
        barrier.wait(timeout=60)
        outcomes = [results.get(timeout=DEADLINE + 30) for _ in workers]
        wall = time.perf_counter() - start
    for w in workers:
        w.join(timeout=10)
        if w.is_alive():
            w.terminate()
    latencies = sorted(lat for lats, _ in outcomes for lat in lats)
    errors = [err for _, errs in outcomes for err in errs]
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": WORKERS * THREADS * REQUESTS_PER_THREAD,
        "ok": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "p50_ms": quantiles[49] * 1e3,
        "p99_ms": quantiles[98] * 1e3,
        "peak_backends": sampler.peak,
        "wall_s": wall,
    }


def _wait_for_backends_to_exit(cluster: LocalCluster, most: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        [(count,)] = cluster.primary.execute(BACKENDS)
        if count <= most:
            return
        time.sleep(0.05)


def test_connection_cliff(
    benchmark: Any, scale_cluster_factory: Callable[..., LocalCluster]
) -> None:
    """Direct connections fail past max_connections; PgBouncer with the preset does not."""
    sizing = size_pools(
        app_processes=WORKERS,
        threads_per_process=WANTED_POOL,
        server_cores=os.cpu_count() or 2,
        max_connections=MAX_CONNECTIONS,
    )
    cluster = scale_cluster_factory(
        replicas=0,
        pgbouncer="transaction",
        settings={"max_connections": MAX_CONNECTIONS},
        pgbouncer_settings=sizing.pgbouncer_settings(),
    )
    assert cluster.pgbouncer is not None
    bouncer_url = cluster.pgbouncer.url("psycopg2")
    direct_url = cluster.primary.url("psycopg2")
    preset = pool_preset("pgbouncer-transaction", driver="psycopg2", **sizing.engine_overrides())

    def both() -> dict[str, dict[str, Any]]:
        idle = int(cluster.primary.execute(BACKENDS)[0][0])
        direct = _scenario(cluster, direct_url, {})  # SQLAlchemy's defaults: 5 + 10 overflow
        _wait_for_backends_to_exit(cluster, idle)
        pooled = _scenario(cluster, bouncer_url, preset)
        return {"direct": direct, "pgbouncer": pooled}

    outcome = benchmark.pedantic(both, rounds=1, iterations=1)
    direct, pooled = outcome["direct"], outcome["pgbouncer"]
    benchmark.extra_info.update({f"direct_{k}": v for k, v in direct.items()})
    benchmark.extra_info.update({f"pgbouncer_{k}": v for k, v in pooled.items()})

    print()
    print(sizing.explain())
    print()
    print(
        f"connection cliff: max_connections={MAX_CONNECTIONS}, {WORKERS} processes x "
        f"{THREADS} threads, pool of {WANTED_POOL} wanted each, "
        f"{REQUESTS_PER_THREAD} requests per thread ({QUERY})"
    )
    header = ("", "direct (default pools)", "PgBouncer (pgbouncer-transaction)")
    rows = [
        ("requests", direct["requests"], pooled["requests"]),
        ("succeeded", direct["ok"], pooled["ok"]),
        ("connection errors", direct["errors"], pooled["errors"]),
        ("p50 latency (ms)", f"{direct['p50_ms']:.1f}", f"{pooled['p50_ms']:.1f}"),
        ("p99 latency (ms)", f"{direct['p99_ms']:.1f}", f"{pooled['p99_ms']:.1f}"),
        ("peak server backends", direct["peak_backends"], pooled["peak_backends"]),
        (
            "server pool limit",
            f"max_connections={MAX_CONNECTIONS}",
            f"default_pool_size={sizing.pgbouncer_default_pool_size}",
        ),
        ("wall time (s)", f"{direct['wall_s']:.1f}", f"{pooled['wall_s']:.1f}"),
    ]
    for row in (header, *rows):
        print(f"  {row[0]!s:<22}{row[1]!s:>24}{row[2]!s:>36}")
    if direct["first_error"]:
        print(f"  first direct error: {direct['first_error']}")

    # The claims, not timings: PgBouncer with the preset loses no request and never opens
    # more server backends than its pool.
    assert pooled["errors"] == 0, pooled["first_error"]
    assert pooled["ok"] == pooled["requests"]
    assert pooled["peak_backends"] <= sizing.pgbouncer_default_pool_size
