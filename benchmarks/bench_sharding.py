"""Sharding benchmarks: concurrent fan-out against horizontal_shard, and keys moved by resharding.

Run with::

    python3 -m pytest benchmarks/bench_sharding.py -p no:cacheprovider --benchmark-only -s

1. ``test_fanout_latency``: four shard servers with three rows each, and a
   query whose WHERE sleeps 50 ms on one row per shard (``pg_sleep(0.05)`` in
   a plpgsql function), so every shard takes 50 ms. In one run, interleaved round by round: the query
   pinned to one shard (the floor), :class:`~sqlalchemy_scale.ShardedSession`'s
   concurrent fan-out over all four, and SQLAlchemy's own ``horizontal_shard``
   ``ShardedSession`` over the same four engines (one shard after another).
   Prints the medians and the ratios fan-out / one shard (the target is < 1.3)
   and horizontal_shard / fan-out. Also prints what each returns for ``ORDER BY
   v DESC LIMIT 3`` and ``count(*)``: horizontal_shard concatenates per-shard
   results (12 rows, 4 partial counts), the fan-out merges them (3 rows, 1 count).
2. ``test_fanout_scan``: CPU-bound scans, not sleeps: 100,000 rows on each of
   the four shard servers, and the same 400,000 rows in one server. In one run,
   interleaved round by round: ``ORDER BY v DESC LIMIT 10`` and ``GROUP BY g``
   with ``count``/``sum``/``avg``, through the fan-out, through
   ``horizontal_shard`` (one shard after another, whose answers are wrong: 40
   rows, and partial groups), and on the one server. Prints the medians and the
   ratios. On 2 cores, four shard servers scanning at once share two CPUs, so
   the fan-out cannot be 4x faster than one server here; the figure says what
   the concurrency buys on this machine, honestly.
3. ``test_key_movement``: the fraction of 100,000 keys whose shard changes when
   a fifth shard is added, for each strategy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, case, create_engine, func, select, text
from sqlalchemy.ext.horizontal_shard import ShardedSession as HorizontalShardSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.sharding import (
    DirectorySharding,
    HashSharding,
    JumpHashSharding,
    RangeSharding,
    ShardSet,
    sharded_sessionmaker,
)

SLEEP = 0.05
ROUNDS = 15
ROWS = 12  # three per shard; one of them sleeps


class Base(DeclarativeBase):
    pass


class Slow(Base):
    __tablename__ = "shbench_slow"
    __shard_key__ = "k"

    k: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    v: Mapped[int]


@pytest.fixture
def engines(scale_cluster: LocalCluster) -> Iterator[dict[str, Engine]]:
    """One engine per shard primary, each holding three rows (keys i, i + 4, i + 8)."""
    engines = {f"s{i}": create_engine(node.url()) for i, node in enumerate(scale_cluster.shards)}
    for i, engine in enumerate(engines.values()):
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE OR REPLACE FUNCTION shbench_sleep(s float8) RETURNS boolean "
                    "LANGUAGE plpgsql VOLATILE AS $$ BEGIN PERFORM pg_sleep(s); RETURN true; END $$"
                )
            )
            rows = [{"k": k, "v": k} for k in range(i, ROWS, len(engines))]
            conn.execute(Slow.__table__.insert(), rows)  # type: ignore[attr-defined]
    yield engines
    for engine in engines.values():
        Base.metadata.drop_all(engine)
        with engine.begin() as conn:
            conn.execute(text("DROP FUNCTION IF EXISTS shbench_sleep(float8)"))
        engine.dispose()


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def test_fanout_latency(engines: dict[str, Engine], benchmark: Any) -> None:
    """Concurrent fan-out tracks the slowest shard; horizontal_shard pays the sum."""
    shard_ids = list(engines)
    # Key k lives on shard k % 4: a directory makes the placement explicit.
    shards = ShardSet(
        dict(engines),
        strategy=DirectorySharding({k: shard_ids[k % len(shard_ids)] for k in range(ROWS)}),
    )
    ours = sharded_sessionmaker(shards)
    theirs = HorizontalShardSession(
        shard_chooser=lambda mapper, instance, clause=None: shard_ids[0],
        identity_chooser=lambda *a, **kw: shard_ids,
        execute_chooser=lambda orm_context: shard_ids,
        shards=dict(engines),
    )
    # Rows with k < 4 (one per shard) sleep, so every shard takes SLEEP seconds.
    slow = select(Slow).where(func.shbench_sleep(case((Slow.k < 4, SLEEP), else_=0.0)))
    one_shard = slow.where(Slow.k == 0)

    def run_one() -> None:
        with ours() as session:
            assert len(session.scalars(one_shard).all()) == 1

    def run_fanout() -> None:
        with ours() as session:
            assert len(session.scalars(slow).all()) == ROWS

    def run_sequential() -> None:
        theirs.expunge_all()
        assert len(theirs.scalars(slow).all()) == ROWS
        theirs.rollback()

    timings: dict[str, list[float]] = {"one": [], "fanout": [], "sequential": []}
    runs: dict[str, Callable[[], None]] = {
        "one": run_one,
        "fanout": run_fanout,
        "sequential": run_sequential,
    }
    for fn in runs.values():  # warm up pools, compiled caches and the thread pool
        fn()
    for _ in range(ROUNDS):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    one, fanout, sequential = (_median_ms(timings[k]) for k in ("one", "fanout", "sequential"))

    with ours() as session:
        ours_top = session.scalars(select(Slow).order_by(Slow.v.desc()).limit(3)).all()
        ours_count = session.execute(select(func.count()).select_from(Slow)).all()
    theirs_top = theirs.scalars(select(Slow).order_by(Slow.v.desc()).limit(3)).all()
    theirs_count = theirs.execute(select(func.count()).select_from(Slow)).all()
    theirs.close()

    print(f"\nfan-out over 4 shards x {SLEEP * 1000:.0f} ms, median of {ROUNDS} rounds:")
    print(f"  one shard (pinned)              {one:7.1f} ms")
    print(
        f"  ShardedSession fan-out          {fanout:7.1f} ms   ratio to one shard {fanout / one:.2f}"
    )
    print(
        f"  horizontal_shard (sequential)   {sequential:7.1f} ms   "
        f"ratio to one shard {sequential / one:.2f}, to fan-out {sequential / fanout:.2f}"
    )
    print(
        f"  ORDER BY v DESC LIMIT 3: fan-out {len(ours_top)} rows {[o.v for o in ours_top]}, "
        f"horizontal_shard {len(theirs_top)} rows {[o.v for o in theirs_top]}"
    )
    print(f"  count(*): fan-out {ours_count}, horizontal_shard {theirs_count}")
    assert [o.v for o in ours_top] == [11, 10, 9] and ours_count == [(ROWS,)]

    benchmark.pedantic(run_fanout, rounds=5, iterations=1)
    shards.dispose()


SCAN_ROWS = 100_000  # per shard
SCAN_ROUNDS = 7


class Scan(Base):
    __tablename__ = "shbench_scan"
    __shard_key__ = "k"

    k: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    g: Mapped[int]
    v: Mapped[int]


def _load_scan(engine: Engine, keys: range | list[int]) -> None:
    Scan.__table__.drop(engine, checkfirst=True)  # type: ignore[attr-defined]
    Scan.__table__.create(engine)  # type: ignore[attr-defined]
    with engine.begin() as conn:
        # One INSERT ... SELECT per server: generate_series is far faster than row binds.
        conn.execute(
            text(
                "INSERT INTO shbench_scan (k, g, v) SELECT k, k % 50, (k * 7919) % 1000003 "
                "FROM unnest(CAST(:keys AS bigint[])) AS k"
            ),
            {"keys": list(keys)},
        )
        conn.execute(text("ANALYZE shbench_scan"))


def test_fanout_scan(scale_cluster: LocalCluster, benchmark: Any) -> None:
    """CPU-bound ORDER BY ... LIMIT and GROUP BY over 4 x 100k rows: fan-out against
    horizontal_shard and against one server holding every row."""
    engines = {f"s{i}": create_engine(node.url()) for i, node in enumerate(scale_cluster.shards)}
    single = create_engine(scale_cluster.primary.url())
    shard_ids = list(engines)
    total = SCAN_ROWS * len(shard_ids)
    for i, engine in enumerate(engines.values()):
        _load_scan(engine, range(i, total, len(shard_ids)))
    _load_scan(single, range(total))
    shards = ShardSet(dict(engines), strategy=HashSharding())
    ours = sharded_sessionmaker(shards)
    theirs = HorizontalShardSession(
        shard_chooser=lambda mapper, instance, clause=None: shard_ids[0],
        identity_chooser=lambda *a, **kw: shard_ids,
        execute_chooser=lambda orm_context: shard_ids,
        shards=dict(engines),
    )
    top = select(Scan.k, Scan.v).order_by(Scan.v.desc(), Scan.k).limit(10)
    groups = (
        select(Scan.g, func.count(), func.sum(Scan.v), func.avg(Scan.v))
        .group_by(Scan.g)
        .order_by(Scan.g)
    )
    try:
        with single.connect() as conn:
            expected_top = [tuple(r) for r in conn.execute(top)]
            expected_groups = [tuple(r) for r in conn.execute(groups)]
        results: dict[str, Any] = {}

        def runner(name: str, stmt: Any) -> dict[str, Callable[[], None]]:
            def one_server() -> None:
                with single.connect() as conn:
                    results[f"single {name}"] = [tuple(r) for r in conn.execute(stmt)]

            def fanout() -> None:
                with ours() as session:
                    results[f"fanout {name}"] = [tuple(r) for r in session.execute(stmt)]

            def sequential() -> None:
                results[f"horizontal_shard {name}"] = [tuple(r) for r in theirs.execute(stmt)]
                theirs.rollback()

            return {
                f"one server {name}": one_server,
                f"fan-out {name}": fanout,
                f"horizontal_shard {name}": sequential,
            }

        runs = {**runner("top", top), **runner("groups", groups)}
        timings: dict[str, list[float]] = {name: [] for name in runs}
        for fn in runs.values():  # warm caches, pools and the thread pool
            fn()
        for _ in range(SCAN_ROUNDS):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                timings[name].append(time.perf_counter() - start)
        medians = {name: _median_ms(samples) for name, samples in timings.items()}
        print(f"\nCPU-bound scans, {len(shard_ids)} shards x {SCAN_ROWS:,} rows, median of")
        print(f"{SCAN_ROUNDS} interleaved rounds (one server holds all {total:,} rows):")
        for name in ("top", "groups"):
            one = medians[f"one server {name}"]
            fan = medians[f"fan-out {name}"]
            seq = medians[f"horizontal_shard {name}"]
            print(f"  {name}: one server {one:7.1f} ms")
            print(f"  {name}: fan-out    {fan:7.1f} ms   ratio to one server {fan / one:.2f}")
            print(
                f"  {name}: horizontal_shard {seq:7.1f} ms   ratio to one server {seq / one:.2f}, "
                f"to fan-out {seq / fan:.2f}"
            )
        print(
            f"  rows returned, ORDER BY v DESC LIMIT 10: fan-out {len(results['fanout top'])}, "
            f"horizontal_shard {len(results['horizontal_shard top'])}, one server "
            f"{len(expected_top)}"
        )
        print(
            f"  groups returned, GROUP BY g: fan-out {len(results['fanout groups'])}, "
            f"horizontal_shard {len(results['horizontal_shard groups'])}, one server "
            f"{len(expected_groups)}"
        )
        assert results["fanout top"] == expected_top
        assert [r[:3] for r in results["fanout groups"]] == [r[:3] for r in expected_groups]
        benchmark.pedantic(runs["fan-out top"], rounds=3, iterations=1)
    finally:
        theirs.close()
        shards.dispose()
        for engine in [*engines.values(), single]:
            Scan.__table__.drop(engine, checkfirst=True)  # type: ignore[attr-defined]
            engine.dispose()


def _moved(strategy_before: Any, strategy_after: Any, keys: range) -> float:
    before, after = ["s0", "s1", "s2", "s3"], ["s0", "s1", "s2", "s3", "s4"]
    moved = sum(strategy_before(k, before) != strategy_after(k, after) for k in keys)
    return float(moved) / len(keys)


def test_key_movement(benchmark: Any) -> None:
    """Fraction of keys whose shard changes from 4 to 5 shards, per strategy."""
    keys = range(100_000)
    hashed = HashSharding()
    jump = JumpHashSharding()
    even4 = RangeSharding([0, 25_000, 50_000, 75_000, 100_000])
    even5 = RangeSharding([0, 20_000, 40_000, 60_000, 80_000, 100_000])
    split_last = RangeSharding([0, 25_000, 50_000, 75_000, 87_500, 100_000])
    directory = {k: f"s{k % 4}" for k in keys}
    lookup = DirectorySharding(directory)  # a new shard gets keys only by assign()/move()
    figures = {
        "HashSharding (hash mod N)": _moved(hashed, hashed, keys),
        "JumpHashSharding": _moved(jump, jump, keys),
        "RangeSharding, re-spaced evenly": _moved(even4, even5, keys),
        "RangeSharding, last range split": _moved(even4, split_last, keys),
        "DirectorySharding": _moved(lookup, lookup, keys),
    }
    print("\nkeys moved going from 4 to 5 shards (100,000 keys; ideal 1/5 = 0.20):")
    for name, fraction in figures.items():
        print(f"  {name:34s} {fraction:.3f}")
    assert figures["JumpHashSharding"] < 0.25 < figures["HashSharding (hash mod N)"]
    benchmark.pedantic(lambda: _moved(jump, jump, range(10_000)), rounds=3, iterations=1)
