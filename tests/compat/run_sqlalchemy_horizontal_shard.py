"""Run SQLAlchemy's own ``test/ext/test_horizontal_shard.py`` with ``ss.ShardedSession``.

Run by ``nox`` (session ``horizontal_shard``, once per SQLAlchemy version of the
test matrix) and by hand::

    python tests/compat/run_sqlalchemy_horizontal_shard.py [--backend sqlite|postgresql|all]
        [--driver psycopg2|psycopg] [--cache DIR] [-- PYTEST_ARGS...]

Its source is the sdist of the *installed* SQLAlchemy version, which holds the test
suite: ``pip download sqlalchemy==<version> --no-binary :all: --no-deps`` into a cache
directory (``--cache``, else ``$SQLALCHEMY_SCALE_SDIST_CACHE``, else
``~/.cache/sqlalchemy-scale/sdists``), done once per version. A failed download fails
the run: nothing is skipped. From the sdist it extracts the test file and SQLAlchemy's
test scaffolding (``test/conftest.py``, ``test/requirements.py``,
``test/orm/_fixtures.py``, ``setup.cfg``, ``pyproject.toml``) into a temporary
directory, points its ``lib/sqlalchemy`` at the installed SQLAlchemy (whose
``sqlalchemy.testing`` plugin the suite uses), replaces exactly one line, the import
of SQLAlchemy's ``ShardedSession``, with ``from sqlalchemy_scale import
ShardedSession`` (the run fails if that line is not found exactly once), and runs
pytest there:

- on SQLite, SQLAlchemy's default ``--dburi``: every test but the PostgreSQL-only ones;
- on PostgreSQL (``--dburi postgresql+<driver>://...``): one server started by
  :class:`sqlalchemy_scale.local.LocalCluster` on 127.0.0.1 and stopped afterwards (by
  its data directory), for ``MultipleDialectShardTest`` (SQLite and PostgreSQL shards
  in one session) and the tests that run on any backend. The run fails if
  ``MultipleDialectShardTest`` did not pass there, so a PostgreSQL pass that skipped
  it cannot look green.

Exit status: 0 when every backend's pytest run passed; otherwise the first non-zero
status (2 for a problem of the runner itself: download, archive, import line).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import sqlalchemy

import sqlalchemy_scale
from sqlalchemy_scale.local import LocalCluster

TEST = "test/ext/test_horizontal_shard.py"
SCAFFOLDING = [
    TEST,
    "test/__init__.py",
    "test/conftest.py",
    "test/requirements.py",
    "test/ext/__init__.py",
    "test/orm/__init__.py",
    "test/orm/_fixtures.py",
    "setup.cfg",
    "pyproject.toml",
]
ORIGINAL = "from sqlalchemy.ext.horizontal_shard import ShardedSession\n"
OURS = "from sqlalchemy_scale import ShardedSession\n"
# Must pass on PostgreSQL, or the PostgreSQL run proved nothing of its own.
POSTGRESQL_ONLY = "MultipleDialectShardTest"
CACHE_ENV = "SQLALCHEMY_SCALE_SDIST_CACHE"


class RunnerError(Exception):
    """The runner could not set up SQLAlchemy's test suite; nothing was run."""


def default_cache() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sqlalchemy-scale" / "sdists"


def fetch_sdist(version: str, cache: Path) -> Path:
    """The sdist of SQLAlchemy ``version`` in ``cache``, downloaded with pip if absent."""
    cache.mkdir(parents=True, exist_ok=True)
    found = _find_sdist(version, cache)
    if found is not None:
        return found
    command = [
        sys.executable, "-m", "pip", "download", f"sqlalchemy=={version}",
        "--no-binary", ":all:", "--no-deps", "--disable-pip-version-check", "-d", str(cache),
    ]  # fmt: skip
    print("+", " ".join(command), flush=True)
    proc = subprocess.run(command, check=False, capture_output=True, text=True)
    found = _find_sdist(version, cache)
    if proc.returncode != 0 or found is None:
        raise RunnerError(
            f"could not download the sdist of SQLAlchemy {version} into {cache} "
            f"(pip exit status {proc.returncode}):\n{(proc.stderr or proc.stdout).strip()}"
        )
    return found


def _find_sdist(version: str, cache: Path) -> Path | None:
    # Older releases are named SQLAlchemy-<version>.tar.gz, newer ones sqlalchemy-<version>.
    for path in cache.glob("*.tar.gz"):
        if path.name.lower() == f"sqlalchemy-{version}.tar.gz":
            return path
    return None


def extract(sdist: Path, dest: Path) -> None:
    """Write the test file and its scaffolding from ``sdist`` under ``dest``."""
    with tarfile.open(sdist) as tar:
        members = {}
        for member in tar.getmembers():
            _top, sep, inner = member.name.partition("/")
            if sep and inner in SCAFFOLDING:
                member.name = inner
                members[inner] = member
        missing = sorted(set(SCAFFOLDING) - set(members))
        if missing:
            raise RunnerError(f"{sdist.name} lacks {', '.join(missing)}")
        tar.extractall(dest, members=list(members.values()), filter="data")


def use_our_sharded_session(test: Path) -> None:
    """Replace the one import line of SQLAlchemy's ``ShardedSession`` with ours."""
    source = test.read_text()
    if source.count(ORIGINAL) != 1:
        raise RunnerError(
            f"{TEST}: the line {ORIGINAL.strip()!r} was found {source.count(ORIGINAL)} times, "
            "not once; nothing was run"
        )
    test.write_text(source.replace(ORIGINAL, OURS))


def run_pytest(tree: Path, name: str, pytest_args: list[str]) -> tuple[int, Counter[str]]:
    """Run the test file in ``tree``; return pytest's status and outcome counts."""
    report = tree / f"report-{name}.xml"
    report.unlink(missing_ok=True)
    # The package as this process imported it: the installed wheel under nox, the
    # checkout when run by hand with PYTHONPATH.
    env = {
        "PYTHONPATH": str(Path(sqlalchemy_scale.__file__).resolve().parents[1]),
        "PATH": "/usr/bin:/bin",
        "HOME": str(Path.home()),
    }
    command = [
        sys.executable, "-m", "pytest", TEST, "-p", "no:cacheprovider",
        "-p", "no:sqlalchemy_scale", "-q", "-rfEs", f"--junitxml={report}", *pytest_args,
    ]  # fmt: skip
    print(f"\n=== SQLAlchemy {sqlalchemy.__version__} {TEST} on {name}", flush=True)
    status = subprocess.run(command, cwd=tree, env=env, check=False).returncode
    return status, _outcomes(report)


def _outcomes(report: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    if not report.exists():
        return counts
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcome = kinds.pop() if kinds else "passed"
        counts[outcome] += 1
        # SQLAlchemy's plugin names a test class per backend (MultipleDialectShardTest_...).
        if outcome == "passed" and f".{POSTGRESQL_ONLY}" in case.get("classname", ""):
            counts[POSTGRESQL_ONLY] += 1
    return counts


def _summary(counts: Counter[str]) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in ("passed", "failure", "error", "skipped"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "all"], default="all")
    parser.add_argument("--driver", choices=["psycopg2", "psycopg"], default="psycopg2")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args(argv)
    version = sqlalchemy.__version__
    began = time.monotonic()
    results: list[tuple[str, int, Counter[str]]] = []
    try:
        sdist = fetch_sdist(version, args.cache or default_cache())
        with tempfile.TemporaryDirectory(prefix="sa-horizontal-shard-") as tmp:
            tree = Path(tmp)
            extract(sdist, tree)
            (tree / "lib").mkdir()
            (tree / "lib" / "sqlalchemy").symlink_to(Path(sqlalchemy.__file__).parent)
            use_our_sharded_session(tree / TEST)
            if args.backend in ("sqlite", "all"):
                results.append(("sqlite", *run_pytest(tree, "sqlite", args.pytest_args)))
            if args.backend in ("postgresql", "all"):
                with LocalCluster(replicas=0, shards=0, pgbouncer=False) as cluster:
                    dburi = ["--dburi", cluster.primary.url(args.driver)]
                    name = f"postgresql+{args.driver}"
                    results.append((name, *run_pytest(tree, name, [*dburi, *args.pytest_args])))
    except RunnerError as exc:
        print(f"run_sqlalchemy_horizontal_shard: {exc}", file=sys.stderr)
        return 2
    print(f"\n=== SQLAlchemy {version} {TEST} with sqlalchemy_scale.ShardedSession")
    status = 0
    for name, code, counts in results:
        print(f"  {name}: {_summary(counts)} (pytest exit status {code})")
        status = status or code
        if name.startswith("postgresql") and not counts[POSTGRESQL_ONLY]:
            print(f"  {name}: no {POSTGRESQL_ONLY} test passed", file=sys.stderr)
            status = status or 1
    print(f"  {time.monotonic() - began:.0f}s in all")
    return status


if __name__ == "__main__":
    sys.exit(main())
