"""The package version: the installed distribution's (``pyproject.toml`` is its one source), read from its metadata
without importing anything heavy."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("peft-cp-merge")
    except PackageNotFoundError:  # a source tree that was never installed has no metadata
        return "0+unknown"


__version__ = _version()
