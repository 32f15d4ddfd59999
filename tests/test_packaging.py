"""What ships: the typed marker, the public surface, the version and the entry points."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import sqlalchemy_scale as ss

ROOT = Path(__file__).resolve().parent.parent


def test_py_typed_is_shipped() -> None:
    """The installed package carries py.typed, so type checkers use its annotations."""
    assert importlib.resources.files("sqlalchemy_scale").joinpath("py.typed").is_file()


def test_public_surface_is_importable() -> None:
    """Every name in __all__ exists, once (ruff's RUF022 keeps the list sorted)."""
    assert len(set(ss.__all__)) == len(ss.__all__)
    missing = [name for name in ss.__all__ if not hasattr(ss, name)]
    assert missing == []


def test_version_and_entry_points() -> None:
    """The version comes from the installed metadata; the CLI and pytest plugin are registered."""
    assert ss.__version__ == importlib.metadata.version("sqlalchemy-scale")
    entry_points = importlib.metadata.entry_points()
    scripts = {ep.name: ep.value for ep in entry_points.select(group="console_scripts")}
    plugins = {ep.name: ep.value for ep in entry_points.select(group="pytest11")}
    assert scripts["sqlalchemy-scale"] == "sqlalchemy_scale.cli:main"
    assert plugins["sqlalchemy_scale"] == "sqlalchemy_scale.testing"


def _distributions_required(names: set[str]) -> set[str]:
    """``names`` (canonical distribution names) and everything they require, extras aside."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # a dependency whose marker excludes this platform
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def test_importing_the_package_needs_only_its_core_dependencies() -> None:
    """Every third-party module that ``import sqlalchemy_scale`` loads comes from a core
    dependency in pyproject.toml (or one of theirs), not from an extra: a plain
    ``pip install sqlalchemy-scale`` imports (greenlet for the async sessions was missing)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import sqlalchemy_scale\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout)) - set(sys.stdlib_module_names) - {"sqlalchemy_scale"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = {canonicalize_name(Requirement(r).name) for r in pyproject["project"]["dependencies"]}
    allowed = _distributions_required(core)
    providers = importlib.metadata.packages_distributions()
    # Modules no distribution provides (the stdlib's C parts, Cython's cython_runtime) aside.
    outside = {
        module: providers[module]
        for module in sorted(loaded)
        if module in providers and not {canonicalize_name(d) for d in providers[module]} & allowed
    }
    assert outside == {}
