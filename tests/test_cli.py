"""The command line as a new user meets it: fast --help, readable help texts, `methods` listing allowed values; and
the light package import still registering the combination types with PEFT."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
HEAVY = ["torch", "peft", "transformers", "tensorly", "sentence_transformers", "sklearn", "datasets", "matplotlib"]
HELPS = [
    [], ["merge"], ["methods"], ["library"], ["library", "train"], ["library", "info"], ["library", "merge"],
    ["library", "push"],
]


def _run(script: str, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _help(capsys, monkeypatch, *argv) -> str:
    from peft_cp_merge.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


# (module run as `python -m`, its arguments before --help): every command
HELP_CASES = [("peft_cp_merge.cli", argv) for argv in HELPS]


@pytest.mark.parametrize(("module", "argv"), HELP_CASES, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_help_imports_nothing_heavy(module, argv):
    """`python -m peft_cp_merge.cli ... --help` loads no torch, PEFT, transformers, tensorly, sentence-transformers,
    sklearn, datasets or matplotlib: they made --help take seconds."""
    res = _run(f"""
        import runpy, sys
        sys.argv = ["peft-cp-merge", *{argv!r}, "--help"]
        try:
            runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            assert e.code == 0, e.code
        print("HEAVY", [m for m in {HEAVY!r} if m in sys.modules])
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    text, _, heavy = res.stdout.rpartition("HEAVY ")
    assert heavy.strip() == "[]", f"`{module} {' '.join(argv)} --help` imported {heavy.strip()}"
    assert text.startswith("usage:")
    assert "``" not in text and ":func:" not in text and ":class:" not in text


def test_import_registers_cp_with_peft_when_peft_comes_later():
    """`import peft_cp_merge` is light (no PEFT yet), and `add_weighted_adapter(combination_type="cp")` works on a
    model built afterwards; PEFT's own module, spec and loader are left as they were."""
    res = _run(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import peft_cp_merge
        assert [m for m in {HEAVY!r} if m in sys.modules] == [], "import peft_cp_merge loaded heavy modules"
        from _models import make_peft_model
        import peft
        assert "exec_module" not in vars(peft.__spec__.loader), "the import hook left its wrapper on peft's loader"
        assert not [f for f in sys.meta_path if getattr(f, "_peft_cp_merge_hook", False)], "hook not removed"
        model = make_peft_model({{"x": {{"r": 2}}, "y": {{"r": 3}}}})
        model.add_weighted_adapter(["x", "y"], [0.6, 0.4], "merged", combination_type="cp", cp_rank=3)
        assert model.peft_config["merged"].r == 3
        assert peft_cp_merge.is_registered()
        assert callable(peft_cp_merge.merge_adapters) and callable(peft_cp_merge.load_recipe)
        assert sorted(set(peft_cp_merge.__all__) - set(dir(peft_cp_merge))) == []
        for name in peft_cp_merge.__all__:
            getattr(peft_cp_merge, name)
        print("OK")
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("OK")


def test_library_train_help_shows_placeholders_and_defaults(capsys, monkeypatch):
    from peft_cp_merge.library.config import LibraryTrainConfig

    out = _help(capsys, monkeypatch, "library", "train")
    assert " V " not in out and "CFG_" not in out
    for flag in ("--lora-r N", "--learning-rate FLOAT", "--output-dir PATH", "--target-modules MODULE [MODULE",
                 "--parallel-mode {data,clusters}", "--mixed-precision {no,fp16,bf16}"):
        assert flag in out, flag
    defaults = LibraryTrainConfig()
    assert f"(default: {defaults.lora_r})" in out
    assert "(default: " + " ".join(defaults.target_modules) + ")" in out
    assert "(default: null)" in out and "(default: --no-overwrite)" in out
    import dataclasses

    assert out.count("(default: ") == len(dataclasses.fields(LibraryTrainConfig))


def test_library_help_is_user_text(capsys, monkeypatch):
    out = _help(capsys, monkeypatch, "library")
    assert "examples:" in out and "peft-cp-merge library train" in out
    assert "``" not in out and ":func:" not in out and "add_subcommands" not in out


def test_methods_lists_allowed_values(capsys):
    from peft_cp_merge.cli import main
    from peft_cp_merge.methods import get_merge_method, list_merge_methods
    from peft_cp_merge.methods.cp import CP_INITS, CP_VARIANTS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("cp_variant = "))
    assert all(v in line for v in CP_VARIANTS), line
    line = next(x for x in out.splitlines() if x.strip().startswith("cp_init = "))
    assert all(v in line for v in CP_INITS), line
    for name in list_merge_methods():  # data-driven: every declared choice of every method is shown
        for key, allowed in get_merge_method(name).choices.items():
            assert any(x.strip().startswith(f"{key} = ") and all(str(v) in x for v in allowed)
                       for x in out.splitlines()), (name, key)


def test_methods_prints_measured_advice(capsys):
    """Every registered method has its advice line (a new method without one fails here), printed by `methods`."""
    from peft_cp_merge.cli import main
    from peft_cp_merge.methods import list_merge_methods
    from peft_cp_merge.methods.advice import ADVICE

    assert set(list_merge_methods()) <= set(ADVICE), set(list_merge_methods()) - set(ADVICE)
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in list_merge_methods():
        assert f"use: {ADVICE[name]}" in out, name
    assert "orth_iso" in ADVICE["cp"] and "recommended" in ADVICE["iso_c"]


def test_choices_are_enforced_and_checked_at_registration():
    from peft_cp_merge import MergeInputError, get_merge_method
    from peft_cp_merge.methods import merge_method

    with pytest.raises(MergeInputError, match=r"cp_variant='nope' is not supported; use one of \['weighted'"):
        get_merge_method("cp").resolve_options({"cp_variant": "nope"})
    with pytest.raises(ValueError, match="choices for 'mode'"):
        merge_method("bad_choices", pretty_name="x", reference="x", options={"mode": "c"}, choices={"mode": ("a",)})


def test_merge_only_install_says_which_extra_to_install():
    """Without the trainer's dependencies (here: find_spec reports sklearn missing), `import peft_cp_merge.library`
    names the extra, `peft-cp-merge library ...` is a one-line error naming it, and merging still works."""
    r = _run("""
        import importlib.util, sys
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "sklearn" else real(name, *a)
        try:
            import peft_cp_merge.library
            print("imported")
        except ImportError as e:
            print("ImportError:", e)
        from peft_cp_merge.cli import main
        print("library rc", main(["library", "info", "somewhere"]))
        try:
            main(["merge", "--help"])
        except SystemExit as e:
            print("merge help rc", e.code)
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ImportError: peft_cp_merge.library needs sklearn" in r.stdout
    assert "library rc 2" in r.stdout and "merge help rc 0" in r.stdout
    assert "pip install 'peft-cp-merge[library]'" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_version_is_the_installed_distributions(capsys):
    """One version string: pyproject.toml's, as installed; the package and `peft-cp-merge --version` read it from the
    metadata (an editable install's metadata goes stale when the version changes: reinstall then)."""
    import importlib.metadata

    import tomllib

    import peft_cp_merge
    from peft_cp_merge.cli import main

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert peft_cp_merge.__version__ == importlib.metadata.version("peft-cp-merge") == declared
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"peft-cp-merge {declared}\n"
