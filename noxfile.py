"""The documented way to lint, type-check, test, benchmark and demo sqlalchemy-scale.

``nox -s tests`` is the test command of the README and of CI. It installs the
built wheel (so what ships is what is tested), makes sure PostgreSQL and
PgBouncer are on the machine (``.ci/system-deps.sh``: Debian packages when
missing, or a loud failure), and runs the suite against real servers that the
suite starts on 127.0.0.1: on the newest SQLAlchemy 2.1 with each driver, and
on the newest 2.0 with psycopg2 (``TEST_MATRIX``; one run takes about four
minutes on two cores, so the matrix is kept to three). ``nox -s horizontal_shard``
runs SQLAlchemy's own ``test/ext/test_horizontal_shard.py`` with our
``ShardedSession`` once per SQLAlchemy version, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typing", "tests", "horizontal_shard"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")

# What each SQLAlchemy minor version of the test matrix installs: its newest release.
SQLALCHEMY = {"2.0": "sqlalchemy>=2.0,<2.1", "2.1": "sqlalchemy>=2.1,<2.2"}
# (SQLAlchemy, driver) pairs CI runs: 2.1 with both drivers; 2.0 with psycopg2, the driver
# the package installs (the drivers' code paths are the same on both versions, what 2.0
# changes is SQLAlchemy's own: sqlalchemy_scale/_sa.py).
TEST_MATRIX = [("2.1", "psycopg2"), ("2.1", "psycopg"), ("2.0", "psycopg2")]
# SQLAlchemy's own test/ext/test_horizontal_shard.py, once per SQLAlchemy version of
# TEST_MATRIX; the PostgreSQL part with 2.1's default driver on 2.1 and psycopg2 on 2.0.
HORIZONTAL_SHARD_MATRIX = [("2.1", "psycopg"), ("2.0", "psycopg2")]


def _ensure_servers(session: nox.Session) -> None:
    session.run("bash", ".ci/system-deps.sh", external=True)


def _install(session: nox.Session, *groups: str, extras: str = "", also: str = "") -> None:
    deps: list[str] = []
    for group in groups:
        deps += nox.project.dependency_groups(PYPROJECT, group)
    # ``also`` goes into the same pip call: a requirement the package and the groups
    # cannot all meet is a resolver error here, as it would be in an application.
    session.install(f".{extras}", *deps, *([also] if also else []))


def _run_tests(
    session: nox.Session, *, driver: str, sqlalchemy: str = "2.1", marks: str | None = None
) -> None:
    """Install the wheel and the test group with the newest ``sqlalchemy`` (minor version),
    then run pytest with ``driver`` as the default driver."""
    _ensure_servers(session)
    _install(session, "tests", extras="[psycopg]", also=SQLALCHEMY[sqlalchemy])
    session.run("python", "-c", "import sqlalchemy; print('SQLAlchemy', sqlalchemy.__version__)")
    args = ["-p", "no:cacheprovider", "--allow-hosts=127.0.0.1,::1"]
    if marks:
        args += ["-m", marks]
    env = {"SQLALCHEMY_SCALE_TEST_DRIVER": driver}
    session.run("pytest", *args, *session.posargs, env=env)


@nox.session
@nox.parametrize(("sqlalchemy", "driver"), TEST_MATRIX)
def tests(session: nox.Session, sqlalchemy: str, driver: str) -> None:
    """The whole suite against real PostgreSQL and PgBouncer, once per (SQLAlchemy, driver)
    pair of ``TEST_MATRIX``."""
    _run_tests(session, driver=driver, sqlalchemy=sqlalchemy)


@nox.session
@nox.parametrize(("sqlalchemy", "driver"), HORIZONTAL_SHARD_MATRIX)
def horizontal_shard(session: nox.Session, sqlalchemy: str, driver: str) -> None:
    """SQLAlchemy's own ``test/ext/test_horizontal_shard.py`` with ``ss.ShardedSession``,
    from the sdist of the installed SQLAlchemy (downloaded once into a cache), on SQLite
    and on a PostgreSQL server started by ``sqlalchemy_scale.local``; see
    tests/compat/run_sqlalchemy_horizontal_shard.py."""
    _ensure_servers(session)
    _install(session, "compat", extras="[psycopg]", also=SQLALCHEMY[sqlalchemy])
    posargs = ["--", *session.posargs] if session.posargs else []
    runner = "tests/compat/run_sqlalchemy_horizontal_shard.py"
    session.run("python", runner, "--driver", driver, *posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    _install(session, "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict over the package."""
    _install(session, "typing", extras="[psycopg,asyncpg,fastapi,flask,sqlmodel,alembic]")
    session.run("mypy", "sqlalchemy_scale")
    session.run("mypy", "--strict", "tests/typing")


@nox.session
def bench(session: nox.Session) -> None:
    """pytest-benchmark over benchmarks/: ratios measured in one run, printed."""
    _ensure_servers(session)
    _install(session, "bench")
    session.run(
        "pytest",
        "benchmarks",
        "-p",
        "no:cacheprovider",
        "--benchmark-only",
        "-s",
        "--benchmark-columns=min,median,mean,rounds",
        *session.posargs,
    )


@nox.session
def demo(session: nox.Session) -> None:
    """The demo: a real primary and two replicas on 127.0.0.1, an ORM workload, a report."""
    _ensure_servers(session)
    session.install(".")
    session.run(
        "python", "-m", "sqlalchemy_scale", "demo", env={"PYTHONUNBUFFERED": "1", **os.environ}
    )
