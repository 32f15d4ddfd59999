"""The documented way to lint, type-check, test, benchmark and demo sqlalchemy-scale.

``nox -s tests`` is the test command of the README and of CI. It installs the
built wheel (so what ships is what is tested), makes sure PostgreSQL and
PgBouncer are on the machine (``.ci/system-deps.sh``: Debian packages when
missing, or a loud failure), and runs the suite against real servers that the
suite starts on 127.0.0.1.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typing", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
DRIVERS = ["psycopg2", "psycopg"]


def _ensure_servers(session: nox.Session) -> None:
    session.run("bash", ".ci/system-deps.sh", external=True)


def _install(session: nox.Session, *groups: str, extras: str = "") -> None:
    deps: list[str] = []
    for group in groups:
        deps += nox.project.dependency_groups(PYPROJECT, group)
    session.install(f".{extras}", *deps)


def _run_tests(session: nox.Session, *, driver: str, marks: str | None = None) -> None:
    """Install the wheel and the test group, then run pytest with ``driver`` as the default driver."""
    _ensure_servers(session)
    _install(session, "tests", extras="[psycopg]")
    args = ["-p", "no:cacheprovider", "--allow-hosts=127.0.0.1,::1"]
    if marks:
        args += ["-m", marks]
    env = {"SQLALCHEMY_SCALE_TEST_DRIVER": driver}
    session.run("pytest", *args, *session.posargs, env=env)


@nox.session
@nox.parametrize("driver", DRIVERS)
def tests(session: nox.Session, driver: str) -> None:
    """The whole suite against real PostgreSQL and PgBouncer, once per driver."""
    _run_tests(session, driver=driver)


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
