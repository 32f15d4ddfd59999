"""Real PostgreSQL topologies on 127.0.0.1: a primary, streaming replicas,
independent shard servers (each may have replicas) and PgBouncer.

:class:`LocalCluster` is what the test suite, the demo and users' own tests
run against. It relies on:

- ``initdb`` run once into a template data directory that is copied for every
  independent server (much faster than one ``initdb`` per server); the
  database is created in the template with ``postgres --single``;
- ``pg_basebackup -R -X stream -C -S <slot>`` for each replica (a physical
  replication slot per replica, ``primary_conninfo`` written by ``-R``), with
  the password passed in ``PGPASSWORD``, never on a command line;
- ``pg_ctl start/stop/promote -w`` and ``postmaster.pid`` for process control;
  SIGKILL is only sent to a PID whose command line names our data directory;
- ``pg_stat_replication`` joined to ``pg_replication_slots`` to know a replica
  streams, ``pg_last_wal_replay_lsn()`` to wait for replay and
  ``pg_wal_replay_pause()`` / ``pg_get_wal_replay_pause_state()`` to make lag
  deterministic;
- PgBouncer's SCRAM pass-through: the auth file holds the verifier read from
  ``pg_authid``, identical on every server because they all come from one
  template, so PgBouncer can log in to each of them as the client did.

Servers are tuned for throwaway speed (``fsync=off``, ``full_page_writes=off``,
data in ``/dev/shm`` when there is room) and must never hold data you want to
keep: do not use this to run a production database. When we are root, servers
run as the ``postgres`` (or ``nobody``) user. Clusters stop on ``stop()``, at
interpreter exit and on SIGTERM, and a later ``start()`` removes clusters whose
owning process died without cleaning up.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import URL

from sqlalchemy_scale.consistency import format_lsn, reachable_position
from sqlalchemy_scale.local import _process
from sqlalchemy_scale.local._process import RunAs
from sqlalchemy_scale.local.binaries import PgBinaries, find_binaries, find_pgbouncer

__all__ = ["ClusterError", "LocalCluster", "PgBouncerNode", "PgNode", "PoolMode", "StopMode"]

log = logging.getLogger("sqlalchemy_scale.local")

PoolMode = Literal["transaction", "session"]
StopMode = Literal["fast", "immediate", "smart"]

HOST = "127.0.0.1"
BASE_DIR_PREFIX = "sqlalchemy-scale-"
KEEP_ENV = "SQLALCHEMY_SCALE_KEEP"
_LOG_NAME = "postgres.log"
_NODE_CONF = "node.conf"
_OWNER_FILE = "owner.pid"
# Unix socket paths are limited to 107 bytes; ".s.PGSQL.65535.lock" needs 20.
_MAX_SOCKET_DIR = 80
_PORT_ATTEMPTS = 3
_SHM = Path("/dev/shm")
_SHM_MIN_FREE = 2 << 30

# Appended to every server's postgresql.conf (in the template, so copies and
# base backups inherit it). Throwaway speed first, then what replication,
# two-phase commit and the lag tests need.
_BASE_SETTINGS: dict[str, str] = {
    "listen_addresses": f"'{HOST}'",
    "fsync": "off",
    # Left on (PostgreSQL's default): with it off, WAL reaches replicas only when the WAL
    # writer flushes (every wal_writer_delay, 200 ms), which would make replication lag here
    # far worse than on a production server. fsync=off already makes commits cheap.
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    # Segments live in the data dir (removed with it), not as /dev/shm/PostgreSQL.* files
    # that a killed server (the fault tests kill servers) would leave behind.
    "dynamic_shared_memory_type": "mmap",
    "max_connections": "100",
    "max_prepared_transactions": "20",  # two-phase commit across shards
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    # Concurrent base backups each force a checkpoint, which could remove WAL
    # another backup still streams before its slot exists.
    "wal_keep_size": "64MB",
    # Bound the WAL each server keeps: the data may live in RAM (/dev/shm).
    "min_wal_size": "32MB",
    "max_wal_size": "256MB",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "wal_receiver_status_interval": "1s",
    "wal_retrieve_retry_interval": "500ms",  # replicas reconnect quickly after a restart
    "log_min_messages": "warning",
    "logging_collector": "off",
    "password_encryption": "'scram-sha-256'",
}

_HBA = """\
# written by sqlalchemy_scale.local: passwords over TCP, trust only on the
# unix socket, whose directory is private to the server's user
local   all          all                  trust
local   replication  all                  trust
host    all          all   127.0.0.1/32   scram-sha-256
host    replication  all   127.0.0.1/32   scram-sha-256
"""


class ClusterError(RuntimeError):
    """A local server or PgBouncer could not be set up, started, stopped or reached.

    The message names the node and its data directory and, when a server did
    not start, ends with the last lines of its log. It never holds a password.
    """


# --- shared runtime ---------------------------------------------------------


@dataclass(eq=False)
class _Runtime:
    """What every node of one cluster shares: programs, account, credentials."""

    binaries: PgBinaries
    run_as: RunAs | None
    base_dir: Path
    socket_dir: Path
    user: str
    database: str
    password: str = field(repr=False)

    def run(
        self,
        args: Sequence[str],
        *,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        try:
            return _process.run_program(
                args, run_as=self.run_as, cwd=self.base_dir, timeout=timeout, env=env, input=input
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(
                f"{Path(args[0]).name} did not finish within {timeout:.0f}s "
                f"({' '.join(args[1:3])} ...)"
            ) from exc
        except OSError as exc:
            raise ClusterError(self.cannot_run(args[0], exc)) from exc

    def cannot_run(self, program: str, exc: OSError) -> str:
        who = f" as user {self.run_as.name}" if self.run_as else ""
        hint = (
            f"; as root, servers run as {self.run_as.name}, who must be able to reach and run it"
            if self.run_as
            else ""
        )
        return f"could not run {program}{who}: {exc}{hint}"

    def program(self, name: str) -> str:
        return self.binaries.path(name)

    def write(self, path: Path, text: str, mode: int = 0o600) -> None:
        path.write_text(text)
        path.chmod(mode)
        _process.chown_tree(path, self.run_as)

    def url(self, port: int, driver: str, database: str | None) -> URL:
        return URL.create(
            f"postgresql+{driver}" if driver else "postgresql",
            username=self.user,
            password=self.password,
            host=HOST,
            port=port,
            database=database or self.database,
        )

    def connect(self, port: int, database: str, *, timeout: int = 5) -> Any:
        """An autocommit DB-API connection (psycopg2, else psycopg 3) as the cluster user."""
        return _process.connect(HOST, port, self.user, self.password, database, timeout=timeout)


# --- PostgreSQL node --------------------------------------------------------


class PgNode:
    """One PostgreSQL server of a :class:`LocalCluster`: a primary, a shard or a replica.

    Nodes are created by the cluster; their methods drive the real server
    (``pg_ctl``) and ask it questions over TCP as the cluster's superuser.
    """

    def __init__(
        self,
        name: str,
        *,
        port: int,
        data_dir: Path,
        runtime: _Runtime,
        upstream: PgNode | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.host = HOST
        self.data_dir = data_dir
        self.upstream = upstream
        self.is_replica = upstream is not None
        self._rt = runtime
        self._promoted = False

    def __repr__(self) -> str:
        return (
            f"<PgNode {self.name} ({self.role}) {self.host}:{self.port} data_dir={self.data_dir}>"
        )

    @property
    def role(self) -> str:
        """``primary``, ``replica of <upstream>`` or ``primary (promoted)``."""
        if self.upstream is not None:
            return f"replica of {self.upstream.name}"
        return "primary (promoted)" if self._promoted else "primary"

    # URLs ---------------------------------------------------------------

    def sa_url(self, driver: str = "psycopg2", *, database: str | None = None) -> URL:
        """SQLAlchemy URL for this server; ``driver`` as in ``postgresql+<driver>``."""
        return self._rt.url(self.port, driver, database)

    def url(self, driver: str = "psycopg2", *, database: str | None = None) -> str:
        """URL string with the password, e.g. ``postgresql+psycopg2://scale:...@127.0.0.1:PORT/app``."""
        return self.sa_url(driver, database=database).render_as_string(hide_password=False)

    # process control ----------------------------------------------------

    @property
    def log_file(self) -> Path:
        """The server's log (``pg_ctl -l``), inside the data directory."""
        return self.data_dir / _LOG_NAME

    @property
    def pid(self) -> int | None:
        """PID of the running postmaster, or None."""
        pid = _process.read_pid(self.data_dir / "postmaster.pid")
        if pid is not None and _process.pid_matches(pid, str(self.data_dir)):
            return pid
        return None

    def is_running(self) -> bool:
        """True if a postmaster for this data directory is alive."""
        return self.pid is not None

    def start(self, *, wait: bool = True) -> None:
        """Start the server (``pg_ctl start``); with ``wait`` until it accepts connections."""
        if self.is_running():
            return
        self._clear_stale_locks()
        offset = _process.file_size(self.log_file)
        waiting = ["-w", "-t", "60"] if wait else ["-W"]
        proc = self._pg_ctl("start", "-l", str(self.log_file), *waiting, timeout=60)
        if proc.returncode != 0:
            raise ClusterError(self._describe_failure("failed to start", proc, offset))
        log.debug("started %s on port %d", self.name, self.port)

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server (``pg_ctl stop -m mode``), escalating to immediate, then SIGKILL."""
        if not self.is_running():
            self._clear_stale_locks()
            return
        proc = self._pg_ctl_stop(mode, timeout=30)
        if proc.returncode == 0 and not self.is_running():
            log.debug("stopped %s (%s)", self.name, mode)
            return
        log.warning(
            "%s: pg_ctl stop -m %s failed (%s); escalating", self.name, mode, proc.stderr.strip()
        )
        if mode != "immediate":
            self._pg_ctl_stop("immediate", timeout=15)
        if self.is_running():
            self.kill()
        if self.is_running():
            raise ClusterError(f"{self.name}: could not stop the server (data dir {self.data_dir})")

    def kill(self) -> None:
        """SIGKILL the postmaster (a simulated crash); its children exit by themselves.

        Returns once the postmaster and the children it had are gone, so that
        :meth:`start` can run crash recovery straight away.
        """
        pid = self.pid
        if pid is None:
            log.debug("kill %s: not running", self.name)
            return
        children = _process.children_of(pid)
        _process.signal_pid(pid, signal.SIGKILL)
        if not _process.wait_gone([pid, *children], timeout=15):
            raise ClusterError(
                f"{self.name}: postmaster {pid} or its children still alive 15s after SIGKILL "
                f"(data dir {self.data_dir})"
            )
        log.debug("killed %s (postmaster %d)", self.name, pid)

    def restart(self) -> None:
        """Stop (fast) and start the server."""
        self.stop()
        self.start()

    def _pg_ctl(self, command: str, *args: str, timeout: int) -> subprocess.CompletedProcess[str]:
        pg_ctl = self._rt.program("pg_ctl")
        return self._rt.run(
            [pg_ctl, command, "-D", str(self.data_dir), "-s", *args], timeout=timeout + 15
        )

    def _pg_ctl_stop(self, mode: StopMode, *, timeout: int) -> subprocess.CompletedProcess[str]:
        return self._pg_ctl("stop", "-m", mode, "-w", "-t", str(timeout), timeout=timeout)

    def _clear_stale_locks(self) -> None:
        # A postmaster killed with SIGKILL leaves its lock files behind; where
        # PID 1 does not reap orphans it is also a zombie whose PID still
        # "exists", and postgres would refuse to start over it.
        for lock in (
            self.data_dir / "postmaster.pid",
            self._rt.socket_dir / f".s.PGSQL.{self.port}.lock",
        ):
            pid = _process.read_pid(lock)
            if pid is not None and not _process.pid_matches(pid, str(self.data_dir)):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                    log.debug(
                        "%s: removed stale %s (PID %d is not ours)", self.name, lock.name, pid
                    )

    def _describe_failure(
        self, what: str, proc: subprocess.CompletedProcess[str] | None, offset: int = 0
    ) -> str:
        detail = (proc.stderr or proc.stdout).strip() if proc else ""
        lines = _process.tail(self.log_file, since=offset) or "(log is empty)"
        message = f"{self.name}: PostgreSQL {what} (port {self.port}, data dir {self.data_dir})"
        if detail:
            message += f"\n{detail}"
        return f"{message}\nlast lines of {self.log_file}:\n{lines}"

    def _address_in_use(self, offset: int) -> bool:
        text = _process.tail(self.log_file, lines=50, since=offset)
        return "could not bind" in text or "Address already in use" in text

    def _configure(self, settings: Mapping[str, str | int]) -> None:
        lines = [
            f"# written by sqlalchemy_scale.local for node {self.name}",
            f"port = {self.port}",
            _process.render_setting("cluster_name", self.name),
            _process.render_setting("unix_socket_directories", str(self._rt.socket_dir)),
            *(_process.render_setting(k, v) for k, v in settings.items()),
        ]
        self._rt.write(self.data_dir / _NODE_CONF, "\n".join(lines) + "\n")

    # replication ---------------------------------------------------------

    @property
    def slot_name(self) -> str:
        """Name of this replica's physical replication slot on its upstream."""
        return re.sub(r"[^a-z0-9_]", "_", self.name.lower())

    def _require_replica(self, action: str) -> PgNode:
        if not self.is_replica or self.upstream is None:
            raise ClusterError(f"{self.name}: {action} needs a replica, and this node is a primary")
        return self.upstream

    def pause_replay(self) -> None:
        """Pause WAL replay (``pg_wal_replay_pause()``) and wait until it is paused."""
        self._require_replica("pause_replay")
        self.execute("SELECT pg_wal_replay_pause()")
        if self._rt.binaries.version >= 14:
            check = "SELECT pg_get_wal_replay_pause_state() = 'paused'"
        else:
            check = "SELECT pg_is_wal_replay_paused()"
        if not _process.wait_until(lambda: bool(self.execute(check)[0][0]), timeout=10):
            raise ClusterError(
                f"{self.name}: WAL replay still not paused after 10s (data dir {self.data_dir})"
            )

    def resume_replay(self) -> None:
        """Resume WAL replay (``pg_wal_replay_resume()``)."""
        self._require_replica("resume_replay")
        self.execute("SELECT pg_wal_replay_resume()")

    def promote(self) -> None:
        """Promote this replica to a primary (``pg_ctl promote -w``)."""
        self._require_replica("promote")
        proc = self._pg_ctl("promote", "-w", "-t", "60", timeout=60)
        if proc.returncode != 0:
            raise ClusterError(self._describe_failure("was not promoted", proc))
        self.is_replica = False
        self.upstream = None
        self._promoted = True
        log.info("promoted %s to primary", self.name)

    def wait_for_replay(self, lsn: str | None = None, timeout: float = 10.0) -> None:
        """Wait until this replica has replayed ``lsn``.

        :param lsn: target position; by default everything the upstream had
          flushed when called (``pg_current_wal_flush_lsn()``; the insert position
          under ``synchronous_commit=off``, so unflushed commits count). WAL that
          is inserted but not flushed (e.g. page pruning by a SELECT) is not waited
          for: it is not sent to replicas until the next flush.
        :param timeout: seconds before :class:`ClusterError`.
        """
        upstream = self._require_replica("wait_for_replay")
        target = lsn if lsn is not None else upstream._reachable_lsn()
        done = "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn"
        if not _process.wait_until(lambda: bool(self.execute(done, (target,))[0][0]), timeout):
            replayed = self.execute("SELECT pg_last_wal_replay_lsn()")[0][0]
            raise ClusterError(
                f"{self.name}: replay reached {replayed}, not {target}, within {timeout}s "
                f"(data dir {self.data_dir}; is replay paused?)"
            )

    def _reachable_lsn(self) -> str:
        lsn, block = self.execute(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " WHEN current_setting('synchronous_commit') = 'off' THEN pg_current_wal_insert_lsn()"
            " ELSE pg_current_wal_flush_lsn() END, current_setting('wal_block_size')::int"
        )[0]
        # A position just past a fresh page's header is the page boundary to a replica.
        return format_lsn(reachable_position(lsn, block))

    def wait_for_streaming(self, timeout: float = 30.0) -> None:
        """Wait until the upstream's ``pg_stat_replication`` shows this replica streaming."""
        upstream = self._require_replica("wait_for_streaming")
        sql = (
            "SELECT r.state FROM pg_replication_slots s"
            " JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = %s"
        )
        last_error: list[str] = []

        def streaming() -> bool:
            if not self.is_running():
                raise ClusterError(
                    self._describe_failure("stopped while waiting for streaming", None)
                )
            try:
                rows = upstream.execute(sql, (self.slot_name,))
            except Exception as exc:  # upstream restarting: keep waiting
                last_error[:] = [str(exc).strip()]
                return False
            return bool(rows) and rows[0][0] == "streaming"

        if not _process.wait_until(streaming, timeout, interval=0.1):
            why = f"; last error from {upstream.name}: {last_error[0]}" if last_error else ""
            raise ClusterError(
                self._describe_failure(
                    f"is not streaming from {upstream.name} (slot {self.slot_name}) after {timeout:.0f}s{why}",
                    None,
                )
            )

    # SQL -------------------------------------------------------------------

    def execute(
        self,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        database: str | None = None,
    ) -> list[tuple[Any, ...]]:
        """Run one statement on a short-lived autocommit connection; return its rows."""
        conn = self._rt.connect(self.port, database or self._rt.database)
        return _process.query(conn, sql, params)


# --- PgBouncer --------------------------------------------------------------


class PgBouncerNode:
    """PgBouncer in front of the cluster's servers, run as our child process.

    Database ``app`` (the cluster's database) reaches the primary; a database
    named after a node (``shard0``, ``replica1``...) reaches that server.
    """

    def __init__(
        self, *, port: int, mode: PoolMode, config_path: Path, program: str, runtime: _Runtime
    ) -> None:
        self.port = port
        self.host = HOST
        self.mode: PoolMode = mode
        self.config_path = config_path
        self._program = program
        self._rt = runtime
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<PgBouncerNode {self.mode} {self.host}:{self.port} config={self.config_path}>"

    @property
    def log_file(self) -> Path:
        return self.config_path.with_name("pgbouncer.log")

    @property
    def pidfile(self) -> Path:
        return self.config_path.with_name("pgbouncer.pid")

    @property
    def pid(self) -> int | None:
        """PID of the running PgBouncer, or None."""
        return self._proc.pid if self.is_running() and self._proc else None

    def sa_url(self, driver: str = "psycopg2", *, database: str | None = None) -> URL:
        """SQLAlchemy URL through PgBouncer; ``database`` is ``app`` or a node name."""
        return self._rt.url(self.port, driver, database)

    def url(self, driver: str = "psycopg2", *, database: str | None = None) -> str:
        """URL string with the password through PgBouncer."""
        return self.sa_url(driver, database=database).render_as_string(hide_password=False)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start PgBouncer in the foreground as our child and wait until a query passes through it."""
        if self.is_running():
            return
        offset = _process.file_size(self.log_file)
        kwargs = self._rt.run_as.popen_kwargs() if self._rt.run_as else {}
        with self.log_file.open("ab") as log_fh:
            _process.chown_tree(self.log_file, self._rt.run_as)
            try:
                self._proc = subprocess.Popen(
                    [self._program, str(self.config_path)],
                    cwd=self.config_path.parent,
                    env=_process.program_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop it
                    **kwargs,
                )
            except OSError as exc:
                raise ClusterError("pgbouncer: " + self._rt.cannot_run(self._program, exc)) from exc
        last_error: list[str] = []

        def answers() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                raise ClusterError(self._describe_failure("exited during startup", offset))
            try:
                rows = _process.query(
                    self._rt.connect(self.port, self._rt.database, timeout=2), "SELECT 1", None
                )
            except Exception as exc:
                last_error[:] = [str(exc).strip()]
                return False
            return rows == [(1,)]

        if not _process.wait_until(answers, timeout=15, interval=0.1):
            self.kill()
            why = last_error[0] if last_error else "no answer"
            raise ClusterError(
                self._describe_failure(f"did not answer SELECT 1 within 15s ({why})", offset)
            )
        log.debug("started pgbouncer (%s) on port %d", self.mode, self.port)

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL after 10 s)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("pgbouncer %d ignored SIGTERM for 10s; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout=10)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL PgBouncer (a simulated crash)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def admin(self, command: str) -> list[tuple[Any, ...]]:
        """Run an admin console command (``SHOW POOLS``, ``RELOAD``...) and return its rows."""
        return _process.query(self._rt.connect(self.port, "pgbouncer"), command, None)

    def _address_in_use(self, offset: int) -> bool:
        return "Address already in use" in _process.tail(self.log_file, lines=50, since=offset)

    def _describe_failure(self, what: str, offset: int = 0) -> str:
        lines = _process.tail(self.log_file, since=offset) or "(log is empty)"
        return (
            f"pgbouncer: {what} (port {self.port}, config {self.config_path})\n"
            f"last lines of {self.log_file}:\n{lines}"
        )


# --- the cluster ------------------------------------------------------------


class LocalCluster:
    """A throwaway PostgreSQL topology on 127.0.0.1, started and stopped as one.

    :param replicas: streaming replicas of the primary (``replica1``...).
    :param shards: independent servers ``shard0``... besides the primary.
    :param shard_replicas: ``{shard_index: count}`` streaming replicas per
      shard, named ``shard0-replica1``...
    :param pgbouncer: run PgBouncer in front of every server; True means
      ``"transaction"`` pooling.
    :param base_dir: directory for data dirs, sockets and configs; by default
      a new ``sqlalchemy-scale-*`` directory removed by :meth:`stop` (kept
      when ``SQLALCHEMY_SCALE_KEEP=1``), in ``/dev/shm`` when it has 2 GiB
      free and ``TMPDIR`` is not set (copying data directories on a tmpfs
      makes start-up several times faster), else in the temporary directory.
    :param user: superuser created in every server.
    :param password: its password; random by default.
    :param database: database created in every server.
    :param settings: extra ``postgresql.conf`` settings for every server,
      e.g. ``{"max_connections": 40}``.
    :param pgbouncer_settings: extra ``[pgbouncer]`` settings, e.g.
      ``{"default_pool_size": 5}``. PgBouncer logs in to servers with the
      SCRAM keys of a client that logged in to it, so ``min_pool_size``
      connections only open after the first client has connected.
    :param binaries: PostgreSQL programs to use; :func:`find_binaries` by default.
    """

    def __init__(
        self,
        *,
        replicas: int = 2,
        shards: int = 0,
        shard_replicas: Mapping[int, int] | None = None,
        pgbouncer: bool | PoolMode = False,
        base_dir: str | Path | None = None,
        user: str = "scale",
        password: str | None = None,
        database: str = "app",
        settings: Mapping[str, str | int] | None = None,
        pgbouncer_settings: Mapping[str, str | int] | None = None,
        binaries: PgBinaries | None = None,
    ) -> None:
        if replicas < 0 or shards < 0:
            raise ValueError("replicas and shards must be >= 0")
        shard_replicas = dict(shard_replicas or {})
        for index, count in shard_replicas.items():
            if not 0 <= index < shards:
                raise ValueError(
                    f"shard_replicas names shard {index}, but there are {shards} shards"
                )
            if count < 0:
                raise ValueError(f"shard_replicas[{index}] must be >= 0")
        if pgbouncer not in (False, True, "transaction", "session"):
            raise ValueError(
                f"pgbouncer must be a bool, 'transaction' or 'session', not {pgbouncer!r}"
            )
        if not user or not database:
            raise ValueError("user and database must not be empty")
        _process.check_setting_names(settings or {}, "settings")
        _process.check_setting_names(pgbouncer_settings or {}, "pgbouncer_settings")

        self.replica_count = replicas
        self.shard_count = shards
        self.shard_replica_counts = shard_replicas
        self.pool_mode: PoolMode | None = (
            None if pgbouncer is False else "transaction" if pgbouncer is True else pgbouncer
        )
        self.user = user
        self.database = database
        self._password = password if password is not None else secrets.token_urlsafe(18)
        self.settings: dict[str, str | int] = dict(settings or {})
        self.pgbouncer_settings: dict[str, str | int] = dict(pgbouncer_settings or {})
        self._binaries = binaries
        self._requested_base_dir = Path(base_dir) if base_dir is not None else None

        self.base_dir: Path | None = None
        self._created_base_dir = False
        self._own_socket_dir: Path | None = None
        self._primary: PgNode | None = None
        self.replicas: list[PgNode] = []
        self.shards: list[PgNode] = []
        self.shard_replicas: dict[int, list[PgNode]] = {}
        self.pgbouncer: PgBouncerNode | None = None
        self._started = False
        self._lock = threading.RLock()

    # public surface ------------------------------------------------------

    @property
    def password(self) -> str:
        """The superuser's password (also inside every URL)."""
        return self._password

    @property
    def primary(self) -> PgNode:
        if self._primary is None:
            raise ClusterError("the cluster is not started; call start() first")
        return self._primary

    @property
    def nodes(self) -> list[PgNode]:
        """Every PostgreSQL node: primary, its replicas, then each shard and its replicas."""
        if self._primary is None:
            return []
        nodes = [self._primary, *self.replicas]
        for index, shard in enumerate(self.shards):
            nodes += [shard, *self.shard_replicas.get(index, [])]
        return nodes

    @property
    def is_started(self) -> bool:
        return self._started

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f" base_dir={self.base_dir}" if self.base_dir else ""
        state = "started" if self._started else "stopped"
        return (
            f"<LocalCluster {state} replicas={self.replica_count} shards={self.shard_count}"
            f" pgbouncer={self.pool_mode}{where}>"
        )

    def describe(self) -> str:
        """A table of the nodes: name, role, port and data directory."""
        if self._primary is None:
            return repr(self)
        rows = [("node", "role", "port", "data dir")]
        rows += [(n.name, n.role, str(n.port), str(n.data_dir)) for n in self.nodes]
        if (bouncer := self.pgbouncer) is not None:
            rows.append(
                (
                    "pgbouncer",
                    f"{bouncer.mode} pooling",
                    str(bouncer.port),
                    str(bouncer.config_path),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=False))
            + "  "
            + row[3]
            for row in rows
        )

    def start(self) -> LocalCluster:
        """Create and start every server (and PgBouncer); a no-op if already started."""
        with self._lock:
            if self._started:
                return self
            began = time.monotonic()
            binaries = self._binaries or find_binaries()
            bouncer_program = None
            if self.pool_mode is not None:
                bouncer_program = find_pgbouncer()
                if bouncer_program is None:
                    raise ClusterError(
                        "PgBouncer was requested but not found: `apt-get install pgbouncer`, "
                        "or set SQLALCHEMY_SCALE_PGBOUNCER to its path."
                    )
            reap_leaked_clusters(binaries)
            runtime = self._prepare_base_dir(binaries)
            _process.stop_at_exit(self)
            try:
                self._build(runtime, bouncer_program)
            except BaseException:
                try:
                    self._teardown()
                except ClusterError:
                    log.exception("cleaning up after a failed start")
                raise
            self._started = True
            log.info("cluster started in %.1fs:\n%s", time.monotonic() - began, self.describe())
            return self

    def stop(self) -> None:
        """Stop everything this cluster started and remove its base_dir if it created it."""
        with self._lock:
            self._teardown()

    # building -----------------------------------------------------------

    def _prepare_base_dir(self, binaries: PgBinaries) -> _Runtime:
        try:
            run_as = _process.unprivileged_user()
        except LookupError as exc:
            raise ClusterError(f"cannot start PostgreSQL: {exc}") from exc
        if self._requested_base_dir is None:
            base = Path(tempfile.mkdtemp(prefix=BASE_DIR_PREFIX, dir=_scratch_root()))
            self._created_base_dir = True
        else:
            base = Path(os.path.abspath(self._requested_base_dir))
            base.mkdir(parents=True, exist_ok=True)
            if (base / "primary").exists():
                raise ClusterError(f"{base} already holds a cluster; choose an empty base_dir")
            self._created_base_dir = False
        self.base_dir = base
        (base / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        socket_dir = base / "s"
        if len(str(socket_dir)) > _MAX_SOCKET_DIR:
            socket_dir = Path(tempfile.mkdtemp(prefix="sqsc-", dir="/tmp"))
            self._own_socket_dir = socket_dir
        else:
            socket_dir.mkdir(mode=0o700, exist_ok=True)
        socket_dir.chmod(0o700)  # the unix socket trusts whoever can reach it
        _process.chown_tree(base, run_as)
        _process.chown_tree(socket_dir, run_as)
        return _Runtime(
            binaries=binaries,
            run_as=run_as,
            base_dir=base,
            socket_dir=socket_dir,
            user=self.user,
            database=self.database,
            password=self._password,
        )

    def _build(self, rt: _Runtime, bouncer_program: str | None) -> None:
        ports = iter(_process.free_ports(len(self._node_plan()) + (1 if bouncer_program else 0)))
        primaries: list[PgNode] = []
        replicas: list[PgNode] = []
        for name, upstream_name in self._node_plan():
            upstream = next((n for n in primaries if n.name == upstream_name), None)
            node = PgNode(
                name, port=next(ports), data_dir=rt.base_dir / name, runtime=rt, upstream=upstream
            )
            (replicas if upstream else primaries).append(node)
            if name == "primary":
                self._primary = node
            elif name.startswith("replica"):
                self.replicas.append(node)
            elif upstream is None:
                self.shards.append(node)
            else:
                self.shard_replicas.setdefault(len(self.shards) - 1, []).append(node)

        began = time.monotonic()
        template = rt.base_dir / "template"
        self._init_template(rt, template)
        log.debug("template ready after %.1fs", time.monotonic() - began)
        # Each independent server, then its replicas; the groups run side by side.
        groups = [(n, [r for r in replicas if r.upstream is n]) for n in primaries]
        _process.parallel([functools.partial(self._start_group, *g, template) for g in groups])
        shutil.rmtree(template)
        log.debug("%d servers up after %.1fs", len(primaries + replicas), time.monotonic() - began)

        if bouncer_program is not None:
            assert self.pool_mode is not None
            bouncer_dir = rt.base_dir / "pgbouncer"
            bouncer_dir.mkdir(mode=0o700)
            _process.chown_tree(bouncer_dir, rt.run_as)
            self.pgbouncer = PgBouncerNode(
                port=next(ports),
                mode=self.pool_mode,
                config_path=bouncer_dir / "pgbouncer.ini",
                program=bouncer_program,
                runtime=rt,
            )
            self._start_pgbouncer(rt)

    def _node_plan(self) -> list[tuple[str, str | None]]:
        plan: list[tuple[str, str | None]] = [("primary", None)]
        plan += [(f"replica{i}", "primary") for i in range(1, self.replica_count + 1)]
        for shard in range(self.shard_count):
            plan.append((f"shard{shard}", None))
            count = self.shard_replica_counts.get(shard, 0)
            plan += [(f"shard{shard}-replica{i}", f"shard{shard}") for i in range(1, count + 1)]
        return plan

    def _init_template(self, rt: _Runtime, template: Path) -> None:
        pwfile = rt.base_dir / "pwfile"
        rt.write(pwfile, rt.password + "\n")
        try:
            proc = rt.run(
                [
                    rt.program("initdb"), "-D", str(template), "-U", rt.user, f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256", "--auth-local=trust",
                    "--encoding=UTF8", "--locale=C", "--no-sync",
                ],
                timeout=120,
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise ClusterError(
                f"template: initdb failed (data dir {template}):\n{(proc.stderr or proc.stdout).strip()}"
            )
        conf = template / "postgresql.conf"
        extra = "\n".join(f"{k} = {v}" for k, v in _BASE_SETTINGS.items())
        with conf.open("a") as fh:
            fh.write(f"\n# sqlalchemy_scale.local\n{extra}\ninclude '{_NODE_CONF}'\n")
        rt.write(template / "pg_hba.conf", _HBA)
        rt.write(template / _NODE_CONF, "# replaced in every node\n")
        # Single-user mode creates the database without starting a server.
        quoted = '"' + rt.database.replace('"', '""') + '"'
        proc = rt.run(
            [rt.program("postgres"), "--single", "-D", str(template), "postgres"],
            input=f"CREATE DATABASE {quoted};\n",
            timeout=60,
        )
        if proc.returncode != 0 or "ERROR:" in proc.stdout + proc.stderr:
            raise ClusterError(
                f"template: CREATE DATABASE {quoted} failed (data dir {template}):\n"
                f"{(proc.stderr + proc.stdout).strip()[-2000:]}"
            )

    def _start_group(self, server: PgNode, replicas: list[PgNode], template: Path) -> None:
        shutil.copytree(template, server.data_dir, symlinks=True)
        _process.chown_tree(server.data_dir, server._rt.run_as)
        self._start_claiming_port(server)
        _process.parallel([functools.partial(self._start_replica, r) for r in replicas])

    def _start_replica(self, node: PgNode) -> None:
        upstream, rt = node.upstream, node._rt
        assert upstream is not None
        proc = rt.run(
            [
                rt.program("pg_basebackup"), "-h", HOST, "-p", str(upstream.port), "-U", rt.user,
                "-D", str(node.data_dir), "-R", "-X", "stream", "-C", "-S", node.slot_name,
                "-c", "fast", "--no-sync",
            ],
            env={"PGPASSWORD": rt.password},
            timeout=120,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ClusterError(
                f"{node.name}: pg_basebackup from {upstream.name} (port {upstream.port}) failed "
                f"(data dir {node.data_dir}):\n{(proc.stderr or proc.stdout).strip()}"
            )
        node.log_file.unlink(missing_ok=True)  # the upstream's log came along
        self._start_claiming_port(node)
        node.wait_for_streaming()

    def _start_claiming_port(self, node: PgNode) -> None:
        # Ports are chosen before servers bind them; another process (a
        # parallel test session) can take one in between, so pick again.
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            node._configure(self.settings)
            offset = _process.file_size(node.log_file)
            try:
                node.start()
                return
            except ClusterError:
                if attempt == _PORT_ATTEMPTS or not node._address_in_use(offset):
                    raise
                old, node.port = node.port, _process.free_ports(1)[0]
                log.info("%s: port %d was taken; retrying on %d", node.name, old, node.port)

    def _start_pgbouncer(self, rt: _Runtime) -> None:
        bouncer = self.pgbouncer
        assert bouncer is not None
        verifier = self.primary.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (rt.user,)
        )[0][0]
        rt.write(
            bouncer.config_path.with_name("userlist.txt"), f'"{_ini_quote(rt.user)}" "{verifier}"\n'
        )
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            rt.write(bouncer.config_path, self._pgbouncer_ini(bouncer))
            offset = _process.file_size(bouncer.log_file)
            try:
                bouncer.start()
                return
            except ClusterError:
                if attempt == _PORT_ATTEMPTS or not bouncer._address_in_use(offset):
                    raise
                bouncer.port = _process.free_ports(1)[0]

    def _pgbouncer_ini(self, bouncer: PgBouncerNode) -> str:
        databases = {self.database: self.primary}
        databases.update({node.name: node for node in self.nodes})
        settings: dict[str, str | int] = {
            "listen_addr": HOST,
            "listen_port": bouncer.port,
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": str(bouncer.config_path.with_name("userlist.txt")),
            "admin_users": self.user,
            "pool_mode": bouncer.mode,
            "default_pool_size": 10,
            "max_client_conn": 500,
            "server_reset_query": "DISCARD ALL",
            "ignore_startup_parameters": "extra_float_digits,options",
            "server_login_retry": 1,  # a restarted server is usable again within a second
            "pidfile": str(bouncer.pidfile),
            **self.pgbouncer_settings,
        }
        lines = ["; written by sqlalchemy_scale.local", "[databases]"]
        lines += [
            f"{name} = host={HOST} port={node.port} dbname={self.database}"
            for name, node in databases.items()
        ]
        lines += ["", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        return "\n".join(lines) + "\n"

    # stopping ----------------------------------------------------------

    def _teardown(self) -> None:
        errors: list[BaseException] = []
        if self.pgbouncer is not None:
            try:
                self.pgbouncer.stop()
            except Exception as exc:
                errors.append(exc)
        nodes = self.nodes
        # Replicas first, so no walsender waits for them during a primary's shutdown.
        for group in ([n for n in nodes if n.is_replica], [n for n in nodes if not n.is_replica]):
            errors += _process.parallel([n.stop for n in group], collect=True)
        _process.forget_at_exit(self)
        if self.base_dir is not None:
            self._remove_dirs(
                keep=bool(errors) or os.environ.get(KEEP_ENV) == "1", failed=bool(errors)
            )
        self._started = False
        self._primary = None
        self.replicas, self.shards, self.shard_replicas, self.pgbouncer = [], [], {}, None
        if errors:
            raise ClusterError(
                "could not stop every server: " + "; ".join(str(e) for e in errors)
            ) from errors[0]

    def _remove_dirs(self, *, keep: bool, failed: bool = False) -> None:
        base = self.base_dir
        assert base is not None
        if self._own_socket_dir is not None:
            shutil.rmtree(self._own_socket_dir, ignore_errors=True)
            self._own_socket_dir = None
        if keep:
            # Without owner.pid, reap_leaked_clusters leaves the directory alone: right for a
            # directory kept on request, wrong after a failed stop, whose servers may still
            # run; then owner.pid stays, and once this process is gone a later start() reaps.
            if not failed:
                (base / _OWNER_FILE).unlink(missing_ok=True)
            print(f"sqlalchemy-scale: kept cluster directory {base}", file=sys.stderr)
            log.warning("kept cluster directory %s", base)
        elif self._created_base_dir:
            shutil.rmtree(base, ignore_errors=True)
        else:
            (base / _OWNER_FILE).unlink(missing_ok=True)
        self.base_dir = None


def _ini_quote(value: str) -> str:
    return value.replace('"', '""')


# --- leaked clusters, atexit and signals -------------------------------------


def reap_leaked_clusters(
    binaries: PgBinaries | None = None, tmp_dir: Path | None = None
) -> list[Path]:
    """Stop and remove ``sqlalchemy-scale-*`` clusters whose owning process is dead.

    Called by :meth:`LocalCluster.start`. Clusters of live processes (parallel
    test sessions) and directories kept with ``SQLALCHEMY_SCALE_KEEP=1`` are
    left alone. PIDs are checked against their command line before any signal.

    :param binaries: ``pg_ctl`` to stop servers with; without it they get SIGKILL.
    :param tmp_dir: where to look; by default ``/dev/shm`` and
      :func:`tempfile.gettempdir`, where :class:`LocalCluster` creates them.
    :return: the directories removed.
    """
    roots = (
        [tmp_dir]
        if tmp_dir
        else list(dict.fromkeys([_scratch_root(), _SHM, Path(tempfile.gettempdir())]))
    )
    pg_ctl = binaries.path("pg_ctl") if binaries else None
    removed: list[Path] = []
    for root in roots:
        if root.is_dir():
            removed += _process.reap_dead_owner_dirs(
                root, f"{BASE_DIR_PREFIX}*", _OWNER_FILE, pg_ctl
            )
    return removed


def _scratch_root() -> Path:
    """Where new cluster directories go: /dev/shm when it is roomy and TMPDIR is unset."""
    if "TMPDIR" not in os.environ:
        try:
            st = os.statvfs(_SHM)
        except OSError:
            pass
        else:
            if st.f_bavail * st.f_frsize >= _SHM_MIN_FREE and os.access(_SHM, os.W_OK | os.X_OK):
                return _SHM
    return Path(tempfile.gettempdir())
