"""Plumbing for the local launcher: who runs the servers, PIDs, ports, exit hooks.

PostgreSQL refuses to run as root, so when we are root every server program
runs as an unprivileged user (``postgres`` if it exists, else ``nobody``) via
``subprocess.run(user=..., group=...)``. PIDs are read from the files the
servers write (``postmaster.pid``, PgBouncer's pidfile) and checked against
``/proc/PID/cmdline`` before any signal is sent, so a recycled PID is never
signalled. A zombie counts as dead: in containers whose PID 1 does not reap
orphans, a killed postmaster stays a zombie forever.

Also here: short-lived admin connections (psycopg2, else psycopg 3), the
rendering of ``postgresql.conf`` settings, thread fan-out, stopping what a
dead process left behind, and the atexit/SIGTERM hooks. Nothing here knows
about clusters; :mod:`.cluster` composes it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger("sqlalchemy_scale.local")

_PROC = Path("/proc")
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account server programs run as when we are root."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        # extra_groups=[] drops root's supplementary groups as well.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def unprivileged_user() -> RunAs | None:
    """The account to run servers as, or None to run them as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid)
    raise LookupError("running as root and neither a 'postgres' nor a 'nobody' user exists")


def owner_of(path: Path) -> RunAs | None:
    """RunAs for the owner of ``path`` when we are root and it is not, else None."""
    if os.geteuid() != 0:
        return None
    st = path.stat()
    if st.st_uid == 0:
        return None
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        name = str(st.st_uid)
    return RunAs(name=name, uid=st.st_uid, gid=st.st_gid)


def program_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment minus libpq's PG* variables (which would redirect the
    programs), with the C locale so server messages are predictable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    if extra:
        env.update(extra)
    return env


def run_program(
    args: Sequence[str],
    *,
    run_as: RunAs | None,
    cwd: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a program to completion, capturing its output; never raises on exit status."""
    kwargs = run_as.popen_kwargs() if run_as else {}
    return subprocess.run(
        list(args),
        cwd=cwd,
        env=program_env(env),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def chown_tree(path: Path, run_as: RunAs | None) -> None:
    """Give ``path`` and everything below it to ``run_as`` (no-op when None)."""
    if run_as is None:
        return
    os.chown(path, run_as.uid, run_as.gid)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                os.chown(os.path.join(root, name), run_as.uid, run_as.gid, follow_symlinks=False)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ask the kernel for ``count`` distinct free TCP ports on ``host``.

    All sockets stay bound until every port is chosen, so the ports differ;
    another process may still take one before our server binds it, which the
    caller handles by retrying with a fresh port.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def read_pid(path: Path) -> int | None:
    """The PID on the first line of a pidfile, or None if missing or unreadable."""
    try:
        first = path.read_text().split("\n", 1)[0].strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(first) if first.isdigit() else None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    stat_file = _PROC / str(pid) / "stat"
    if _PROC.is_dir():
        try:
            stat = stat_file.read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        except OSError:
            return True
        state = stat.rsplit(")", 1)[-1].split()[0]
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_matches(pid: int, *args: str) -> bool:
    """True if live ``pid`` was started with each of ``args`` as a whole argument
    (the program may be named by its base name).

    Without /proc (not Linux) we cannot check, and trust the pidfile.
    """
    if not _PROC.is_dir():
        return pid_alive(pid)
    try:
        argv = (_PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    names = {*argv, Path(argv[0]).name}
    return pid_alive(pid) and all(arg in names for arg in args)


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (empty without /proc)."""
    found: list[int] = []
    if not _PROC.is_dir():
        return found
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    """Wait until none of ``pids`` is alive; True if they all went away in time."""
    remaining = list(pids)
    return wait_until(lambda: not any(pid_alive(p) for p in remaining), timeout)


def signal_pid(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid``, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def tail(path: Path, lines: int = 20, since: int = 0) -> str:
    """The last ``lines`` lines of a text file from byte ``since`` on ("" if unreadable)."""
    try:
        with path.open("rb") as fh:
            fh.seek(since)
            data = fh.read()
    except OSError:
        return ""
    text = data.decode(errors="replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:])


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def parallel(
    tasks: Sequence[Callable[[], object]], *, collect: bool = False
) -> list[BaseException]:
    """Run tasks on threads; raise the first failure once all finished, or return them all.

    At interpreter exit (atexit) no new threads may start, so what could not
    be submitted runs here, one after the other.
    """
    futures: list[Future[object]] = []
    pending = list(tasks)
    if pending:
        with (
            contextlib.suppress(RuntimeError),  # "cannot schedule new futures after shutdown"
            ThreadPoolExecutor(len(pending), thread_name_prefix="sqlalchemy-scale") as pool,
        ):
            while pending:
                futures.append(pool.submit(pending[0]))
                pending.pop(0)
    errors = [exc for f in futures if (exc := f.exception()) is not None]
    for task in pending:
        try:
            task()
        except Exception as exc:
            errors.append(exc)
    if errors and not collect:
        raise errors[0]
    return errors


# --- settings and admin connections ----------------------------------------


def render_setting(name: str, value: str | int | bool) -> str:
    """One ``postgresql.conf`` line; strings are quoted, numbers and booleans are not."""
    if isinstance(value, bool):
        rendered = "on" if value else "off"
    elif isinstance(value, int):
        rendered = str(value)
    else:
        rendered = "'" + str(value).replace("'", "''") + "'"
    return f"{name} = {rendered}"


def check_setting_names(settings: Mapping[str, object], what: str) -> None:
    for name in settings:
        if not _SETTING_NAME.match(name):
            raise ValueError(f"{what}: {name!r} is not a valid setting name")


def connect(host: str, port: int, user: str, password: str, database: str, *, timeout: int) -> Any:
    """An autocommit DB-API connection: psycopg2 if installed, else psycopg 3."""
    params: dict[str, Any] = {
        "host": host,
        "port": port,
        "user": user,
        "password": password,
        "dbname": database,
        "connect_timeout": timeout,
        "application_name": "sqlalchemy-scale-local",
    }
    try:
        psycopg2 = importlib.import_module("psycopg2")
    except ImportError:
        psycopg = importlib.import_module("psycopg")
        # ClientCursor speaks the simple query protocol, which PgBouncer's
        # admin console requires.
        return psycopg.connect(**params, autocommit=True, cursor_factory=psycopg.ClientCursor)
    conn = psycopg2.connect(**params)
    conn.autocommit = True
    return conn


def query(
    conn: Any, sql: str, params: Sequence[Any] | Mapping[str, Any] | None
) -> list[tuple[Any, ...]]:
    """Run one statement on ``conn``, close it, and return the rows (``[]`` for none)."""
    try:
        cur = conn.cursor()
        try:
            cur.execute(sql, params)
            return [tuple(row) for row in cur.fetchall()] if cur.description else []
        finally:
            cur.close()
    finally:
        conn.close()


# --- what a dead process left behind -----------------------------------------


def reap_dead_owner_dirs(
    root: Path, pattern: str, owner_file: str, pg_ctl: str | None
) -> list[Path]:
    """Stop the servers in, and remove, each ``root/pattern`` directory whose
    ``owner_file`` names a dead process. Directories without it are left alone."""
    removed: list[Path] = []
    for base in root.glob(pattern):
        owner = read_pid(base / owner_file)
        if owner is None or owner == os.getpid() or pid_alive(owner):
            continue
        log.warning("removing cluster %s left by dead process %d", base, owner)
        stop_leftovers(base, pg_ctl)
        shutil.rmtree(base, ignore_errors=True)
        removed.append(base)
    return removed


def stop_leftovers(base: Path, pg_ctl: str | None) -> None:
    """Stop the PgBouncer and the servers under ``base`` by their PID files, each PID
    checked against its command line first (``pg_ctl stop -m immediate``, else SIGKILL)."""
    bouncer_pid = read_pid(base / "pgbouncer" / "pgbouncer.pid")
    config = str(base / "pgbouncer" / "pgbouncer.ini")
    if bouncer_pid is not None and pid_matches(bouncer_pid, "pgbouncer", config):
        signal_pid(bouncer_pid, signal.SIGTERM)
        if not wait_gone([bouncer_pid], timeout=5):
            signal_pid(bouncer_pid, signal.SIGKILL)
    for pidfile in base.glob("*/postmaster.pid"):
        data_dir = pidfile.parent
        pid = read_pid(pidfile)
        if pid is None or not pid_matches(pid, str(data_dir)):
            continue
        if pg_ctl is not None:
            stop = [pg_ctl, "stop", "-D", str(data_dir), "-m", "immediate", "-s", "-w", "-t", "10"]
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                run_program(stop, run_as=owner_of(data_dir), cwd=base, timeout=20)
        if pid_matches(pid, str(data_dir)):
            signal_pid(pid, signal.SIGKILL)
            wait_gone([pid], timeout=5)


# --- atexit and signals --------------------------------------------------------


class Stoppable(Protocol):
    def stop(self) -> None: ...


_live: list[Stoppable] = []
_live_lock = threading.Lock()


def _forget_in_child() -> None:
    # A forked child (multiprocessing, a test's own fork) did not start the parent's
    # clusters: at its exit or on SIGTERM it must not stop them or delete their files.
    global _live_lock
    _live_lock = threading.Lock()
    _live.clear()


os.register_at_fork(after_in_child=_forget_in_child)
_previous_handlers: dict[int, Any] = {}
_hooks_installed = False


def stop_at_exit(item: Stoppable) -> None:
    """Make sure ``item.stop()`` runs at interpreter exit or on SIGTERM/SIGINT."""
    global _hooks_installed
    with _live_lock:
        if item not in _live:
            _live.append(item)
        if _hooks_installed:
            return
        _hooks_installed = True
    atexit.register(stop_all)
    # Signal handlers can only be installed from the main thread; elsewhere
    # atexit alone has to do.
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if previous != signal.SIG_IGN:  # an ignored signal stays ignored
                _previous_handlers[signum] = previous
                signal.signal(signum, _on_signal)


def forget_at_exit(item: Stoppable) -> None:
    with _live_lock:
        if item in _live:
            _live.remove(item)


def stop_all() -> None:
    """Stop everything registered with :func:`stop_at_exit`, newest first."""
    with _live_lock:
        items = list(reversed(_live))
    for item in items:
        try:
            item.stop()
        except Exception:
            log.exception("could not stop %r", item)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    previous = _previous_handlers.get(signum)
    if callable(previous):
        # Python's SIGINT handler raises KeyboardInterrupt, which pytest
        # relies on; the unwinding and atexit then stop everything.
        previous(signum, frame)
        return
    # The default action kills the process without running atexit: clean up
    # first, then die of the same signal.
    stop_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
