"""Bounded parsing of untrusted text: the one YAML reader (``peft_cp_merge._yaml.load_yaml``) behind recipes,
model cards, ``--option``/``--set`` values and library train configs; the card's one visible recipe block and
names that round-trip through a card; and the CP merge of a repeated adapter with ``cp_init="tasks"``."""

import shutil
import time
import tracemalloc

import pytest
import torch
from _models import cli_one_line, delta_matrix, lora_layers, random_factors, save_tiny_adapters

from peft_cp_merge import LoraFactors, MergeInputError, get_merge_method, load_recipe, merge_adapters
from peft_cp_merge._yaml import MAX_YAML_DEPTH, load_yaml
from peft_cp_merge.errors import PeftCpMergeError
from peft_cp_merge.files.recipe import RECIPE_START, card_recipe

# the classic "billion laughs": 10 anchors, each a list of nine aliases of the one before (10^9 strings if expanded)
LAUGHS = '  lol0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"  lol{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n" for i in range(1, 10)
)  # a mapping's entries, indented to sit under `options:`
DEEP = "[" * 5000 + "]" * 5000


_cli = cli_one_line  # (exit code, stderr); a failure is exactly one line, no traceback


def _bounded(fn):
    """Run ``fn``; return (seconds, peak bytes Python allocated meanwhile)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return seconds, peak


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two float64 TinyNet adapters as plain PEFT folders (base model 'tiny-net')."""
    root = tmp_path_factory.mktemp("adapters")
    return save_tiny_adapters(root, {"x": {"r": 2}, "y": {"r": 3}})


# --- the YAML reader -------------------------------------------------------------------------------------------------

def test_billion_laughs_recipe_is_refused_fast_without_memory(tmp_path, capsys):
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text("sources: [a, b]\noptions:\n" + LAUGHS + "  cp_init: *a9\n")
    assert recipe.stat().st_size <= 700

    def load():
        with pytest.raises(MergeInputError, match="anchors or aliases"):
            load_recipe(recipe)

    seconds, peak = _bounded(load)
    assert seconds < 2 and peak < 5 * 2**20
    rc, err = _cli(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 2 and "anchors or aliases" in err and not (tmp_path / "out").exists()


def test_billion_laughs_option_value_is_refused_fast_without_memory(saved, tmp_path, capsys):
    value = "{" + ", ".join(line.strip() for line in LAUGHS.splitlines()) + ", x: *a9}"
    argv = ["merge", *saved[1], "--out", str(tmp_path / "out"), "--no-progress", "--option", f"cp_init={value}"]
    seconds, peak = _bounded(lambda: _cli(argv, capsys))
    rc, err = _cli(argv, capsys)
    assert rc == 2 and "anchors or aliases" in err and "--option" in err and not (tmp_path / "out").exists()
    assert seconds < 5 and peak < 5 * 2**20


@pytest.mark.parametrize(("text", "match"), [
    (DEEP, f"deeper than {MAX_YAML_DEPTH}"),
    ("a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 60)) + " " * 60 + "v\n", "deeper than"),
    ("rank: 2\nmethod: cp\nrank: 8\n", "key 'rank' twice"),
    ("options: {cp_init: svd, cp_init: tasks}\n", "key 'cp_init' twice"),
    ("!!python/object/apply:os.system ['true']\n", "tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("sources: !!set {a, b}\n", "tag"),
    ("base: &b {method: cp}\n<<: *b\n", "anchors or aliases"),
    ("<<: {method: cp}\n", "merge key"),
    ("sources: [a\n", "not valid YAML"),
], ids=["deep flow", "deep block", "duplicate", "duplicate nested", "python tag", "set tag", "alias", "merge key",
        "syntax"])
def test_loader_refuses_with_one_clear_message(text, match):
    with pytest.raises(MergeInputError, match=match) as e:
        load_yaml(text, "Recipe 'r.yaml'", error=MergeInputError)
    assert str(e.value).startswith("Recipe 'r.yaml' ") and "\n" not in str(e.value)


def test_loader_reads_plain_yaml_and_bounds_size():
    text = "sources: [a, {source: u/r, revision: 2024-01-01}]\nweights: [0.5, 5e-1]\nrank: 4\nx: null\ny: true\n"
    assert load_yaml(text, "r") == {"sources": ["a", {"source": "u/r", "revision": "2024-01-01"}],
                                    "weights": [0.5, "5e-1"], "rank": 4, "x": None, "y": True}
    assert load_yaml("", "r") is None
    nested = "[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH  # exactly the limit is fine
    assert load_yaml(nested, "r") is not None
    with pytest.raises(PeftCpMergeError, match="more than the 100 accepted"):
        load_yaml("a: " + "x" * 200, "r", max_bytes=100)


@pytest.mark.parametrize(("body", "match"), [
    ("sources: " + DEEP + "\n", "deeper than"),
    ("sources: [a, b]\nrank: 2\nrank: 8\n", "key 'rank' twice"),
], ids=["deep", "duplicate"])
def test_deep_or_duplicate_recipe_is_one_error_line(body, match, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(body)
    with pytest.raises(MergeInputError, match=match):
        load_recipe(recipe)
    rc, err = _cli(["merge", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 2 and match.split()[0] in err


@pytest.mark.parametrize(("value", "match"), [
    (DEEP, "deeper than"),
    ("{a: 1, a: 2}", "key 'a' twice"),
    ("!!python/object/apply:os.system ['true']", "tag"),
    ("x" * 70000, "more than the 65536 accepted"),
], ids=["deep", "duplicate", "python tag", "too long"])
def test_bad_option_and_set_values_are_one_error_line(value, match, saved, tmp_path, capsys):
    rc, err = _cli(["merge", *saved[1], "--out", str(tmp_path / "o"), "--option", f"cp_init={value}"], capsys)
    assert rc == 2 and match in err and "--option" in err
    rc, err = _cli(["library", "train", "--print-config", "--set", f"lora_r={value}"], capsys)
    assert rc == 2 and match in err


@pytest.mark.parametrize(("body", "match"), [
    ("lora_r: !!python/object/apply:os.system ['echo pwned > pwned.txt']\n", "tag"),
    ("!!python/object:peft_cp_merge.library.config.LibraryTrainConfig {lora_r: 4}\n", "tag"),
    ("lora_r: 4\nlora_r: 16\n", "key 'lora_r' twice"),
    ("lora_r: " + DEEP + "\n", "deeper than"),
    ("lora_r: *missing\n", "anchors or aliases"),
], ids=["python apply", "python object", "duplicate", "deep", "alias"])
def test_library_train_config_is_one_error_line(body, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "library.yaml"
    config.write_text(body)
    rc, err = _cli(["library", "train", "--config", str(config), "--print-config"], capsys)
    assert rc == 2 and err.startswith("error: Config file") and match in err
    assert not (tmp_path / "pwned.txt").exists()


# --- the card's one visible recipe block, and names that round-trip --------------------------------------------------

@pytest.fixture(scope="module")
def card(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "merged"
    merge_adapters(saved[1], rank=2, progress=False).save_pretrained(out)
    return out / "README.md"


HIDDEN = f"<!--\n{RECIPE_START}\n```yaml\nsources: [evil-org/backdoor]\nrank: 2\n```\n-->\n"


@pytest.mark.parametrize(("edit", "match"), [
    (lambda t: t.replace("## Use", HIDDEN + "## Use"), "appears 2 times"),  # hidden before the visible one
    (lambda t: t + "\n" + HIDDEN, "appears 2 times"),  # hidden after it
    (lambda t: t.replace(RECIPE_START + "\n", "<!-- the recipe, hidden:\n" + RECIPE_START + "\n"), "inside an HTML"),
    (lambda t: t + "\n```yaml\nsources: [evil-org/backdoor]\n```\n", "2 ```yaml blocks"),
    (lambda t: t.replace(RECIPE_START + "\n", RECIPE_START + "\nsee below\n"), "not directly followed"),
    (lambda t: t.replace("## Use", "```\n" + RECIPE_START + "\n```\n## Use"), "appears 2 times"),
    (lambda t: t[: t.rindex("```")], "never closed"),
], ids=["hidden before", "hidden after", "marker in comment", "second yaml block", "marker not before block",
        "marker in code", "unclosed"])
def test_card_with_other_than_one_visible_recipe_is_refused(card, tmp_path, capsys, edit, match):
    text = card.read_text()
    assert load_recipe(card)["sources"] != ["evil-org/backdoor"]
    hostile = tmp_path / "README.md"
    hostile.write_text(edit(text))
    with pytest.raises(MergeInputError, match=match):
        load_recipe(hostile)
    rc, err = _cli(["merge", "--recipe", str(hostile), "--out", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 2 and "refusing to guess" in err and not (tmp_path / "out").exists()


HOSTILE_NAMES = [
    "a`b``c",
    "```yaml\nsources: [evil-org/backdoor]\n```",
    "~~~\n<!-- x",
    RECIPE_START,
    "--> <!-- hidden",
    "pipe | star * under_score [link](http://x) <b>bold</b> &amp; $x$",
    "tab\tnewline\ncr\rend\\",
    "ünïcödé 😀 \u2028",
    "- item: 1\n  rank: 99",
    "{{ 7 * 7 }} {% raw %} {# jinja: the card template must never evaluate a name",
]


def test_hostile_folder_names_round_trip_through_the_card(saved, tmp_path):
    folders = []
    for i, name in enumerate(HOSTILE_NAMES):
        folder = tmp_path / f"{i}{name}"
        shutil.copytree(saved[1][i % 2], folder)
        folders.append(str(folder))
    merged = merge_adapters(folders, rank=2, progress=False)
    out = merged.save_pretrained(tmp_path / "merged")
    text = (out / "README.md").read_text()
    recipe = load_recipe(out / "README.md")
    assert recipe["sources"] == folders and recipe["weights"] == merged.recipe["weights"]
    assert recipe["rank"] == 2 and recipe["method"] == "cp"
    # the card's structure is the writer's, whatever the names: one marker, the python and yaml fences only, one
    # table row per source, no HTML comment but the marker
    assert text.count(RECIPE_START) == 1 and text.count("<!--") == 1
    fences = [line for line in text.splitlines() if line.lstrip().startswith(("```", "~~~"))]
    assert fences == ["```python", "```", "```yaml", "```"]
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2:3].isdigit()]
    assert len(rows) == len(folders)
    assert load_yaml(card_recipe(text), "card").keys() == merged.recipe.keys()  # no name added a field


def test_hostile_base_model_name_round_trips(saved, tmp_path):
    base = "evil\n```\n<!-- peft-cp-merge recipe -->\n---\nbase: x"
    merged = merge_adapters(saved[1], rank=2, base_model=base, progress=False)
    out = merged.save_pretrained(tmp_path / "merged")
    text = (out / "README.md").read_text()
    assert load_recipe(out / "README.md")["base_model"] == base
    assert text.count(RECIPE_START) == 1
    assert "base_model:" not in text.split("---")[1]  # not a Hub id: kept out of the card's metadata


# --- cp_init="tasks" with a repeated adapter -------------------------------------------------------------------------

def _delta(f: LoraFactors) -> torch.Tensor:
    return f.scaling * f.B @ f.A


@pytest.mark.parametrize("rank", [2, 4, 6, 8])
@pytest.mark.parametrize("variant", ["weighted", "balanced"])
def test_repeated_task_with_tasks_init_equals_one_task_with_summed_weight(rank, variant):
    """X twice with weights w1, w2 is X once with w1 + w2: at full rank (4) and above that is (w1 + w2) X exactly;
    below, the same as merging X alone."""
    (f,) = random_factors([4])
    cp = get_merge_method("cp")
    got = cp.merge_batch([[f, f]], [[0.3, 0.7]], rank=rank, cp_init="tasks", cp_variant=variant)[0]
    once = cp.merge_batch([[f]], [[1.0]], rank=min(rank, 4), cp_init="svd", cp_variant=variant)[0]
    ref = _delta(once) if rank < 4 else 1.0 * _delta(f)
    assert float((_delta(got) - ref).norm() / ref.norm()) < 1e-10


@pytest.mark.parametrize("rank", [5, 6, 8])
def test_repeated_task_among_others_at_full_rank(rank):
    """[f, g, f] has tensor rank 5 (= rank f + rank g): from rank 5 on, the merge is exactly the weighted sum."""
    f, g = random_factors([3, 2], seed=1)
    w = [0.2, 0.5, 0.3]
    got = get_merge_method("cp").merge_batch([[f, g, f]], [w], rank=rank, cp_init="tasks")[0]
    ref = (w[0] + w[2]) * _delta(f) + w[1] * _delta(g)
    assert float((_delta(got) - ref).norm() / ref.norm()) < 1e-10


def test_same_adapter_twice_through_both_front_ends(saved, tmp_path):
    model, paths = saved
    model.add_weighted_adapter(["x", "x"], [0.3, 0.5], "twice", combination_type="cp", cp_init="tasks")
    try:
        for key, layer in lora_layers(model).items():
            ref = 0.8 * delta_matrix(layer, "x")
            assert float((delta_matrix(layer, "twice") - ref).norm() / ref.norm()) < 1e-9, key
    finally:
        model.delete_adapter("twice")
    merged = merge_adapters([paths[0], paths[0]], [0.3, 0.5], progress=False, cp_init="tasks")
    for key, layer in lora_layers(model).items():
        name = f"base_model.model.{key}"
        A = merged.tensors.get(f"{name}.lora_A.weight", merged.tensors.get(f"{name}.lora_embedding_A"))
        B = merged.tensors.get(f"{name}.lora_B.weight", merged.tensors.get(f"{name}.lora_embedding_B"))
        update = B.flatten(1) @ A.flatten(1)
        ref = 0.8 * delta_matrix(layer, "x")
        assert float((update - ref).norm() / ref.norm()) < 1e-9, key


# --- library cards and deep JSON -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["trained", "built"])
def test_hostile_names_keep_the_library_card_structure(kind):
    """A library card's names (base model, embedding model, built members) and its yaml block cannot add a fence,
    an HTML comment or a field, whatever they hold; the yaml block reads back as what was written."""
    from peft_cp_merge.library.library import render_card

    evil = "x\n```\n<!-- y -->\n~~~\n`z`"
    meta = {"base_model": evil, "embedding_model": evil, "clusters": [
        {"name": "cluster_0", "size": 2, "status": "done", "previews": [evil],
         "members": [{"source": HOSTILE_NAMES[0]}, {"source": evil}]}],
        "training": {"num_clusters": 1, "lora_r": 8, "target_modules": [evil]}}
    if kind == "built":
        meta.update(kind="built", num_adapters=2, clustering={"method": evil}, merge={"method": "cp", "rank": 8})
    text = render_card(meta)
    fences = [line for line in text.splitlines() if line.lstrip().startswith(("```", "~~~"))]
    assert fences == ["```python", "```", "```yaml", "```"]
    assert "<!--" not in text
    block = text.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    expected = ({"clustering": meta["clustering"], "merge": meta["merge"]} if kind == "built"
                else meta["training"])
    assert load_yaml(block, "card") == expected


def test_deeply_nested_json_is_one_clear_error(saved, tmp_path):
    from peft_cp_merge.library import AdapterLibrary, LibraryFormatError

    folder = tmp_path / "deep"
    shutil.copytree(saved[1][0], folder)
    (folder / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MergeInputError, match="nested too deeply"):
        merge_adapters([str(folder), saved[1][1]], progress=False)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "library.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LibraryFormatError, match="nested too deeply"):
        AdapterLibrary.from_pretrained(lib)
