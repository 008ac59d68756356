"""Atomic file writes (temp file or folder beside the target, then ``os.replace``) and environment facts.

Nothing half-written is ever left at the target path: a crash leaves either the old content or none.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
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


# --- atomic folders -------------------------------------------------------------------------------------------------
#
# A folder is written as ``.tmp.<host>.<pid>.<random>.<name>`` next to the target and renamed into place:
# - not overwriting: renamed with RENAME_NOREPLACE (Linux ``renameat2``), so a target that appeared meanwhile is
#   never replaced (FileExistsError); elsewhere a last check just before ``os.rename`` (POSIX ``rename`` would
#   replace an empty folder).
# - overwriting: the new folder and the target are swapped with RENAME_EXCHANGE (the target path always exists),
#   then the old content, now under the temporary name, is deleted. Where the exchange is not supported the old
#   target is renamed aside to ``.old.<host>.<pid>.<random>.<name>`` first; a crash between the two renames is
#   repaired by the next write (the ``.old`` folder of a dead process is renamed back).
# - a temporary or old folder left by a process that no longer runs (killed, power loss) is deleted by the next
#   write to the same target; those of other hosts (shared file systems) only after a day.

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_STALE_SECONDS = 24 * 3600
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EINVAL),
                getattr(errno, "EOPNOTSUPP", errno.EINVAL)}
_renameat2_fn: Any = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2(src, dst, flags)``: True if done, False where unsupported (other OS, old libc, a file system
    without the flag); any other failure raises the matching ``OSError`` (``FileExistsError`` for NOREPLACE)."""
    global _renameat2_fn
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2_fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2_fn = fn
        except (OSError, AttributeError):
            _renameat2_fn = False
    if _renameat2_fn is False:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists (atomically so on Linux)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _folder_tag(path: Path) -> str:
    """The target's name as it appears in its temporary folders' names (hashed when very long)."""
    name = path.name
    return name if len(os.fsencode(name)) <= 200 else hashlib.sha1(os.fsencode(name)).hexdigest()


_TEMP_NAME = re.compile(r"^\.(?P<kind>tmp|old)\.(?P<host>[0-9a-f]{6})\.(?P<pid>\d+)\.[a-z0-9_]+\.(?P<tag>.+)$")
_LEGACY_NAME = re.compile(r"^\.(?P<kind>tmp|old)-(?P<tag>.+)-[a-z0-9_]{8}$")  # tempfile names of earlier versions


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user
        return True
    return True


def _is_stale(entry: Path, host: str | None, pid: int | None) -> bool:
    try:
        age = time.time() - entry.lstat().st_mtime
    except FileNotFoundError:
        return False
    if age > _STALE_SECONDS:
        return True
    if host is None:  # legacy name: no owner recorded
        return age > 3600
    return host == _host_tag() and pid is not None and not _pid_alive(pid)


def clean_stale_folders(path: str | Path) -> list[Path]:
    """Delete the temporary folders that writes of ``path`` by dead processes left next to it, and, if ``path``
    itself is missing, rename back the old folder an interrupted overwrite had set aside. Returns what was removed.
    """
    path = Path(path)
    parent, tag = path.parent, _folder_tag(path)
    if not parent.is_dir():
        return []
    removed = []
    for entry in sorted(parent.iterdir()):
        m = _TEMP_NAME.match(entry.name)
        if m is not None:
            host, pid = m["host"], int(m["pid"])
        else:
            m = _LEGACY_NAME.match(entry.name)
            host = pid = None
        if m is None or m["tag"] != tag or not _is_stale(entry, host, pid):
            continue
        if m["kind"] == "old" and not os.path.lexists(path):
            # an overwrite was interrupted between its two renames: put the old folder back (earlier versions
            # moved it into the .old folder, under its own name)
            try:
                _rename_noreplace(entry if host is not None else entry / path.name, path)
                if host is None:
                    _remove(entry)
                continue
            except OSError:
                pass
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def check_output_folder(path: str | Path, *, overwrite: bool = False) -> None:
    """Raise, before any work is done, if folder ``path`` could not be written: it exists and not ``overwrite``
    (``FileExistsError``), it or a parent is a file (``NotADirectoryError``), or its nearest existing parent is not
    writable (``PermissionError``, found by creating and removing an empty folder there). Writes nothing."""
    path = Path(path)
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(
                f"Output folder {str(path)!r} already exists. Choose another folder, or pass overwrite=True "
                "(--overwrite on the command line) to replace it."
            )
        if not path.is_dir() or path.is_symlink():
            raise NotADirectoryError(f"Output {str(path)!r} exists and is not a folder (a file or a link); "
                                     "it is never replaced. Choose another output folder.")
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"Cannot create output folder {str(path)!r}: {str(parent)!r} is a file, not a "
                                 "folder.")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".peft-cp-merge-probe-"))
    except OSError as e:
        raise PermissionError(
            f"Cannot create output folder {str(path)!r}: {str(parent)!r} is not writable ({e.strerror or e}). "
            "Choose a folder you can write to."
        ) from None


def atomic_folder(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Create folder ``path`` by ``write(tmp)`` into a temporary sibling folder, then renaming it into place.

    An existing ``path`` is refused unless ``overwrite`` (``FileExistsError``, also when it appears while ``write``
    runs); with ``overwrite`` it is replaced only after ``write`` succeeded, and the path never goes missing. The
    temporary folder is removed on failure; those of earlier killed runs are removed first (see above).
    """
    path = Path(path)
    check_output_folder(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_folders(path)  # may put back the old folder of an interrupted overwrite
    if not overwrite and os.path.lexists(path):
        check_output_folder(path, overwrite=False)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp.{_host_tag()}.{os.getpid()}.",
                                suffix=f".{_folder_tag(path)}"))
    try:
        write(tmp)
        default_mode(tmp, folder=True)
        if overwrite and os.path.lexists(path):
            _replace(tmp, path)
        else:
            try:
                _rename_noreplace(tmp, path)
            except FileExistsError:
                raise FileExistsError(
                    f"Output folder {str(path)!r} appeared while it was being written (another process?); it was "
                    "left as it is. Choose another folder, or pass overwrite=True (--overwrite) to replace it."
                ) from None
    except BaseException:
        _remove(tmp)
        raise
    return path


def _replace(tmp: Path, path: Path) -> None:
    """Put folder ``tmp`` at ``path`` (which exists) with no moment where ``path`` is missing where the OS allows;
    the old content is deleted."""
    try:
        swapped = _renameat2(tmp, path, _RENAME_EXCHANGE)
    except FileNotFoundError:  # the target vanished meanwhile: a plain exclusive rename
        _rename_noreplace(tmp, path)
        return
    if swapped:  # tmp now holds the old content
        _remove(tmp)
        return
    old = path.parent / f".old.{_host_tag()}.{os.getpid()}.{secrets.token_hex(4)}.{_folder_tag(path)}"
    os.rename(path, old)
    try:
        _rename_noreplace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            _rename_noreplace(old, path)
        raise
    _remove(old)


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        with contextlib.suppress(OSError):
            p.unlink()
    else:
        shutil.rmtree(p, ignore_errors=True)


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
