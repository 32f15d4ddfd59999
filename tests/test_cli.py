"""The command line, run as a user would: ``python -m sqlalchemy_scale demo|status``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from sqlalchemy_scale.local import LocalCluster
from sqlalchemy_scale.testing import wait_until


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlalchemy_scale", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_demo_runs_end_to_end() -> None:
    """The demo starts its own servers, routes every step as expected, stops them, exits 0."""
    result = run("demo")
    assert result.returncode == 0, result.stderr
    assert "Every step went where expected." in result.stdout
    assert "replica1" in result.stdout and "replica2" in result.stdout
    assert "All servers stopped." in result.stdout
    # Sharding, the causal read during paused replay, and the status table are shown too.
    assert "Rows placed by shard key" in result.stdout
    assert "Cross-shard write without two_phase: refused" in result.stdout
    assert "fallback: no replica at" in result.stdout
    assert "All nodes healthy." in result.stdout


def _pids(directory: Path) -> list[int]:
    return [int(p.read_text().split()[0]) for p in directory.glob("*/postmaster.pid")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_keep_then_status_then_stop(tmp_path: Path) -> None:
    """demo --keep leaves its servers running with a topology file that status reads (for
    the replica set and the shard set), and `stop DIR` stops every one of them."""
    result = run("demo", "--keep")
    found = re.search(r"sqlalchemy-scale stop (\S+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    directory = Path(found.group(1))
    pids = _pids(directory)
    try:
        assert result.returncode == 0, result.stderr
        assert "Every step went where expected." in result.stdout
        assert "All servers stopped." not in result.stdout
        assert len(pids) == 5 and all(_alive(pid) for pid in pids)
        config = directory / "topology.toml"
        for section in ("replica_set", "shard_set"):
            status = run("status", "--config", str(config), "--section", section, "--json")
            assert status.returncode == 0, status.stdout + status.stderr
            report = json.loads(status.stdout)
            assert report["healthy"] and report["pgbouncer"]["pools"]
        password = re.search(r"://scale:([^@]+)@", config.read_text())
        assert password is not None and password.group(1) not in result.stdout + status.stdout
    finally:
        stopped = run("stop", str(directory))
    assert stopped.returncode == 0, stopped.stderr
    assert "primary" in stopped.stdout and "pgbouncer" in stopped.stdout
    assert not directory.exists()
    # pg_ctl returns once postmaster.pid is gone; the process exits a moment later.
    assert wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10)


def test_stop_refuses_a_directory_the_demo_did_not_keep(tmp_path: Path) -> None:
    """stop on a directory without the demo's topology file stops nothing and says so."""
    result = run("stop", str(tmp_path))
    assert result.returncode == 2
    assert "nothing was stopped" in result.stderr
    assert tmp_path.exists()


def test_status_reports_roles_and_hides_the_password(scale_cluster: LocalCluster) -> None:
    """status prints each node's server-reported role and state, never the password."""
    result = run(
        "status",
        "--primary",
        scale_cluster.primary.url(),
        *[arg for r in scale_cluster.replicas for arg in ("--replica", r.url())],
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(
        line.split()[:3] == ["primary", "primary", "primary"] for line in lines if line.strip()
    )
    assert sum(1 for line in lines if line.split()[1:3] == ["replica", "replica"]) == 2
    assert scale_cluster.password not in result.stdout + result.stderr


def test_status_reads_a_config_file(scale_cluster: LocalCluster, tmp_path: Path) -> None:
    """status --config reads the shared TOML format."""
    config = tmp_path / "scale.toml"
    config.write_text(
        f'[replica_set]\nprimary = "{scale_cluster.primary.url()}"\n'
        f'replicas = ["{scale_cluster.replicas[0].url()}"]\n'
    )
    result = run("status", "--config", str(config), "--section", "replica_set")
    assert result.returncode == 0, result.stderr
    assert "replica1" in result.stdout


def test_status_fails_clearly_for_a_down_node(scale_cluster: LocalCluster) -> None:
    """status exits 1 and names the error when a node cannot be reached."""
    url = scale_cluster.primary.url().replace(f":{scale_cluster.primary.port}/", ":1/")
    result = run("status", "--primary", url)
    assert result.returncode == 1
    assert "down" in result.stdout and "OperationalError" in result.stdout
    assert scale_cluster.password not in result.stdout + result.stderr


def test_status_without_a_topology_is_a_usage_error() -> None:
    """status with no --config and no --primary says what to give it."""
    result = run("status")
    assert result.returncode == 2
    assert "--config" in result.stderr
