"""Atomic file writes (temp file or folder beside the target, then ``os.replace``) and environment facts.

Nothing half-written is ever left at the target path: a crash leaves either the old content or none.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def default_mode(path: str | Path, folder: bool = False) -> None:
    """Give a temp file (0600) or folder (0700) the mode a plain ``open`` / ``mkdir`` would: 0666 / 0777 & ~umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written atomically (``metadata={"format": "pt"}`` as PEFT and transformers write it)."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_folder(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Create folder ``path`` by ``write(tmp)`` into a temporary sibling folder, then renaming it into place.

    An existing ``path`` is refused unless ``overwrite``; then it is replaced only after ``write`` succeeded.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"Output folder {str(path)!r} already exists. Choose another folder, or pass overwrite=True "
            "(--overwrite on the command line) to replace it."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        write(tmp)
        default_mode(tmp, folder=True)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".old-{path.name}-"))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("peft-cp-merge", "torch", "peft", "transformers", "accelerate", "tensorly", "sentence-transformers",
                 "scikit-learn", "safetensors", "huggingface-hub"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
