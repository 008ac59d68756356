"""Hostile situations (issue 23): nothing a user already has is lost by a merge or a train, whatever the mistake or
accident. One test per class: an output that overlaps a source or library, ``overwrite`` of a folder this package
did not write, two writers of one output, a source that changes while it is read, a full disk, Ctrl-C, an empty
source string, and the two leftovers of the earlier hardening (centroid width, an empty ``output_dir``)."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _library import REPO, env, make_rows, make_tiny_model, write_jsonl
from _models import cli_one_line, make_peft_model, run_cli, save_tiny_adapters
from safetensors.torch import save_file

import peft_cp_merge.files.merge as engine
from peft_cp_merge import _io, merge_adapters
from peft_cp_merge.cli import main as cli_main

TARGETS = ["lin0", "conv1", "conv2"]
ADAPTERS = {"x": {"r": 2, "lora_alpha": 4, "target_modules": TARGETS},
            "y": {"r": 3, "lora_alpha": 3, "target_modules": TARGETS}}
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two float32 TinyNet LoRA adapters saved as plain PEFT folders (base model 'tiny-net')."""
    root = tmp_path_factory.mktemp("adapters")
    return [Path(p) for p in save_tiny_adapters(root, ADAPTERS, dtype=torch.float32)[1]]


@pytest.fixture
def sources(saved, tmp_path):
    """Fresh copies of the two adapters under ``tmp_path/src`` (a test may damage them)."""
    out = []
    for p in saved:
        shutil.copytree(p, tmp_path / "src" / p.name)
        out.append(tmp_path / "src" / p.name)
    return out


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to prove a folder was left exactly as it was)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


_cli = cli_one_line  # (exit code, stderr); a failure is exactly one line, no traceback


def _library(tmp_path: Path, adapters, name="lib", dim=4, marked=True) -> Path:
    """A small adapter library folder built by hand: library.json, centroids, one cluster per adapter."""
    from peft_cp_merge.library.library import FORMAT, adapter_checksum

    lib = tmp_path / name
    lib.mkdir()
    clusters = []
    for i, a in enumerate(adapters):
        shutil.copytree(a, lib / f"cluster_{i}")
        clusters.append({"id": i, "name": f"cluster_{i}", "size": 3 + i, "status": "done",
                         "sha256": adapter_checksum(lib / f"cluster_{i}")})
    meta = {"format": FORMAT, "format_version": 1, "status": "complete", "base_model": "tiny-net",
            "embedding_model": "tiny-embedder", "embedding_dim": dim, "clusters": clusters}
    if marked:
        meta["written_by"] = {"tool": "peft-cp-merge", "kind": "adapter-library"}
    (lib / "library.json").write_text(json.dumps(meta))
    save_file({"centroids": torch.nn.functional.normalize(torch.randn(len(adapters), dim), dim=1)},
              str(lib / "centroids.safetensors"))
    return lib


# --- 1. an output never overlaps a source or a library; overwrite replaces only what this package wrote ----------

def test_out_that_is_or_contains_a_source_is_refused(sources, tmp_path, capsys):
    a, b = sources
    before = _tree(tmp_path / "src")
    (tmp_path / "link").symlink_to(a, target_is_directory=True)
    cases = [
        (a, "is the source"),                      # --out a --overwrite replaced source a
        (tmp_path / "src", "contains the source"),  # deleted both sources (and any other file there)
        (tmp_path / "link", "is the source"),      # the same, through a symlink
        (a / "sub", "is inside the source"),        # writes into a source folder
    ]
    for out, message in cases:
        rc, err = _cli(["merge", a, b, "--out", out, "--overwrite", "--rank", "2", "--no-progress"], capsys)
        assert rc == 2 and message in err, err
        assert str(out) in err and str(a.resolve()) in err  # both paths named
        assert _tree(tmp_path / "src") == before
    # the API refuses the same, naming both paths
    merged = merge_adapters([a, b], rank=2, progress=False)
    for out, message in cases:
        with pytest.raises(ValueError, match=message):
            merged.save_pretrained(out, overwrite=True)
    assert _tree(tmp_path / "src") == before and not (a / "sub").exists()


def test_overwrite_replaces_only_an_output_this_package_wrote(sources, tmp_path, capsys):
    a, b = sources
    argv = ["merge", a, b, "--rank", "2", "--no-progress", "--overwrite", "--out"]
    # a folder of the user's that merely has the file names of an adapter is not replaced
    mine = tmp_path / "mine"
    shutil.copytree(a, mine)
    (mine / "README.md").write_text("my notes\n")
    before = _tree(mine)
    rc, err = _cli(argv + [mine], capsys)
    assert rc == 2 and "not written by peft-cp-merge" in err and _tree(mine) == before
    # a merged adapter this package wrote is replaced, but not once the user put a file of theirs in it
    merged = tmp_path / "merged"
    assert _cli(argv[:-2] + ["--out", merged], capsys)[0] == 0
    assert _cli(argv + [merged], capsys)[0] == 0
    (merged / "notes.txt").write_text("mine")
    rc, err = _cli(argv + [merged], capsys)
    assert rc == 2 and "notes.txt" in err and (merged / "notes.txt").read_text() == "mine"
    # an adapter library is not a merged adapter: overwrite does not turn one into the other
    lib = _library(tmp_path, sources)
    before = _tree(lib)
    rc, err = _cli(argv + [lib], capsys)
    assert rc == 2 and "it is an adapter library" in err and _tree(lib) == before


def test_library_is_never_overwritten_by_its_own_merge_or_copy(sources, tmp_path, capsys):
    from peft_cp_merge.library import AdapterLibrary

    lib = _library(tmp_path, sources)
    before = _tree(lib)
    for out, message in [(lib, "is the library"), (lib / "cluster_0", "is inside the library"),
                         (lib / "new", "is inside the library")]:
        # `library merge LIB --out LIB --overwrite` replaced the library; --out LIB/cluster_0 corrupted it
        rc, err = _cli(["library", "merge", lib, "--out", out, "--overwrite", "--rank", "2"], capsys)
        assert rc == 2 and message in err and str(lib.resolve()) in err, err
        with pytest.raises(ValueError, match=message):
            AdapterLibrary.from_pretrained(lib).merge(rank=2).save_pretrained(out, overwrite=True)
        assert _tree(lib) == before
    for out in (lib / "cluster_0", lib / "new"):  # a copy of the library into itself
        with pytest.raises(ValueError, match="is inside the library"):
            AdapterLibrary.from_pretrained(lib).save_pretrained(out, overwrite=True)
    assert _tree(lib) == before
    # a copy elsewhere is marked, so another copy may overwrite it; a folder of the user's may not be
    AdapterLibrary.from_pretrained(lib).save_pretrained(tmp_path / "copy")
    AdapterLibrary.from_pretrained(lib).save_pretrained(tmp_path / "copy", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "library.json").write_text("{}")
    with pytest.raises(ValueError, match="not written by peft-cp-merge"):
        AdapterLibrary.from_pretrained(lib).save_pretrained(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "library.json").read_text() == "{}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety-train")
    return make_tiny_model(tmp / "model"), write_jsonl(tmp / "data.jsonl", make_rows(n=4))


def _train_cli(argv, capsys):
    """``library train``: (exit code, last stderr line); no traceback anywhere (training logs on stderr)."""
    rc, err = run_cli(argv, capsys)
    assert "Traceback" not in err, err
    return rc, (err.strip().splitlines() or [""])[-1]


def _train_argv(tiny, out, *extra):
    model, data = tiny
    return ["library", "train", "--base-model", model, "--dataset", data, "--output-dir", out, "--max-steps", "1",
            "--lora-r", "2", "--target-modules", "q_proj", *extra]


def test_library_train_overwrite_needs_a_library_it_wrote(tiny, sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a folder that merely holds a file named library.json (with the library format, even) is not deleted
    forged = _library(tmp_path, sources, name="forged", marked=False)
    before = _tree(forged)
    rc, err = _train_cli(_train_argv(tiny, forged, "--overwrite", "--num-clusters", "2"), capsys)
    assert rc == 2 and "not written by peft-cp-merge" in err and _tree(forged) == before
    # a library it wrote, with a file of the user's added, is not deleted either
    lib = _library(tmp_path, sources, name="lib")
    (lib / "notes.txt").write_text("mine")
    before = _tree(lib)
    rc, err = _train_cli(_train_argv(tiny, lib, "--overwrite", "--num-clusters", "2"), capsys)
    assert rc == 2 and "notes.txt" in err and _tree(lib) == before
    # output_dir containing the training data, or inside the base model, is refused
    model, data = tiny
    for out, message in [(data.parent, "contains the source"), (model / "lib", "is inside the source")]:
        rc, err = _train_cli(_train_argv(tiny, out, "--overwrite", "--num-clusters", "2"), capsys)
        assert rc == 2 and message in err, err
    assert not (model / "lib").exists() and data.is_file()
    # overwrite of a library it wrote keeps the old one until the new one is complete: a run that fails puts it back
    (lib / "notes.txt").unlink()
    before = _tree(lib)
    few = write_jsonl(tmp_path / "few.jsonl", make_rows(n=1))  # 3 examples, 5 clusters: fails after the embedding
    argv = _train_argv(tiny, lib, "--overwrite", "--num-clusters", "5")
    argv[argv.index("--dataset") + 1] = few
    rc, err = _train_cli(argv, capsys)
    assert rc == 2 and "only 3 examples" in err and _tree(lib) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".old")]


# --- 2. one lock per output --------------------------------------------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from peft_cp_merge._io import output_lock
out, ready, release = map(Path, sys.argv[1:4])
with output_lock(out):
    ready.write_text("locked")
    while not release.exists():
        time.sleep(0.05)
    if sys.argv[4:] == ["die"]:
        import os
        os._exit(9)   # killed while holding it: no cleanup at all
"""


@contextlib.contextmanager
def _holder(out: Path, tmp_path: Path, *extra):
    """A real second process holding the lock of ``out`` until the block ends; yields it."""
    ready, release = tmp_path / "ready", tmp_path / "release"
    ready.unlink(missing_ok=True)
    release.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), str(ready), str(release), *extra], cwd=REPO,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert p.poll() is None and time.time() < deadline, p.communicate()[1][-2000:]
            time.sleep(0.05)
        yield p
    finally:
        release.write_text("go")
        p.wait(timeout=60)


def _merge_cmd(sources, out, *extra):
    return [sys.executable, "-m", "peft_cp_merge.cli", "merge", *map(str, sources), "--out", str(out), "--rank", "2",
            "--no-progress", *extra]


def _start(cmd, errfile: Path) -> subprocess.Popen:
    """A CLI process whose stderr goes to ``errfile`` (read while it runs)."""
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=errfile.open("w"), text=True)


def _wait_for(errfile: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while text not in errfile.read_text():
        assert proc.poll() is None and time.time() < deadline, errfile.read_text()[-2000:]
        time.sleep(0.1)


def test_two_writers_of_one_output(sources, tmp_path):
    out, log = tmp_path / "out", tmp_path / "waiter.log"
    with _holder(out, tmp_path) as holder:
        # a second writer refuses at once, naming the holder's PID; nothing is written
        r = subprocess.run(_merge_cmd(sources, out), cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and f"PID {holder.pid}" in r.stderr and "--wait" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and not out.exists()
        # with --wait it waits for the holder (saying for whom), then writes
        waiter = _start(_merge_cmd(sources, out, "--wait"), log)
        _wait_for(log, f"PID {holder.pid}", waiter)
        time.sleep(1)
        assert waiter.poll() is None and not out.exists()
    assert waiter.wait(timeout=300) == 0, log.read_text()[-2000:]
    assert (out / WEIGHTS).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".lock")]  # no lock file left behind


def test_stale_lock_of_a_dead_process_is_taken_over(sources, tmp_path, capsys):
    out = tmp_path / "out"
    with _holder(out, tmp_path, "die") as holder:
        pass
    assert holder.returncode == 9
    lock = _io.lock_path(out)
    assert lock.is_file() and lock.read_text().split()[0] == str(holder.pid)  # left as the dead process had it
    rc, err = _cli(["merge", *sources, "--out", out, "--rank", "2", "--no-progress"], capsys)
    assert rc == 0 and (out / WEIGHTS).is_file() and not lock.exists()


def test_library_train_refuses_a_locked_output_dir(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "lib"
    with _holder(out, tmp_path) as holder:
        rc, err = _train_cli(_train_argv(tiny, out, "--num-clusters", "2"), capsys)
    assert rc == 2 and f"PID {holder.pid}" in err and not out.exists()


def test_sigint_while_waiting_is_one_line(sources, tmp_path):
    out, log = tmp_path / "out", tmp_path / "waiter.log"
    with _holder(out, tmp_path) as holder:
        waiter = _start(_merge_cmd(sources, out, "--wait"), log)
        _wait_for(log, f"PID {holder.pid}", waiter)  # blocked on the lock
        waiter.send_signal(signal.SIGINT)
        assert waiter.wait(timeout=60) == 130
    err = log.read_text()
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted; nothing written", err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


# --- 3. a consistent snapshot of the sources ----------------------------------------------------------------------

def _mutate_after_first_module(monkeypatch, action):
    """After the first module's factors are read, run ``action()`` (another program changing a source)."""
    real = engine.open_weights
    state = {"reads": 0}

    class Handle:
        def __init__(self, fh):
            self.fh = fh

        def get_tensor(self, key):
            t = self.fh.get_tensor(key)
            state["reads"] += 1
            if state["reads"] == 4:  # A and B of both sources: the first module is read
                action()
            return t

        def __getattr__(self, name):
            return getattr(self.fh, name)

    monkeypatch.setattr(engine, "open_weights", lambda src, stack: Handle(real(src, stack)))


def test_source_replaced_or_rewritten_while_merging(sources, saved, tmp_path, monkeypatch, capsys):
    a, b = sources
    other = make_peft_model({"c": ADAPTERS["y"]}, dtype=torch.float32, seed=7)
    other.peft_config["c"].base_model_name_or_path = "tiny-net"
    other.save_pretrained(tmp_path / "other", save_embedding_layers=False)
    new_weights = (tmp_path / "other" / "c" / WEIGHTS).read_bytes()

    def replace():  # a git pull or a Hub re-download: a new file renamed over the old
        (tmp_path / "new.safetensors").write_bytes(new_weights)
        os.replace(tmp_path / "new.safetensors", b / WEIGHTS)

    def rewrite():  # the same file rewritten in place (same inode, same size)
        with open(b / WEIGHTS, "r+b") as fh:
            fh.write(new_weights)

    for action in (replace, rewrite):
        shutil.copy2(saved[1] / WEIGHTS, b / WEIGHTS)
        _mutate_after_first_module(monkeypatch, action)
        with pytest.raises(ValueError, match="changed while merging; nothing written") as e:
            merge_adapters([a, b], rank=2, batch_size=1, progress=False)
        assert str(b / WEIGHTS) in str(e.value)
        shutil.copy2(saved[1] / WEIGHTS, b / WEIGHTS)
        _mutate_after_first_module(monkeypatch, action)
        rc, err = _cli(["merge", a, b, "--out", tmp_path / "out", "--rank", "2", "--batch-size", "1",
                        "--no-progress"], capsys)
        assert rc == 2 and "changed while merging; nothing written" in err and not (tmp_path / "out").exists()


# --- 6. accidents: a full disk, Ctrl-C, an empty source -----------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where mount is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("the disk-full test mounts a tmpfs: needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path, leave: int = 0) -> None:
    """Fill the file system of ``folder`` up to ``leave`` free bytes."""
    with open(folder / "filler", "wb") as fh:
        with contextlib.suppress(OSError):
            while shutil.disk_usage(folder).free > leave:
                fh.write(b"\0" * 4096)
                fh.flush()


def test_full_disk_is_one_line_and_leaves_nothing(sources, tmpfs, capsys, monkeypatch):
    a, b = sources
    argv = ["merge", a, b, "--rank", "2", "--no-progress", "--out"]
    assert _cli(argv + [tmpfs / "old"], capsys)[0] == 0
    old = _tree(tmpfs / "old")
    _fill(tmpfs)
    # found before writing (free space < the adapter's size), and while writing (a quota, or the check skipped):
    # one line naming the folder and the size, the parent folders it created removed, the old output intact
    for skip_check in (False, True):
        if skip_check:
            monkeypatch.setattr(_io, "check_free_space", lambda *a, **k: None)
        for out in (tmpfs / "new" / "deeper" / "out", tmpfs / "old"):
            rc, err = _cli(argv + [out, "--overwrite"], capsys)
            assert rc == 2 and err.startswith("error: ") and str(out) in err and "MB" in err, err
            assert "no space left" in err and "Traceback" not in err
            assert sorted(p.name for p in tmpfs.iterdir()) == ["filler", "old"]
            assert _tree(tmpfs / "old") == old
    # the API raises the same error (an OSError with errno ENOSPC)
    with pytest.raises(OSError, match="no space left") as e:
        merge_adapters([a, b], rank=2, progress=False).save_pretrained(tmpfs / "api")
    assert e.value.errno == errno.ENOSPC and sorted(p.name for p in tmpfs.iterdir()) == ["filler", "old"]


def test_full_disk_inside_safetensors_is_one_line(sources, tmp_path, capsys, monkeypatch):
    """Without a tmpfs: safetensors' own error for a full disk (a SafetensorError carrying os error 28)."""
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              "\"No space left on device\" }) (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    out = tmp_path / "a" / "b" / "out"
    rc, err = _cli(["merge", *sources, "--out", out, "--rank", "2", "--no-progress"], capsys)
    assert rc == 2 and "no space left" in err and str(out) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_ctrl_c_is_one_line_and_exit_130(sources, tmp_path, capsys, monkeypatch):
    from peft_cp_merge.files.adapter import MergedAdapter

    real = MergedAdapter._write

    def interrupted(self, folder):
        real(self, folder)
        raise KeyboardInterrupt

    def run(argv):
        capsys.readouterr()
        try:
            rc = cli_main(argv)
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped the command line (a traceback for the user)")
        return rc, capsys.readouterr().err

    monkeypatch.setattr(MergedAdapter, "_write", interrupted)
    rc, err = run(["merge", *map(str, sources), "--out", str(tmp_path / "x" / "out"), "--rank", "2", "--no-progress"])
    assert rc == 130 and err == "interrupted; nothing written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, temp folder, lock or parent folder
    # while reading the sources
    monkeypatch.setattr(engine, "index_modules", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, err = run(["merge", *map(str, sources), "--out", str(tmp_path / "out"), "--rank", "2", "--no-progress"])
    assert rc == 130 and err == "interrupted; nothing written\n"


@pytest.mark.parametrize("blank", ["", "   "])
def test_empty_source_string_is_an_error(sources, blank, tmp_path, monkeypatch, capsys):
    # the current folder is an adapter: a blank source must not silently mean it
    monkeypatch.chdir(sources[0])
    with pytest.raises(ValueError, match="empty"):
        merge_adapters([blank, sources[1]], progress=False)
    with pytest.raises(ValueError, match="empty"):
        merge_adapters([blank], progress=False)
    rc, err = _cli(["merge", blank, sources[1], "--out", tmp_path / "out"], capsys)
    assert rc == 2 and not (tmp_path / "out").exists()


# --- still open from the earlier hardening ------------------------------------------------------------------------

def test_centroids_of_the_wrong_width_fail_at_load(sources, tmp_path, capsys):
    from peft_cp_merge.library import AdapterLibrary

    lib = _library(tmp_path, sources, dim=4)
    save_file({"centroids": torch.randn(2, 5)}, str(lib / "centroids.safetensors"))
    with pytest.raises(ValueError, match="5 wide.*4-dim"):
        AdapterLibrary.from_pretrained(lib)
    rc, err = _cli(["library", "info", lib], capsys)
    assert rc == 2 and "5 wide" in err


def test_too_few_examples_for_k_leaves_no_output_dir(tiny, tmp_path, capsys, monkeypatch):
    """The one kind of bad training data found only after the output folder was made: fewer examples than
    clusters (found by the clustering). The folder, and the parent folders the run made, are removed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    few = write_jsonl(tmp_path / "few.jsonl", make_rows(n=1))
    argv = _train_argv(tiny, tmp_path / "new" / "out", "--num-clusters", "5")
    argv[argv.index("--dataset") + 1] = few
    rc, err = _train_cli(argv, capsys)
    assert rc == 2 and "only 3 examples" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.jsonl"]
