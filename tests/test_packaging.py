"""What ships: the typed marker, the public surface, the version and the entry points."""

from __future__ import annotations

import importlib.metadata
import importlib.resources

import sqlalchemy_scale as ss


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
