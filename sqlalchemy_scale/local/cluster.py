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

import functools
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy_scale.local import _process
from sqlalchemy_scale.local._runtime import (
    HOST,
    ClusterError,
    PoolMode,
    Runtime,
    StopMode,
)
from sqlalchemy_scale.local.binaries import PgBinaries, find_binaries, find_pgbouncer
from sqlalchemy_scale.local.pgbouncer import PgBouncerNode
from sqlalchemy_scale.local.postgres import NODE_CONF, PgNode

# ClusterError, PgNode, PgBouncerNode, PoolMode and StopMode live in their own modules and
# are re-exported here, where they were first defined.
__all__ = ["ClusterError", "LocalCluster", "PgBouncerNode", "PgNode", "PoolMode", "StopMode"]

log = logging.getLogger("sqlalchemy_scale.local")

BASE_DIR_PREFIX = "sqlalchemy-scale-"
KEEP_ENV = "SQLALCHEMY_SCALE_KEEP"
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

    def _prepare_base_dir(self, binaries: PgBinaries) -> Runtime:
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
        return Runtime(
            binaries=binaries,
            run_as=run_as,
            base_dir=base,
            socket_dir=socket_dir,
            user=self.user,
            database=self.database,
            password=self._password,
        )

    def _build(self, rt: Runtime, bouncer_program: str | None) -> None:
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

    def _init_template(self, rt: Runtime, template: Path) -> None:
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
            fh.write(f"\n# sqlalchemy_scale.local\n{extra}\ninclude '{NODE_CONF}'\n")
        rt.write(template / "pg_hba.conf", _HBA)
        rt.write(template / NODE_CONF, "# replaced in every node\n")
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
        _process.chown_tree(server.data_dir, server.runtime.run_as)
        self._start_claiming_port(server)
        _process.parallel([functools.partial(self._start_replica, r) for r in replicas])

    def _start_replica(self, node: PgNode) -> None:
        upstream, rt = node.upstream, node.runtime
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
            node.write_config(self.settings)
            offset = _process.file_size(node.log_file)
            try:
                node.start()
                return
            except ClusterError:
                if attempt == _PORT_ATTEMPTS or not node.address_in_use_since(offset):
                    raise
                old, node.port = node.port, _process.free_ports(1)[0]
                log.info("%s: port %d was taken; retrying on %d", node.name, old, node.port)

    def _start_pgbouncer(self, rt: Runtime) -> None:
        bouncer = self.pgbouncer
        assert bouncer is not None
        verifier = self.primary.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (rt.user,)
        )[0][0]
        rt.write(
            bouncer.config_path.with_name("userlist.txt"), bouncer.auth_file(rt.user, verifier)
        )
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            databases = {self.database: self.primary}
            databases.update({node.name: node for node in self.nodes})
            rt.write(
                bouncer.config_path,
                bouncer.config(databases, database=self.database, settings=self.pgbouncer_settings),
            )
            offset = _process.file_size(bouncer.log_file)
            try:
                bouncer.start()
                return
            except ClusterError:
                if attempt == _PORT_ATTEMPTS or not bouncer.address_in_use_since(offset):
                    raise
                bouncer.port = _process.free_ports(1)[0]

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
