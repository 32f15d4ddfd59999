"""The command line, run as a user would: ``python -m sqlalchemy_scale demo|status``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy_scale.local import LocalCluster


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
