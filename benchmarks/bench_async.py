"""Asyncio benchmarks, each against its baseline in the same run.

Run with::

    python3 -m pytest benchmarks/bench_async.py -p no:cacheprovider --benchmark-only -s

1. ``test_pk_get_routed_vs_plain``: ``await session.get(Account, pk)`` through
   :class:`~sqlalchemy_scale.AsyncRoutingSession` (served by a replica) against a plain
   ``AsyncSession`` bound to the same replica server, on asyncpg and psycopg 3 async;
   both timed in each of 2,000 rounds (order alternating), the median of the per-round
   ratios reported (target <= 1.05).
2. ``test_fanout_async_and_sync``: four shards, one row each, a query sleeping 100 ms
   per shard (``pg_sleep(0.1)``): one shard pinned vs the fan-out over four, async
   (tasks on the event loop) and sync (worker threads), interleaved round by round
   (target: fan-out / one shard < 1.3 for both).
3. ``test_read_your_writes_costs``: one write transaction (INSERT + COMMIT through a
   routing session) in each ``read_your_writes`` mode, interleaved; and, under a write
   load (one writer thread committing continuously), the share of reads a routing
   session sends to replicas in ``"session"`` vs ``"process"`` mode.

Machines here are noisy: compare the ratios printed at the end, measured in one run.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import String, func, literal_column, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_scale as ss
from sqlalchemy_scale.local import LocalCluster

LINES: list[str] = []


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "abench_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Slow(Base):
    __tablename__ = "abench_slow"
    __shard_key__ = "k"

    k: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


@pytest.fixture(scope="module")
def cluster(seeded: Any) -> Iterator[LocalCluster]:
    with seeded(
        [Account.__table__], [Account(id=i, name=f"a{i}") for i in range(1, 1001)]
    ) as cluster:
        yield cluster


async def interleaved(
    candidate: Callable[[], Awaitable[None]],
    baseline: Callable[[], Awaitable[None]],
    *,
    rounds: int,
) -> tuple[float, float, float]:
    """The median over ``rounds`` of ``candidate``'s time / ``baseline``'s time in the same
    round, and each one's median time.

    Each round times both, the order alternating from round to round so that neither always
    runs first; pairing within a round cancels load that drifts over seconds on a shared
    machine, which medians taken over the whole loop do not.
    """
    for _ in range(20):
        await candidate()
        await baseline()
    a: list[float] = []
    b: list[float] = []
    for r in range(rounds):
        first, second = (candidate, baseline) if r % 2 == 0 else (baseline, candidate)
        t0 = time.perf_counter()
        await first()
        t1 = time.perf_counter()
        await second()
        t2 = time.perf_counter()
        (a if r % 2 == 0 else b).append(t1 - t0)
        (b if r % 2 == 0 else a).append(t2 - t1)
    ratio = statistics.median(x / y for x, y in zip(a, b, strict=True))
    return ratio, statistics.median(a), statistics.median(b)


#: Interleaved rounds of the PK-get comparison (each round times both once).
ROUNDS_PK = 2000


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg_async"])
def test_pk_get_routed_vs_plain(benchmark: Any, cluster: LocalCluster, driver: str) -> None:
    """A PK get through AsyncRoutingSession (to the replica) vs a plain AsyncSession there."""

    async def main() -> tuple[float, float, float]:
        # One replica, so the routed and the plain session talk to the very same server.
        async with ss.ReplicaSet(
            primary=cluster.primary.url(driver), replicas=[cluster.replicas[0].url(driver)]
        ) as replica_set:
            engine = create_async_engine(cluster.replicas[0].url(driver))
            keys = iter(range(10**9))

            def lookup(factory: Any) -> Callable[[], Awaitable[None]]:
                async def run() -> None:
                    async with factory() as session:
                        assert await session.get(Account, next(keys) % 1000 + 1) is not None

                return run

            result = await interleaved(
                lookup(ss.async_routing_sessionmaker(replica_set)),
                lookup(async_sessionmaker(engine)),
                rounds=ROUNDS_PK,
            )
            await engine.dispose()
            return result

    ratio, a, b = asyncio.run(main())
    LINES.append(
        f"  async PK get, routed / plain AsyncSession ({driver}): {ratio:.3f} median of "
        f"{ROUNDS_PK} per-round ratios ({a * 1e6:.0f} us vs {b * 1e6:.0f} us; target <= 1.05)"
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


SLEEP = 0.1
ROUNDS = 10


def test_fanout_async_and_sync(benchmark: Any, cluster: LocalCluster) -> None:
    """4 shards x 100 ms: the async and the sync fan-out each against one shard pinned."""
    for index, shard in enumerate(cluster.shards):
        shard.execute(
            "DROP TABLE IF EXISTS abench_slow; CREATE TABLE abench_slow (k int PRIMARY KEY); "
            f"INSERT INTO abench_slow VALUES ({index})"
        )
    slow = select(Slow.k, func.pg_sleep(literal_column(str(SLEEP))))
    pinned = slow.execution_options(shard_id="s0")
    timings: dict[str, list[float]] = {
        n: [] for n in ("async one", "async 4", "sync one", "sync 4")
    }

    def strategy(value: Any, shard_ids: Any) -> str:
        return f"s{int(value) % 4}"

    def shard_set(driver: str) -> ss.ShardSet:
        urls = {f"s{i}": shard.url(driver) for i, shard in enumerate(cluster.shards)}
        return ss.ShardSet(urls, strategy=strategy)

    sync_shards = shard_set("psycopg2")
    SyncSession = ss.sharded_sessionmaker(sync_shards)

    def run_sync(statement: Any, rows: int) -> float:
        start = time.perf_counter()
        with SyncSession() as session:
            assert len(session.execute(statement).all()) == rows
        return time.perf_counter() - start

    async def main() -> None:
        async_shards = shard_set("asyncpg")
        AsyncShardSession = ss.async_sharded_sessionmaker(async_shards)

        async def run_async(statement: Any, rows: int) -> float:
            start = time.perf_counter()
            async with AsyncShardSession() as session:
                assert len((await session.execute(statement)).all()) == rows
            return time.perf_counter() - start

        try:
            for _ in range(2):  # warm pools and caches
                await run_async(pinned, 1)
                await run_async(slow, 4)
                run_sync(pinned, 1)
                run_sync(slow, 4)
            for _ in range(ROUNDS):
                timings["async one"].append(await run_async(pinned, 1))
                timings["async 4"].append(await run_async(slow, 4))
                timings["sync one"].append(run_sync(pinned, 1))
                timings["sync 4"].append(run_sync(slow, 4))
        finally:
            await async_shards.adispose()

    try:
        asyncio.run(main())
    finally:
        sync_shards.dispose()
        for shard in cluster.shards:
            shard.execute("DROP TABLE IF EXISTS abench_slow")
    med = {name: statistics.median(samples) * 1000 for name, samples in timings.items()}
    LINES.append(
        f"  fan-out 4 shards x {SLEEP * 1000:.0f} ms, median of {ROUNDS} interleaved rounds "
        "(target < 1.3 x one shard):"
    )
    for kind in ("async", "sync"):
        one, four = med[f"{kind} one"], med[f"{kind} 4"]
        LINES.append(
            f"    {kind:5s}: one shard {one:6.1f} ms, four shards {four:6.1f} ms, "
            f"ratio {four / one:.2f}"
        )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_read_your_writes_costs(benchmark: Any, cluster: LocalCluster) -> None:
    """Per write transaction, each mode's cost; under write load, where reads go."""
    cluster.primary.execute("DROP TABLE IF EXISTS abench_log; CREATE TABLE abench_log (n int)")
    for replica in cluster.replicas:
        replica.wait_for_replay()
    sets = {
        mode: ss.ReplicaSet(
            primary=cluster.primary.url(),
            replicas=[r.url() for r in cluster.replicas],
            read_your_writes=mode,
        )
        for mode in ("off", "session", "process")
    }
    try:
        makers = {mode: ss.routing_sessionmaker(s) for mode, s in sets.items()}

        def write(mode: str) -> float:
            start = time.perf_counter()
            with makers[mode]() as session:
                session.execute(text("INSERT INTO abench_log VALUES (1)"))
                session.commit()
            return time.perf_counter() - start

        for mode in makers:
            write(mode)
        samples: dict[str, list[float]] = {mode: [] for mode in makers}
        for _ in range(300):
            for mode in makers:
                samples[mode].append(write(mode))
        med = {mode: statistics.median(v) * 1e6 for mode, v in samples.items()}
        LINES.append(
            "  one write transaction (INSERT + COMMIT), median of 300 interleaved: "
            + ", ".join(f"{mode} {med[mode]:.0f} us" for mode in makers)
            + f" (session / off {med['session'] / med['off']:.2f}, "
            f"process / off {med['process'] / med['off']:.2f})"
        )

        # Under write load: a writer commits through the primary engine continuously while
        # this thread reads through a routing session; count where the reads land.
        for mode in ("session", "process"):
            replica_set = sets[mode]
            stop = threading.Event()

            def writer(
                replica_set: ss.ReplicaSet = replica_set, stop: threading.Event = stop
            ) -> None:
                for _ in range(100_000):  # bounded; stopped long before
                    if stop.is_set():
                        return
                    with Session(replica_set.primary.engine) as session:
                        session.execute(text("INSERT INTO abench_log VALUES (2)"))
                        session.commit()

            thread = threading.Thread(target=writer)
            thread.start()
            replica_reads = 0
            reads = 300
            took: list[float] = []
            try:
                for _ in range(reads):
                    start = time.perf_counter()
                    with makers[mode]() as session:
                        in_recovery = session.execute(select(func.pg_is_in_recovery())).scalar()
                        replica_reads += bool(in_recovery)
                    took.append(time.perf_counter() - start)
            finally:
                stop.set()
                thread.join()
            took.sort()
            LINES.append(
                f"  under a continuous writer, {mode!r} mode: reads served by replicas "
                f"{replica_reads}/{reads}, read median {statistics.median(took) * 1e6:.0f} us, "
                f"p95 {took[int(0.95 * len(took))] * 1e6:.0f} us"
            )
    finally:
        for replica_set in sets.values():
            replica_set.dispose()
        cluster.primary.execute("DROP TABLE IF EXISTS abench_log")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: print what was measured in this run."""
    yield
    lines = ["", "async benchmarks (this run):", *LINES]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n".join(lines))
    else:
        print("\n".join(lines))
