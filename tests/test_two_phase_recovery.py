"""Two-phase commit across shards survives the application and a shard dying at each step.

The committing application runs in its own process (``tests/twophase_app.py``): it
moves 10 units on each of three shards in one transaction, and a test hook holds it at
a named protocol step, where the test kills it with SIGKILL. Then recovery runs and
each shard is asked: every shard's rows are all from the transaction or none of them
are (all-or-nothing, the same on every shard), ``pg_prepared_xacts`` is empty and the
rows are no longer locked (``FOR UPDATE NOWAIT`` succeeds). A shard stopped during
phase two uses a separate cluster, so the shared topology is never damaged.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import twophase_app as app
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

import sqlalchemy_scale as ss
from sqlalchemy_scale import cli
from sqlalchemy_scale.local import LocalCluster, PgNode
from sqlalchemy_scale.sharding import _two_phase
from sqlalchemy_scale.testing import wait_until

APP = Path(__file__).with_name("twophase_app.py")
SHARD_IDS = ["s0", "s1", "s2"]
NOTHING_PREPARED: dict[str, list[str]] = {s: [] for s in SHARD_IDS}


@contextmanager
def at_step(hook: Callable[[str], None]) -> Iterator[None]:
    """Within the block, the two-phase protocol of this process calls ``hook(step)`` at each
    named step of its commits (``prepared:s0``, ``prepared``, ``decided``, ``committed:s0``...)."""
    _two_phase._step_hook = hook
    try:
        yield
    finally:
        _two_phase._step_hook = None


def stop_at(step: str, node: PgNode) -> Callable[[str], None]:
    """A step hook that stops ``node`` (immediate shutdown) when the protocol reaches ``step``."""

    def hook(reached: str) -> None:
        if reached == step:
            node.stop("immediate")

    return hook


def recover_at(step: str, shards: ss.ShardSet, reports: list[Any]) -> Callable[[str], None]:
    """A step hook that runs recovery (``older_than=0``) when the protocol reaches ``step``."""

    def hook(reached: str) -> None:
        if reached == step:
            reports.append(shards.recover_prepared(older_than=0))

    return hook


def _urls(cluster: LocalCluster, driver: str) -> dict[str, str]:
    return {s: cluster.shards[i].url(driver) for i, s in enumerate(SHARD_IDS)}


def _admin(urls: dict[str, str]) -> dict[str, Engine]:
    # NullPool: a stopped and restarted shard leaves no dead pooled connection behind.
    return {
        s: create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        for s, url in urls.items()
    }


def _reset(engines: dict[str, Engine]) -> None:
    """Fresh accounts on every shard (account 1 with 100), no prepared transactions, no records."""
    for shard_id, engine in engines.items():
        with engine.connect() as conn:
            gids = conn.scalars(
                text("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
            ).all()
            for gid in gids:
                conn.execute(text(f"ROLLBACK PREPARED '{gid}'"))
            conn.execute(text(f"DROP TABLE IF EXISTS {_two_phase.DECISION_TABLE}"))
        app.Base.metadata.drop_all(engine)
        app.Base.metadata.create_all(engine)
        with engine.connect() as conn:
            k = SHARD_IDS.index(shard_id)
            conn.execute(text(f"INSERT INTO tpc_accounts VALUES ({k}, 1, 100)"))


def _state(engines: dict[str, Engine]) -> dict[str, str]:
    """Per shard: 'committed' (both rows changed), 'untouched' (neither), or what it found."""
    states = {}
    for shard_id, engine in engines.items():
        with engine.connect() as conn:
            rows = sorted(conn.execute(text("SELECT id, balance FROM tpc_accounts")).all())
        if rows == [(1, 90), (2, 10)]:
            states[shard_id] = "committed"
        elif rows == [(1, 100)]:
            states[shard_id] = "untouched"
        else:
            states[shard_id] = f"half: {rows}"
    return states


def _prepared(engines: dict[str, Engine]) -> dict[str, list[str]]:
    found = {}
    for shard_id, engine in engines.items():
        with engine.connect() as conn:
            found[shard_id] = list(conn.scalars(text("SELECT gid FROM pg_prepared_xacts")))
    return found


def _unlocked(engines: dict[str, Engine]) -> bool:
    """True when no shard's account rows are locked (FOR UPDATE NOWAIT gets them at once)."""
    for engine in engines.values():
        with engine.connect() as conn:
            try:
                conn.execute(text("SELECT * FROM tpc_accounts FOR UPDATE NOWAIT")).all()
            except OperationalError:
                return False
    return True


def _run_app_until(tmp_path: Path, urls: dict[str, str], step: str) -> None:
    """Start the application, wait until it holds at ``step``, and SIGKILL it."""
    marker = tmp_path / "reached"
    config = tmp_path / "app.json"
    config.write_text(json.dumps({"urls": urls, "kill_at": step, "marker": str(marker)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(APP), str(config)], env=env)
    try:
        reached = wait_until(lambda: marker.exists() or proc.poll() is not None, timeout=60)
        assert reached and marker.exists(), f"the application exited ({proc.poll()}) before {step}"
        assert marker.read_text() == step
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def shared(scale_cluster: LocalCluster, driver: str) -> Iterator[dict[str, str]]:
    """Three of the shared cluster's shards, with fresh accounts; cleaned up afterwards
    (prepared transactions would block other tests' DDL)."""
    urls = _urls(scale_cluster, driver)
    engines = _admin(urls)
    _reset(engines)
    yield urls
    _reset(engines)
    for engine in engines.values():
        app.Base.metadata.drop_all(engine)
        with engine.connect() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {_two_phase.DECISION_TABLE}"))
        engine.dispose()


@pytest.mark.fault
@pytest.mark.parametrize(
    ("step", "outcome"),
    [
        ("prepared:s0", "untouched"),  # after some PREPAREs
        ("prepared", "untouched"),  # after every PREPARE, before the decision
        ("decided", "committed"),  # after the decision, before any COMMIT PREPARED
        ("committed:s0", "committed"),  # after some COMMIT PREPARED
    ],
)
def test_recovery_after_the_application_is_killed(
    shared: dict[str, str], tmp_path: Path, step: str, outcome: str
) -> None:
    """Killed at each step of the protocol, the transaction is, after recovery, committed on
    every shard or on none (by the recorded decision), with nothing prepared or locked."""
    engines = _admin(shared)
    _run_app_until(tmp_path, shared, step)
    orphans = _prepared(engines)
    assert any(orphans.values()), f"killed at {step}, nothing was left prepared: {orphans}"
    parsed = [_two_phase.parse_gid(g) for gids in orphans.values() for g in gids]
    assert None not in parsed, f"every gid names its transaction: {orphans}"
    txids = {p[0] for p in parsed if p is not None}
    assert len(txids) == 1, f"the parts of one transaction share one txid: {orphans}"
    assert not _unlocked(engines), "an orphaned prepared transaction holds its row locks"
    with app.shard_set(shared) as shards:
        young = shards.recover_prepared(older_than=3600)
        assert young.actions == [] and len(young.skipped) == sum(map(len, orphans.values()))
        assert shards.prepared_transactions(older_than=0) != []
        report = shards.recover_prepared(older_than=0)
    assert report.is_complete, str(report)
    assert {a.decision for a in report.actions} == {"commit" if outcome == "committed" else "abort"}
    assert _state(engines) == dict.fromkeys(SHARD_IDS, outcome)
    assert _prepared(engines) == NOTHING_PREPARED
    # (the killed client's unprepared parts end when their backends notice it is gone)
    assert wait_until(lambda: _unlocked(engines), timeout=30)
    with engines["s0"].connect() as conn:  # decision records are kept only while needed
        decisions = dict(
            conn.execute(text(f"SELECT txid, decision FROM {_two_phase.DECISION_TABLE}")).all()
        )
    assert decisions == ({} if outcome == "committed" else {txids.pop(): "abort"})


@pytest.mark.fault
def test_the_cli_recovers_and_reports(
    shared: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sqlalchemy-scale recover --config` lists orphans with --dry-run, then finishes them."""
    engines = _admin(shared)
    _run_app_until(tmp_path, shared, "decided")
    config = tmp_path / "topology.toml"
    lines = ["[sharding]", 'strategy = "hash"', "[sharding.shards]"]
    lines += [f'{s} = "{url}"' for s, url in shared.items()]
    config.write_text("\n".join(lines) + "\n")
    base = ["recover", "--config", str(config), "--section", "sharding", "--older-than", "0"]
    assert cli.main([*base, "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert listed.count("ss2pc:") >= 3 and "older than 0 s: 3 on s0, s1, s2" in listed
    assert _state(engines) == dict.fromkeys(SHARD_IDS, "untouched")  # a dry run changes nothing
    assert cli.main(base) == 0
    out = capsys.readouterr().out
    assert out.count("decision commit, committed") == 3, out
    assert "older than 0 s: none" in out
    password = make_url(shared["s0"]).password
    assert password and password not in listed + out
    assert _state(engines) == dict.fromkeys(SHARD_IDS, "committed")


@pytest.mark.parametrize(
    ("step", "raises", "finished", "outcome"),
    [
        # between PREPARE and the decision: recovery records 'abort' first, so the committer
        # rolls back and raises
        (
            "prepared",
            pytest.raises(ss.CrossShardWriteError, match="was rolled back: 'abort' was recorded"),
            "rolled back",
            "untouched",
        ),
        # after 'commit' was recorded: recovery commits every part, and the committer, finding
        # them already committed, returns normally
        ("decided", contextlib.nullcontext(), "committed", "committed"),
    ],
    ids=["before-the-decision", "after-the-decision"],
)
def test_recovery_racing_the_committer_finishes_by_the_recorded_decision(
    shared: dict[str, str],
    step: str,
    raises: contextlib.AbstractContextManager[Any],
    finished: str,
    outcome: str,
) -> None:
    """Recovery running while the committer is at ``step`` finishes every part by the decision
    recorded first, the committer agrees with it (raising after 'abort', returning after
    'commit'), and every shard ends with that outcome and nothing prepared."""
    engines = _admin(shared)
    reports: list[Any] = []
    with app.shard_set(shared) as shards, at_step(recover_at(step, shards, reports)), raises:
        app.transfer(shards)
    assert [a.outcome for a in reports[0].actions] == [finished] * 3
    assert _state(engines) == dict.fromkeys(SHARD_IDS, outcome)
    assert _prepared(engines) == NOTHING_PREPARED


@pytest.mark.fault
def test_concurrent_recoveries_finish_each_part_once(
    shared: dict[str, str], tmp_path: Path
) -> None:
    """Two recoveries started at once on the same orphans agree: each part is finished by one
    of them by the recorded decision, and the other reports it already finished."""
    engines = _admin(shared)
    _run_app_until(tmp_path, shared, "prepared")
    barrier = threading.Barrier(2, timeout=30)
    reports: list[Any] = []

    def recover() -> None:
        with app.shard_set(shared) as shards:
            barrier.wait()
            reports.append(shards.recover_prepared(older_than=0))

    threads = [threading.Thread(target=recover) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(reports) == 2 and all(r.is_complete for r in reports)
    outcomes: dict[str, list[str]] = {}
    for report in reports:
        for action in report.actions:
            assert action.decision == "abort"
            outcomes.setdefault(action.shard_id, []).append(action.outcome)
    for shard_id in SHARD_IDS:  # finished exactly once, whichever recovery got there first
        assert outcomes.get(shard_id, []).count("rolled back") == 1, outcomes
    assert _state(engines) == dict.fromkeys(SHARD_IDS, "untouched")
    assert _prepared(engines) == NOTHING_PREPARED


def test_a_commit_records_its_decision_then_forgets_it(shared: dict[str, str]) -> None:
    """A cross-shard commit prepares every shard under one txid and records 'commit' before
    the first COMMIT PREPARED; the record is deleted by the process's next decision, and
    the last one by recovery."""
    engines = _admin(shared)
    seen: list[dict[str, Any]] = []

    def records() -> list[tuple[Any, ...]]:
        with engines["s0"].connect() as conn:
            query = f"SELECT txid, decision, shards FROM {_two_phase.DECISION_TABLE}"
            return [tuple(r) for r in conn.execute(text(query))]

    with app.shard_set(shared) as shards:

        def observe(step: str) -> None:
            if step == "decided":
                seen.append({"prepared": _prepared(engines), "records": records()})

        with at_step(observe):
            app.transfer(shards)
            for engine in engines.values():  # reset the accounts for a second transfer
                with engine.connect() as conn:
                    conn.execute(text("UPDATE tpc_accounts SET balance = 100"))
                    conn.execute(text("DELETE FROM tpc_accounts WHERE id = 2"))
            app.transfer(shards)
        txids = []
        for observed in seen:
            gids = [g for s in SHARD_IDS for g in observed["prepared"][s]]
            txid = gids[0].split(":")[1]
            assert gids == [f"ss2pc:{txid}:{s}" for s in SHARD_IDS]
            txids.append(txid)
        assert seen[0]["records"] == [(txids[0], "commit", SHARD_IDS)]
        assert seen[1]["records"] == [(txids[1], "commit", SHARD_IDS)]  # the first one forgotten
        assert records() == [(txids[1], "commit", SHARD_IDS)]
        report = shards.recover_prepared(older_than=0)
        assert report.actions == [] and report.forgotten == 1
    assert records() == []
    assert _state(engines) == dict.fromkeys(SHARD_IDS, "committed")


@pytest.fixture
def own_cluster(
    scale_cluster_factory: Callable[..., LocalCluster], driver: str
) -> Iterator[tuple[LocalCluster, dict[str, str]]]:
    """A separate cluster of three shard servers, for tests that stop one."""
    cluster = scale_cluster_factory(replicas=0, shards=3, pgbouncer=False)
    urls = _urls(cluster, driver)
    engines = _admin(urls)
    _reset(engines)
    yield cluster, urls
    for node in cluster.shards:
        if not node.is_running():
            node.start()
    _reset(engines)  # prepared transactions would make the cluster's shutdown wait
    for engine in engines.values():
        engine.dispose()


@pytest.mark.fault
def test_a_shard_stopped_in_phase_two_is_committed_by_recovery_when_it_returns(
    own_cluster: tuple[LocalCluster, dict[str, str]],
) -> None:
    """A shard stopped after the first COMMIT PREPARED makes commit() raise CommitOutcomeUnknown
    naming it; recovery finishes the others, reports it unreachable, and commits it once it is
    back, so every shard ends committed with nothing prepared or locked."""
    cluster, urls = own_cluster
    engines = _admin(urls)
    stopped = cluster.shards[2]
    with app.shard_set(urls) as shards:
        with (
            at_step(stop_at("committed:s0", stopped)),
            pytest.raises(ss.CommitOutcomeUnknown) as info,
        ):
            app.transfer(shards)
        assert info.value.node == "s2" and "ss2pc:" in str(info.value)
        report = shards.recover_prepared(older_than=0)
        assert not report.is_complete and set(report.unreachable) == {"s2"}
        up = {s: e for s, e in engines.items() if s != "s2"}
        assert _state(up) == dict.fromkeys(up, "committed")
        stopped.start()
        assert wait_until(lambda: _answers(engines["s2"]), timeout=30)
        assert len(_prepared(engines)["s2"]) == 1  # a prepared transaction survives a restart
        report = shards.recover_prepared(older_than=0)
        assert report.is_complete, str(report)
        assert [(a.shard_id, a.outcome) for a in report.actions] == [("s2", "committed")]
    assert _state(engines) == dict.fromkeys(SHARD_IDS, "committed")
    assert _prepared(engines) == NOTHING_PREPARED
    assert _unlocked(engines)


@pytest.mark.fault
def test_a_shard_lost_after_its_commit_prepared_does_not_fail_the_commit(
    own_cluster: tuple[LocalCluster, dict[str, str]],
) -> None:
    """A shard stopped right after the last COMMIT PREPARED leaves a committed transaction,
    and commit() and the session's close say so: nothing is sent to the lost shard after it."""
    cluster, urls = own_cluster
    engines = _admin(urls)
    with app.shard_set(urls) as shards, at_step(stop_at("committed:s2", cluster.shards[2])):
        app.transfer(shards)  # commits and closes the session without an error
    cluster.shards[2].start()
    assert wait_until(lambda: _answers(engines["s2"]), timeout=30)
    assert _state(engines) == dict.fromkeys(SHARD_IDS, "committed")
    assert _prepared(engines) == NOTHING_PREPARED


@pytest.mark.fault
def test_an_unreachable_coordinator_commits_nothing(
    own_cluster: tuple[LocalCluster, dict[str, str]],
) -> None:
    """With the coordinator (home shard) stopped after every PREPARE, no decision can be
    recorded: commit() raises, the other shards are rolled back at once, and the coordinator's
    own part is rolled back by recovery once it is back."""
    cluster, urls = own_cluster
    engines = _admin(urls)
    coordinator = cluster.shards[0]
    with app.shard_set(urls) as shards:
        with (
            at_step(stop_at("prepared", coordinator)),
            pytest.raises((ss.NodeUnavailableError, ss.CommitOutcomeUnknown)),
        ):
            app.transfer(shards)
        with pytest.raises(ss.NodeUnavailableError, match="coordinator"):
            shards.recover_prepared(older_than=0)
        coordinator.start()
        assert wait_until(lambda: _answers(engines["s0"]), timeout=30)
        report = shards.recover_prepared(older_than=0)
        assert report.is_complete, str(report)
    assert _state(engines) == dict.fromkeys(SHARD_IDS, "untouched")
    assert _prepared(engines) == NOTHING_PREPARED
    assert _unlocked(engines)


def _answers(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except OperationalError:
        time.sleep(0.05)
        return False


def test_prepared_transactions_of_others_are_listed_never_touched(shared: dict[str, str]) -> None:
    """A prepared transaction whose gid this protocol did not make is reported as left alone,
    stays prepared after recovery, and shows in the status line."""
    engines = _admin(shared)
    with engines["s1"].connect() as conn:
        conn.execute(text("BEGIN"))
        conn.execute(text("UPDATE tpc_accounts SET balance = 1"))
        conn.execute(text("PREPARE TRANSACTION 'other_app_42'"))
    with app.shard_set(shared) as shards:
        report = shards.recover_prepared(older_than=0)
        status = ss.sharding.prepared_status(shards, older_than=0)
    assert report.actions == [] and report.is_complete
    assert [(p.shard_id, p.gid, p.txid) for p in report.skipped] == [("s1", "other_app_42", None)]
    assert "not named by this protocol" in str(report)
    assert status.startswith("prepared transactions older than 0 s: 1 on s1")
    assert _prepared(engines)["s1"] == ["other_app_42"]


@pytest.mark.fault
def test_recovery_through_pgbouncer_in_transaction_mode(
    scale_cluster: LocalCluster, shared: dict[str, str], driver: str, tmp_path: Path
) -> None:
    """Through PgBouncer in transaction mode, an application killed after some COMMIT PREPARED
    is finished by recovery: every shard committed, nothing prepared or locked."""
    bouncer = scale_cluster.pgbouncer
    assert bouncer is not None, "the shared cluster runs PgBouncer (--scale-pgbouncer)"
    pooled = {
        s: bouncer.url(driver, database=scale_cluster.shards[i].name)
        for i, s in enumerate(SHARD_IDS)
    }
    engines = _admin(shared)
    _run_app_until(tmp_path, pooled, "committed:s0")
    assert _state(engines)["s0"] == "committed" and _prepared(engines)["s1"] != []
    with app.shard_set(pooled) as shards:
        report = shards.recover_prepared(older_than=0)
    assert report.is_complete, str(report)
    assert _state(engines) == dict.fromkeys(SHARD_IDS, "committed")
    assert _prepared(engines) == NOTHING_PREPARED
    assert wait_until(lambda: _unlocked(engines), timeout=30)
