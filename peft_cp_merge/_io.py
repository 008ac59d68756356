"""Atomic file writes (temp file or folder beside the target, then ``os.replace``), the safety rules every writer
of an output follows, and environment facts.

Nothing half-written is ever left at the target path: a crash leaves either the old content or none. Output safety
(used by every writer: merge outputs, library train, library copies; see "output safety" below): an output never
overlaps a source or a library being read (:func:`check_disjoint`), ``overwrite`` replaces only a folder this package
wrote (:func:`check_replaceable`, by the marker :func:`marker` in the files it writes), one advisory lock per output
for the whole run (:func:`output_lock`), the identity of every source file checked after the last read
(:func:`file_identities`, :func:`check_unchanged`), and a full disk as one clear error (:class:`DiskFullError`).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import hashlib
import json
import logging
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
from typing import TYPE_CHECKING, Any

from peft_cp_merge.errors import PeftCpMergeError  # absolute: _io also loads as a lone file (tests)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if disk_errno(e):
            raise disk_full(e, path.parent, len(text.encode()), old_kept=path.exists()) from None
        raise


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out and save a matplotlib figure to ``path`` through a temporary file in the same folder (a reader never
    sees half a plot), then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written atomically (``metadata={"format": "pt"}`` as PEFT and transformers write it)."""
    from safetensors.torch import save_file

    path = Path(path)
    needed = sum(v.numel() * v.element_size() for v in tensors.values())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        default_mode(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if disk_errno(e):
            raise disk_full(e, path.parent, needed, old_kept=path.exists()) from None
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


def check_output_folder(path: str | Path, *, overwrite: bool = False, kind: str | None = None) -> None:
    """Raise, before any work is done, if folder ``path`` could not be written: it exists and not ``overwrite``
    (``FileExistsError``), it or a parent is a file (``NotADirectoryError``), with ``overwrite`` and a ``kind`` it
    is not an output this package wrote as ``kind`` (:func:`check_replaceable`, :class:`OutputRefusedError`), or
    its nearest existing parent is not writable (``PermissionError``, found by creating and removing an empty
    folder there). Writes nothing."""
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
        if kind is not None:
            check_replaceable(path, kind)
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


def atomic_folder(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = False,
                  kind: str | None = None, wait: bool = False, sources: Any = (), libraries: Any = (),
                  needed: int | None = None) -> Path:
    """Create folder ``path`` by ``write(tmp)`` into a temporary sibling folder, then renaming it into place.

    An existing ``path`` is refused unless ``overwrite`` (``FileExistsError``, also when it appears while ``write``
    runs); with ``overwrite`` it is replaced only after ``write`` succeeded, and the path never goes missing. The
    temporary folder is removed on failure; those of earlier killed runs are removed first (see above).

    The output safety rules (:func:`output_guard`) apply: ``path`` must not overlap ``sources`` / ``libraries``;
    with ``kind`` (a key of :data:`KINDS`) ``overwrite`` replaces only an output this package wrote as ``kind``
    (``write`` must put :func:`marker` into it); the output's lock is held throughout (``wait``: wait for another
    writer instead of refusing); parent folders created here are removed again on failure. ``needed`` (bytes) is
    checked against the free space first; a full disk, quota or read-only file system while writing is one
    :class:`DiskFullError`.
    """
    path = Path(path)
    with output_guard(path, kind=kind, overwrite=overwrite, wait=wait, sources=sources, libraries=libraries):
        clean_stale_folders(path)  # may put back the old folder of an interrupted overwrite
        if os.path.lexists(path):
            check_output_folder(path, overwrite=overwrite, kind=kind)
        old_kept = os.path.lexists(path)
        check_free_space(path, needed, old_kept=old_kept)
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
                        f"Output folder {str(path)!r} appeared while it was being written (another process?); it "
                        "was left as it is. Choose another folder, or pass overwrite=True (--overwrite) to replace it."
                    ) from None
        except BaseException as e:
            _remove(tmp)
            if disk_errno(e):
                raise disk_full(e, path, needed, old_kept=old_kept) from None
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


# --- output safety --------------------------------------------------------------------------------------------------
#
# The rules every writer of an output follows (merge outputs, `library train`, library copies), in this order:
# 1. check_disjoint: the output (symlinks resolved) is not a source or a library being read, does not contain one
#    and is not inside one.
# 2. check_output_folder(path, overwrite=..., kind=...): an existing output is replaced only with overwrite, and
#    only if this package wrote it as that kind of output (check_replaceable: the marker in the files it writes,
#    and nothing else in the folder).
# 3. output_guard / output_lock: one advisory lock per output (a hidden sibling file holding the writer's PID) for
#    the whole run; the parent folders the run creates are removed again when nothing was written.
# 4. file_identities / check_unchanged: the sources' files are the same after the last read as before the first.
# 5. a full disk, an exceeded quota or a read-only file system is one DiskFullError naming the folder and the space
#    needed (atomic writers), and nothing half-written stays.


class OutputRefusedError(PeftCpMergeError):
    """The output would overlap a source or library, or ``overwrite`` would replace a folder not written here."""


class OutputLockedError(PeftCpMergeError):
    """Another process is writing the same output."""


class SourceChangedError(PeftCpMergeError):
    """A source file changed while it was being read."""


class DiskFullError(OSError):
    """No space left, quota exceeded or a read-only file system while writing an output (``errno`` is set)."""


MARKER_KEY = "peft_cp_merge"
"""The marker: a merged adapter's ``README.md`` front matter has the line ``peft_cp_merge: merged-adapter``; a
library's ``library.json`` has ``"written_by": {"tool": "peft-cp-merge", "kind": "adapter-library"}``. Only those
fields, never a file name alone, let ``overwrite`` replace a folder."""
MARKER_FIELD = "written_by"
KINDS = {"merged-adapter": "a merged adapter", "adapter-library": "an adapter library"}
_TEMP_FILE = r"\.tmp[-.].*|\..+\.peft-cp-merge\.lock|\.peft-cp-merge-probe-.*"  # leftovers of the writers and locks
_KIND_FILES = {
    "merged-adapter": re.compile(rf"adapter_config\.json|adapter_model\.safetensors|README\.md|{_TEMP_FILE}"),
    "adapter-library": re.compile(rf"library\.json|centroids\.safetensors|clusters\.png|README\.md|cluster_\d+|\.run|"
                                  rf"{_TEMP_FILE}"),
}
_CLUSTER_FILES = re.compile(rf"adapter_config\.json|adapter_model\.safetensors|training_state\.json|README\.md|"
                            rf"{_TEMP_FILE}")


def marker(kind: str) -> dict[str, str]:
    """The marker a writer of ``kind`` (a key of :data:`KINDS`) puts into its output."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    return {"tool": "peft-cp-merge", "kind": kind}


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of an output this package wrote (see :data:`MARKER_KEY`), ``None`` if there is none. Reads at
    most 64 KiB of the card / 64 MiB of ``library.json``; an unreadable file reads as no marker."""
    folder = Path(folder)
    found: Any = None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with open(folder / "README.md", "rb") as fh:
            head = fh.read(64 << 10).decode("utf-8", errors="replace")
        m = re.match(r"---\r?\n(.*?)\r?\n---\r?\n", head, re.S)  # the front matter
        kind = m and re.search(rf"^{MARKER_KEY}:\s*['\"]?([\w-]+)['\"]?\s*$", m[1], re.M)
        if kind:
            found = {"tool": "peft-cp-merge", "kind": kind[1]}
    if found is None:
        with contextlib.suppress(OSError, ValueError, UnicodeDecodeError, AttributeError):
            lib = folder / "library.json"
            if lib.stat().st_size <= 64 << 20:
                found = json.loads(lib.read_text(encoding="utf-8")).get(MARKER_FIELD)
    if isinstance(found, dict) and found.get("tool") == "peft-cp-merge" and found.get("kind") in KINDS:
        return found
    return None


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with every symlink followed (``~`` expanded)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_disjoint(out: str | Path, *, sources: Any = (), libraries: Any = (), name: str = "output folder") -> None:
    """Raise :class:`OutputRefusedError`, naming both paths, when output ``out`` is, contains or is inside one of
    ``sources`` (adapter folders, data, models being read) or ``libraries`` (adapter libraries being read); paths
    are compared with every symlink followed. Writes nothing."""
    o = resolved(out)
    for what, items in (("library", libraries), ("source", sources)):  # a library first: the better name
        for s in items:
            r = resolved(s)
            if o == r:
                rel = "is"
            elif r in o.parents:
                rel = "is inside"
            elif o in r.parents:
                rel = "contains"
            else:
                continue
            raise OutputRefusedError(
                f"The {name} {str(out)!r} ({o}) {rel} the {what} {str(s)!r} ({r}) that this run reads; writing there "
                f"would destroy or corrupt it. Choose an output folder outside every source and library."
            )


def check_replaceable(path: str | Path, kind: str) -> None:
    """Raise :class:`OutputRefusedError` unless the existing folder ``path`` may be replaced by an output of
    ``kind``: it is empty, or it holds this package's marker for ``kind`` (:func:`read_marker`) and only the files
    such an output has (a file of the user's in it is never deleted)."""
    path = Path(path)
    entries = sorted(path.iterdir())
    if not entries:
        return
    found = read_marker(path)
    if found is None or found["kind"] != kind:
        why = (f"it is {KINDS[found['kind']]}" if found else
               "it has no peft-cp-merge marker" + (", so it holds no adapter library this package wrote"
                                                   if kind == "adapter-library" else ""))
        raise OutputRefusedError(
            f"{str(path)!r} was not written by peft-cp-merge as {KINDS[kind]} ({why}), so overwrite never replaces "
            "it. Choose another output folder, or delete it yourself if its content is yours to lose."
        )
    foreign = [e.name for e in entries if not _KIND_FILES[kind].fullmatch(e.name)]
    if kind == "adapter-library":
        foreign += [f"{e.name}/{f.name}" for e in entries if e.is_dir() and re.fullmatch(r"cluster_\d+", e.name)
                    for f in sorted(e.iterdir()) if not _CLUSTER_FILES.fullmatch(f.name)]
    if foreign:
        raise OutputRefusedError(
            f"{str(path)!r} holds files peft-cp-merge did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}), so overwrite does not replace it. Move them out, or choose "
            "another output folder."
        )


def make_parents(folder: str | Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, outermost first (for :func:`remove_created`)."""
    folder = Path(folder)
    missing = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    created = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except BaseException:
        remove_created(created)
        raise
    return created


def remove_created(created: list[Path]) -> None:
    """Remove the (now empty) folders :func:`make_parents` created, innermost first; a non-empty one stays."""
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            break


_HELD: dict[str, list[Any]] = {}  # lock file -> [fd, depth]: a process may take its own lock again


def lock_path(path: str | Path) -> Path:
    """The lock file of output ``path``: a hidden sibling, ``.<name>.peft-cp-merge.lock`` (never inside the output
    or a source); the parent is resolved, so every spelling of the output shares one lock."""
    path = Path(path)
    return resolved(path.parent) / f".{_folder_tag(resolved(path))}.peft-cp-merge.lock"


def _lock_holder(fd: int) -> str:
    """``PID <pid>`` (on host <h>) of the lock's holder, read from the lock file (retried while it is written)."""
    for _ in range(20):
        with contextlib.suppress(OSError):
            text = os.pread(fd, 200, 0).decode(errors="replace").split()
            if text and text[0].isdigit():
                host = f" on host {text[1]}" if len(text) > 1 and text[1] != socket.gethostname() else ""
                return f"PID {text[0]}{host}"
        time.sleep(0.05)
    return "an unknown PID"


def _acquire(lock: Path, wait: bool, what: Path) -> int:
    import fcntl

    waited = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                if not wait:
                    raise OutputLockedError(
                        f"{str(what)!r} is being written by another peft-cp-merge process ({holder}; lock file "
                        f"{lock}). Wait for it to finish, pass --wait (wait=True) to wait for it, or choose another "
                        "output folder."
                    ) from None
                if not waited:
                    logger.warning("%s is being written by %s; waiting for it to finish", what, holder)
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            # the holder we waited for may have removed the file (release): lock the file the path names now
            try:
                st = os.stat(lock, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            fst = os.fstat(fd)
            if st is None or (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
                os.close(fd)
                continue
            with contextlib.suppress(OSError):  # a full disk: the lock holds, only its PID goes unsaid
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise


@contextlib.contextmanager
def output_lock(path: str | Path, *, wait: bool = False):
    """Hold the advisory lock of output ``path`` (``flock`` on :func:`lock_path`, which holds the holder's PID) for
    the ``with`` block. Another holder: :class:`OutputLockedError` naming its PID, or with ``wait`` block until it
    is done. The OS releases the lock when its process dies, so a stale lock is simply taken over. Re-entrant
    within one process. The parent folder of ``path`` must exist. Without ``fcntl`` (Windows) it uses
    ``filelock`` (no PID in the message)."""
    lock = lock_path(path)
    key = str(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - not POSIX
        import filelock

        try:
            with filelock.FileLock(key, timeout=-1 if wait else 0):
                _HELD[key] = [None, 1]
                try:
                    yield
                finally:
                    del _HELD[key]
        except filelock.Timeout:
            raise OutputLockedError(f"{str(path)!r} is being written by another process (lock file {lock}); pass "
                                    "--wait to wait for it, or choose another output folder.") from None
        return
    fd = _acquire(lock, wait, Path(path))
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):  # unlink while holding it: a waiter then sees a new file and retries
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def output_guard(path: str | Path, *, kind: str | None, overwrite: bool = False, wait: bool = False,
                 sources: Any = (), libraries: Any = (), name: str = "output folder"):
    """Everything a writer does around writing output folder ``path``: refuse an output that overlaps a source or
    library (:func:`check_disjoint`) or that exists (unless ``overwrite``, and then only one this package wrote as
    ``kind``; ``kind=None`` is for internal writers replacing their own parts), create the parent folders, hold
    :func:`output_lock` for the block and check again under it; the parent folders it created are removed again if
    ``path`` does not exist when the block ends (failure, Ctrl-C). Yields the created parent folders."""
    path = Path(path)
    check_disjoint(path, sources=sources, libraries=libraries, name=name)
    check_output_folder(path, overwrite=overwrite, kind=kind)
    try:
        created = make_parents(path.parent)
    except OSError as e:
        if disk_errno(e):
            raise disk_full(e, path) from None
        raise
    try:
        with output_lock(path, wait=wait):
            check_output_folder(path, overwrite=overwrite, kind=kind)  # another writer may have finished meanwhile
            yield created
    finally:
        if not os.path.lexists(path):
            remove_created(created)


# source snapshots

def file_identities(paths: Any) -> dict[str, tuple[int, int, int, int]]:
    """``{path: (size, mtime_ns, inode, device)}`` of files (symlinks followed: a Hub snapshot's blob), taken before
    the first read; :func:`check_unchanged` compares them after the last."""
    out = {}
    for p in paths:
        st = os.stat(p)
        out[str(p)] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    return out


def check_unchanged(identities: dict[str, tuple[int, int, int, int]], what: str = "merging") -> None:
    """Raise :class:`SourceChangedError` naming the first file whose identity (size, mtime, inode, device) is not
    the recorded one: it was replaced (``os.replace``, a Hub re-download) or rewritten in place while read."""
    for p, ident in identities.items():
        try:
            st = os.stat(p)
            now_ = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        except OSError:
            now_ = None
        if now_ != ident:
            raise SourceChangedError(
                f"{p} changed while {what}; nothing written. Another program replaced or rewrote it (a git pull, a "
                "download, a training run?): rerun when it is no longer being written."
            )


# full disks

_DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only"}


def disk_errno(e: BaseException) -> int | None:
    """ENOSPC / EDQUOT / EROFS behind ``e`` (an ``OSError``, or a ``SafetensorError`` whose message carries the OS
    error), else ``None``."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m[1]) if m else None
    return code if code in _DISK_ERRORS else None


def _free_bytes(folder: Path) -> int | None:
    p = folder
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


def disk_full(e: BaseException | int, folder: str | Path, needed: int | None = None, *,
              old_kept: bool = False) -> DiskFullError:
    """The one-line :class:`DiskFullError` for a write into ``folder`` that failed with ``e`` (or an errno)."""
    code = e if isinstance(e, int) else disk_errno(e)
    free = _free_bytes(Path(folder))
    err = DiskFullError(
        f"Cannot write {folder}: {_DISK_ERRORS.get(code, 'no space left')} (the output needs about {_mb(needed)}; "
        f"{_mb(free)} free there). Nothing was written{'; the old output is intact' if old_kept else ''}. Free some "
        "space or choose an output folder on another disk."
    )
    err.errno = code
    return err


def check_free_space(folder: str | Path, needed: int | None, *, old_kept: bool = False) -> None:
    """Raise :class:`DiskFullError` before writing when the file system of ``folder`` has less than ``needed``
    bytes free (quotas are only found by the write itself)."""
    free = _free_bytes(Path(folder))
    if needed and free is not None and free < needed:
        raise disk_full(errno.ENOSPC, folder, needed, old_kept=old_kept)


def tree_size(folder: str | Path) -> int:
    """Bytes of the files under ``folder`` (what a copy of it needs)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


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
