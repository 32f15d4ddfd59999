"""Alembic across shards and replica sets: one ``env.py`` call migrates every shard's primary.

Call :func:`run_migrations` from an ordinary Alembic ``env.py``, with a
:class:`~sqlalchemy_scale.ShardSet`, a :class:`~sqlalchemy_scale.ReplicaSet` or the
TOML file both read (``sqlalchemy-scale alembic-init DIR`` writes such an ``env.py``)::

    from sqlalchemy_scale.alembic import run_migrations
    from myapp.models import Base

    run_migrations("topology.toml", target_metadata=Base.metadata)

Every Alembic command then works per shard: ``upgrade``, ``downgrade``, ``current``,
``stamp``, ``check`` (the models are compared with every shard) and ``--sql``.

- Only primaries are migrated: a replica is never connected to, and a "primary" URL
  that points at a server in recovery (``pg_is_in_recovery()``) is refused before any
  shard is migrated.
- Each shard's migration is one transaction on that shard (PostgreSQL runs DDL
  transactionally), with the shard's own ``alembic_version``: a shard that fails is
  rolled back whole, the shards before it stay migrated.
- Shards run one after another in configuration order; ``-x shards=s1,s3`` targets
  some, ``-x concurrency=N`` migrates N at a time (each in a forked process, because
  Alembic's ``op`` proxy is process-global). A line per shard (shard, from, to,
  elapsed) goes to stderr.
- At the first failure no further shard is started; every targeted shard's revision
  and the failing shard's error are reported, and :class:`MigrationError` (an Alembic
  ``CommandError``, so the ``alembic`` command exits non-zero) is raised. Running the
  command again after the fix moves only the shards that are not at the target.
- Offline (``--sql``): one script with a ``-- shard <id>`` header per shard on
  Alembic's output, or one file per shard with ``-x sql_dir=DIR``.

When *not* to use it: a migration that must change every shard atomically (all or
none) needs two-phase commit, which this does not do; write migrations that are
safe to run shard by shard (expand, deploy, contract).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

try:
    from alembic import context
    from alembic.util import CommandError
except ImportError as exc:  # the extra is optional
    raise ImportError(
        "sqlalchemy_scale.alembic needs Alembic: pip install 'sqlalchemy-scale[alembic]'"
    ) from exc
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Engine

from ._config import load_topology
from .errors import ScaleError, render_url
from .topology import ReplicaSet

if TYPE_CHECKING:
    from .sharding import ShardSet

__all__ = ["MigrationError", "run_migrations"]

#: ``alembic.ini`` options read when ``run_migrations()`` is given no topology.
TOPOLOGY_OPTION = "sqlalchemy_scale.topology"
SECTION_OPTION = "sqlalchemy_scale.section"

Heads = tuple[str, ...]


class MigrationError(ScaleError, CommandError):
    """A migration failed on a shard, or could not start.

    :attr:`shard` names the failing shard (None when no shard was started);
    :attr:`revisions` maps every targeted shard to its revision afterwards.
    """

    def __init__(
        self, message: str, *, shard: str | None = None, revisions: Mapping[str, Heads] = {}
    ) -> None:
        super().__init__(message)
        self.shard = shard
        self.revisions = dict(revisions)


def run_migrations(
    topology: ShardSet | ReplicaSet | str | PathLike[str] | Mapping[str, Any] | None = None,
    *,
    section: str | None = None,
    target_metadata: MetaData | Sequence[MetaData] | None = None,
    shards: Sequence[str] | None = None,
    concurrency: int = 1,
    sql_dir: str | PathLike[str] | None = None,
    **configure_kwargs: Any,
) -> dict[str, Heads]:
    """Run the current Alembic command on every targeted shard's primary (call from env.py).

    :param topology: a ShardSet, a ReplicaSet (migrated as one shard named after it), or
        a TOML file / mapping in the format of :mod:`sqlalchemy_scale._config`. None reads
        the path from ``sqlalchemy_scale.topology`` in ``alembic.ini`` (and the table
        from ``sqlalchemy_scale.section``).
    :param section: the TOML table holding the topology.
    :param target_metadata: the models' ``MetaData`` (for ``check`` and autogenerate).
    :param shards: shard ids to migrate (default: all); ``-x shards=s1,s3`` wins.
    :param concurrency: shards migrated at a time; ``-x concurrency=N`` wins.
    :param sql_dir: with ``--sql``, write ``<shard>.sql`` files here instead of one
        stream with a header per shard; ``-x sql_dir=DIR`` wins.
    :param configure_kwargs: passed to ``context.configure()`` for every shard
        (``version_table_schema``, ``compare_type``, ...).
    :return: each migrated shard's revision(s) afterwards (online mode; empty offline).

    .. versionadded:: 0.1
    """
    config = context.config
    x_args = context.get_x_argument(as_dictionary=True)
    if "shards" in x_args:
        shards = [s.strip() for s in x_args["shards"].split(",") if s.strip()]
    if "concurrency" in x_args:
        try:
            concurrency = int(x_args["concurrency"])
        except ValueError:
            raise MigrationError(
                f"-x concurrency={x_args['concurrency']!r} is not a whole number"
            ) from None
    if concurrency < 1:
        raise MigrationError(f"concurrency must be at least 1, got {concurrency}")
    sql_dir = x_args.get("sql_dir", sql_dir)
    with _topology(topology, section, config) as engines:
        targets = _targets(engines, shards)
        if context.is_offline_mode():
            _run_offline(targets, target_metadata, sql_dir, configure_kwargs)
            return {}
        runner = _ShardRunner(targets, target_metadata, configure_kwargs)
        return runner.run(concurrency)


# -- topology -------------------------------------------------------------------------------


@contextmanager
def _topology(
    topology: ShardSet | ReplicaSet | str | PathLike[str] | Mapping[str, Any] | None,
    section: str | None,
    config: Any,
) -> Iterator[dict[str, Engine]]:
    """Each shard's primary engine, in shard order; a topology loaded here is disposed after."""
    from .sharding import ShardSet

    owned = False
    if topology is None:
        path = config.get_main_option(TOPOLOGY_OPTION)
        if not path:
            raise MigrationError(
                f"run_migrations() was given no topology and alembic.ini sets no "
                f"{TOPOLOGY_OPTION} (the path of the topology TOML file)"
            )
        topology = path
        section = section or config.get_main_option(SECTION_OPTION) or None
    if not isinstance(topology, ShardSet | ReplicaSet):
        topology = load_topology(topology, section=section)
        owned = True
    try:
        if isinstance(topology, ShardSet):
            yield {s: topology.replica_set(s).primary.engine for s in topology.shard_ids}
        else:
            yield {topology.name: topology.primary.engine}
    finally:
        if owned:
            topology.dispose()


def _targets(engines: dict[str, Engine], shards: Sequence[str] | None) -> dict[str, Engine]:
    if not shards:
        return engines
    unknown = [s for s in shards if s not in engines]
    if unknown:
        raise MigrationError(
            f"unknown shard(s) {unknown}; the topology's shards are {list(engines)}; "
            "nothing was migrated"
        )
    return {s: engines[s] for s in engines if s in shards}


# -- online ---------------------------------------------------------------------------------


def _describe(heads: Heads) -> str:
    return ",".join(heads) if heads else "base"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _ShardRunner:
    def __init__(
        self,
        targets: dict[str, Engine],
        target_metadata: MetaData | Sequence[MetaData] | None,
        configure_kwargs: dict[str, Any],
    ) -> None:
        self.targets = targets
        self.target_metadata = target_metadata
        self.configure_kwargs = configure_kwargs

    def _configure(self, connection: Any) -> None:
        context.configure(
            connection=connection, target_metadata=self.target_metadata, **self.configure_kwargs
        )

    def run(self, concurrency: int) -> dict[str, Heads]:
        self._refuse_replicas()
        # `check` and `revision --autogenerate` collect each shard's differences in the
        # command's own objects: they must stay in this process, so shards run in turn.
        autogenerate = self._revision_context() is not None
        if concurrency > 1 and len(self.targets) > 1 and not autogenerate:
            results, failure = self._run_forked(concurrency)
        else:
            results, failure = self._run_sequential()
        if failure is not None:
            shard, error = failure
            revisions = self._revisions()
            lines = [f"migration failed on shard {shard!r}: {error}", "shards are now at:"]
            for name, heads in revisions.items():
                note = (
                    " (failed, rolled back)"
                    if name == shard
                    else ""
                    if name in results
                    else " (not migrated)"
                )
                lines.append(f"  {name}: {_describe(heads)}{note}")
            lines.append("fix the cause and run the command again: migrated shards are skipped")
            message = "\n".join(lines)
            _say(message)
            raise MigrationError(message, shard=shard, revisions=revisions)
        after = {name: results[name][1] for name in self.targets}
        if autogenerate:
            self._report_model_differences()
        if len(set(after.values())) > 1:
            _say(
                "shards disagree: "
                + ", ".join(f"{name} at {_describe(h)}" for name, h in after.items())
            )
        else:
            heads = next(iter(after.values()))
            _say(f"{len(after)} shard(s) at {_describe(heads)}")
        return after

    def _revision_context(self) -> Any:
        """The autogenerate RevisionContext of `check` / `revision --autogenerate`, else None."""
        migration_context = context.get_context()
        environment = migration_context.environment_context
        return None if environment is None else environment.context_opts.get("revision_context")

    def _report_model_differences(self) -> None:
        """Say which shards differ from the models (autogenerate keeps one list per shard)."""
        revision_context = self._revision_context()
        generated = getattr(revision_context, "generated_revisions", None)
        if not generated:
            return
        per_shard = generated[-1].upgrade_ops_list
        if len(per_shard) != len(self.targets):
            return
        for name, upgrade_ops in zip(self.targets, per_shard, strict=True):
            diffs = upgrade_ops.as_diffs()
            if diffs:
                _say(f"shard {name}: {len(diffs)} difference(s) from the models: {diffs}")
            else:
                _say(f"shard {name}: matches the models")

    def _refuse_replicas(self) -> None:
        """Refuse, before any shard is migrated, a primary URL that reaches a replica."""
        for name, engine in self.targets.items():
            try:
                with engine.connect() as conn:
                    in_recovery = conn.scalar(text("SELECT pg_is_in_recovery()"))
                    self._configure(conn)  # so that the command's options can be read
            except Exception as exc:
                raise MigrationError(
                    f"shard {name!r} ({render_url(engine)}) cannot be reached: "
                    f"{type(exc).__name__}: {getattr(exc, 'orig', exc)}; nothing was migrated",
                    shard=name,
                ) from exc
            if in_recovery:
                raise MigrationError(
                    f"shard {name!r}: its primary URL {render_url(engine)} reaches a server in "
                    "recovery (a replica); migrations run only on primaries, nothing was migrated",
                    shard=name,
                )

    def _migrate(self, name: str, engine: Engine) -> tuple[Heads, Heads]:
        """One shard, in one transaction: (revisions before, revisions after)."""
        started = time.monotonic()
        with engine.connect() as connection, connection.begin():
            self._configure(connection)
            migration_context = context.get_context()
            before = tuple(migration_context.get_current_heads())
            context.run_migrations()
            after = tuple(migration_context.get_current_heads())
        elapsed = time.monotonic() - started
        if before == after:
            _say(f"shard {name}: {_describe(after)} (unchanged, {elapsed:.2f} s)")
        else:
            _say(f"shard {name}: {_describe(before)} -> {_describe(after)} ({elapsed:.2f} s)")
        return before, after

    def _run_sequential(self) -> tuple[dict[str, tuple[Heads, Heads]], tuple[str, str] | None]:
        results: dict[str, tuple[Heads, Heads]] = {}
        for name, engine in self.targets.items():
            try:
                results[name] = self._migrate(name, engine)
            except Exception as exc:
                return results, (name, _error_text(exc))
        return results, None

    def _run_forked(
        self, concurrency: int
    ) -> tuple[dict[str, tuple[Heads, Heads]], tuple[str, str] | None]:
        # Alembic's `op` and `context` proxies are module globals: two migrations cannot run
        # in one process at once. Each shard runs in a forked child; the parent only schedules.
        forking = multiprocessing.get_context("fork")
        pending = list(self.targets.items())
        running: dict[Any, tuple[str, Any, Any]] = {}
        results: dict[str, tuple[Heads, Heads]] = {}
        failure: tuple[str, str] | None = None
        for engine in self.targets.values():
            engine.dispose()  # no pooled socket shared with a child
        while pending or running:
            while pending and failure is None and len(running) < concurrency:
                name, engine = pending.pop(0)
                receiver, sender = forking.Pipe(duplex=False)
                process = forking.Process(
                    target=_child, args=(self._migrate, name, engine, sender), daemon=True
                )
                process.start()
                sender.close()
                running[process.sentinel] = (name, process, receiver)
            if not running:
                break
            for sentinel in multiprocessing.connection.wait(list(running)):
                name, process, receiver = running.pop(sentinel)
                outcome = receiver.recv() if receiver.poll() else None
                receiver.close()
                process.join()
                if outcome is not None and "error" not in outcome:
                    results[name] = (tuple(outcome["before"]), tuple(outcome["after"]))
                elif failure is None:
                    error = (
                        outcome["error"]
                        if outcome is not None
                        else f"the migrating process exited with code {process.exitcode}"
                    )
                    failure = (name, error)
        return results, failure

    def _revisions(self) -> dict[str, Heads]:
        revisions: dict[str, Heads] = {}
        for name, engine in self.targets.items():
            try:
                with engine.connect() as connection:
                    self._configure(connection)
                    revisions[name] = tuple(context.get_context().get_current_heads())
            except Exception as exc:
                revisions[name] = (f"unknown ({type(exc).__name__})",)
        return revisions


def _child(
    migrate: Callable[[str, Engine], tuple[Heads, Heads]], name: str, engine: Engine, sender: Any
) -> None:
    engine.dispose(close=False)  # the parent's connections are not this process's
    try:
        before, after = migrate(name, engine)
    except BaseException as exc:
        sender.send({"error": _error_text(exc)})
    else:
        sender.send({"before": list(before), "after": list(after)})
    finally:
        sender.close()


def _error_text(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    if orig is not None:
        return f"{type(orig).__name__}: {' '.join(str(orig).split())}"
    lines = traceback.format_exception_only(type(exc), exc)
    return " ".join(" ".join(lines).split())


# -- offline --------------------------------------------------------------------------------


def _run_offline(
    targets: dict[str, Engine],
    target_metadata: MetaData | Sequence[MetaData] | None,
    sql_dir: str | PathLike[str] | None,
    configure_kwargs: dict[str, Any],
) -> None:
    config = context.config
    for name, engine in targets.items():
        with _sql_output(name, sql_dir, config) as buffer:
            buffer.write(f"-- shard {name}: {render_url(engine)}\n\n")
            context.configure(
                url=engine.url,
                output_buffer=buffer,
                target_metadata=target_metadata,
                literal_binds=True,
                dialect_opts={"paramstyle": "named"},
                **configure_kwargs,
            )
            with context.begin_transaction():
                context.run_migrations()
            buffer.write("\n")


@contextmanager
def _sql_output(name: str, sql_dir: str | PathLike[str] | None, config: Any) -> Iterator[TextIO]:
    if sql_dir is None:
        buffer: TextIO = config.output_buffer or sys.stdout
        yield buffer
        return
    directory = Path(sql_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.sql"
    with open(path, "w", encoding="utf-8") as handle:
        yield handle
    _say(f"shard {name}: SQL written to {os.fspath(path)}")


# -- alembic-init ----------------------------------------------------------------------------


def write_project(
    directory: str | PathLike[str], topology: str | PathLike[str], *, section: str | None = None
) -> list[Path]:
    """Write ``alembic.ini``, ``env.py``, ``script.py.mako`` and ``versions/`` into
    ``directory`` for a topology file, as ``alembic init`` does for one database
    (``sqlalchemy-scale alembic-init DIR --config topology.toml``).

    The topology is checked first (it must load); existing files are never overwritten.
    """
    directory = Path(directory).absolute()
    topology_path = Path(topology).absolute()
    load_topology(topology_path, section=section).dispose()
    files = {
        directory / "alembic.ini": _ini_text(directory, topology_path, section),
        directory / "env.py": ENV_TEMPLATE,
        directory / "script.py.mako": SCRIPT_TEMPLATE,
    }
    existing = [str(path) for path in files if path.exists()]
    if existing:
        raise MigrationError(f"{existing} already exist; nothing was written")
    (directory / "versions").mkdir(parents=True, exist_ok=True)
    for path, content in files.items():
        path.write_text(content, encoding="utf-8")
    return [*files, directory / "versions"]


def _ini_text(directory: Path, topology: Path, section: str | None) -> str:
    try:
        where = "%(here)s/" + topology.relative_to(directory).as_posix()
    except ValueError:
        where = os.path.relpath(topology, directory)
        where = "%(here)s/" + Path(where).as_posix()
    where = where.replace("%(here)s", "\0").replace("%", "%%").replace("\0", "%(here)s")
    lines = [
        "# Written by `sqlalchemy-scale alembic-init`: every command runs on each shard's primary.",
        "[alembic]",
        "script_location = %(here)s",
        "prepend_sys_path = .",
        "path_separator = os",
        f"{TOPOLOGY_OPTION} = {where}",
        f"{SECTION_OPTION} = {section or ''}",
        "",
        "[loggers]",
        "keys = root,sqlalchemy,alembic",
        "",
        "[handlers]",
        "keys = console",
        "",
        "[formatters]",
        "keys = generic",
        "",
        "[logger_root]",
        "level = WARNING",
        "handlers = console",
        "qualname =",
        "",
        "[logger_sqlalchemy]",
        "level = WARNING",
        "handlers =",
        "qualname = sqlalchemy.engine",
        "",
        "[logger_alembic]",
        "level = INFO",
        "handlers =",
        "qualname = alembic",
        "",
        "[handler_console]",
        "class = StreamHandler",
        "args = (sys.stderr,)",
        "level = NOTSET",
        "formatter = generic",
        "",
        "[formatter_generic]",
        "format = %(levelname)-5.5s [%(name)s] %(message)s",
        "datefmt = %H:%M:%S",
        "",
    ]
    return "\n".join(lines)


ENV_TEMPLATE = '''\
"""Alembic environment for a sqlalchemy-scale topology (written by `sqlalchemy-scale alembic-init`).

Every command runs on each shard's primary (never a replica), one shard after another:

    alembic upgrade head                       # every shard
    alembic -x shards=s1,s3 upgrade head       # some shards
    alembic -x concurrency=4 upgrade head      # four shards at a time
    alembic current                            # each shard's revision
    alembic upgrade head --sql [-x sql_dir=DIR]

The topology file is `sqlalchemy_scale.topology` in alembic.ini.
"""

from logging.config import fileConfig

from alembic import context

from sqlalchemy_scale.alembic import run_migrations

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)

# Your models' MetaData, for `alembic check` and `alembic revision --autogenerate`:
# from myapp.models import Base
# target_metadata = Base.metadata
target_metadata = None

run_migrations(target_metadata=target_metadata)
'''

SCRIPT_TEMPLATE = '''\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

"""
from collections.abc import Sequence

from alembic import op
import sqlalchemy as sa
${imports if imports else ""}

# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    """Upgrade schema (runs once per shard, in that shard's transaction)."""
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    """Downgrade schema (runs once per shard, in that shard's transaction)."""
    ${downgrades if downgrades else "pass"}
'''
