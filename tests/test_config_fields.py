"""Every ``LoraConfig`` field is accounted for (``peft_cp_merge.config.LORA_CONFIG_FIELDS``): merged, required equal,
refused, or the first adapter's, checked field by field against PEFT's own dataclass and through both front ends
(``add_weighted_adapter`` and ``merge_adapters``)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from _models import make_peft_model, save_tiny_adapters
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn

from peft_cp_merge import MergeInputError, UnsupportedAdapterError, merge_adapters
from peft_cp_merge import config as cfgmod
from peft_cp_merge.config import LORA_CONFIG_FIELDS, merged_config

PRESENT = {f.name for f in dataclasses.fields(LoraConfig)}
KINDS = {"merged", "equal", "refused", "first"}

# a value of each refused field that an adapter can have (PEFT's LoraConfig accepts it) and the merge refuses
REFUSED = {
    "peft_type": "IA3",
    "bias": "all",
    "modules_to_save": ["head"],
    "init_lora_weights": "pissa",
    "megatron_config": {"x": 1},
    "trainable_token_indices": [1, 2],
    "use_dora": True,
    "velora_config": {},
    "alora_invocation_tokens": [1, 2],
    "use_qalora": True,
    "monteclora_config": {},
    "lora_bias": True,
    "target_parameters": ["c1d.weight"],
    "use_bdlora": {},
    "arrow_config": {},
    "kasa_config": {},
}
# two values of each required-equal field
EQUAL = {
    "task_type": ("CAUSAL_LM", "SEQ_2_SEQ_LM"),
    "auto_mapping": ({"base_model_class": "A", "parent_library": "x"},
                     {"base_model_class": "B", "parent_library": "x"}),
    "revision": ("v1", "v2"),
    "layer_replication": ([[0, 1]], [[0, 1], [0, 1]]),
    "ensure_weight_tying": (False, True),
}


def test_every_lora_config_field_is_in_the_table():
    """A field PEFT adds fails here until someone decides what a merge does with it (fields of a newer PEFT that the
    installed one lacks are fine)."""
    missing = sorted(PRESENT - set(LORA_CONFIG_FIELDS))
    assert not missing, f"LoraConfig fields with no rule in peft_cp_merge.config.LORA_CONFIG_FIELDS: {missing}"
    for name, rule in LORA_CONFIG_FIELDS.items():
        assert rule.kind in KINDS and rule.how.strip(), name
        if rule.kind == "refused":
            assert rule.allowed is not None, name


def test_every_refused_and_equal_field_has_a_case_here():
    refused = {n for n, r in LORA_CONFIG_FIELDS.items() if r.kind == "refused" or (r.kind == "merged" and r.allowed)}
    assert refused & PRESENT <= set(REFUSED)
    assert {n for n, r in LORA_CONFIG_FIELDS.items() if r.kind == "equal"} & PRESENT <= set(EQUAL)
    for name, value in REFUSED.items():  # the value is refused, the field's default is not
        rule = LORA_CONFIG_FIELDS[name]
        default = {"peft_type": "LORA"}.get(name, cfgmod._field_defaults().get(name))
        assert not rule.allowed(value) and rule.allowed(default), name


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two float64 TinyNet adapters as plain PEFT folders."""
    root = tmp_path_factory.mktemp("adapters")
    _, paths = save_tiny_adapters(root, {"x": {"r": 2, "target_modules": ["lin0", "conv1"]},
                                         "y": {"r": 3, "target_modules": ["lin0", "conv1"]}})
    return [Path(p) for p in paths]


def _edited(folder: Path, dst: Path, **changes) -> str:
    shutil.copytree(folder, dst)
    p = dst / "adapter_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))
    return str(dst)


def _peft_model_with(**changes):
    model = make_peft_model({"x": {"r": 2, "target_modules": ["lin0", "conv1"]},
                             "y": {"r": 3, "target_modules": ["lin0", "conv1"]}})
    for k, v in changes.items():
        setattr(model.peft_config["y"], k, v)
    return model


@pytest.mark.parametrize("field", sorted(set(REFUSED) & PRESENT))
def test_refused_field_through_both_front_ends(field, saved, tmp_path):
    value = REFUSED[field]
    model = _peft_model_with(**{field: value})
    with pytest.raises(UnsupportedAdapterError, match=f"'y'.*{field}|'y' is a IA3|'y' uses DoRA"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="cp")
    assert "m" not in model.peft_config
    bad = _edited(saved[1], tmp_path / "bad", **{field: value})
    with pytest.raises(UnsupportedAdapterError, match=f"{field}|is a IA3 adapter|uses DoRA"):
        merge_adapters([str(saved[0]), bad], progress=False)


@pytest.mark.parametrize("field", sorted(set(EQUAL) & PRESENT))
def test_required_equal_field_through_both_front_ends(field, saved, tmp_path):
    a, b = EQUAL[field]
    model = _peft_model_with()
    setattr(model.peft_config["x"], field, a)
    setattr(model.peft_config["y"], field, b)
    with pytest.raises(MergeInputError, match=f"differ in {field}"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "m", combination_type="cp")
    assert "m" not in model.peft_config
    x = _edited(saved[0], tmp_path / "x", **{field: a})
    y = _edited(saved[1], tmp_path / "y", **{field: b})
    with pytest.raises(MergeInputError, match=f"differ in {field}"):
        merge_adapters([x, y], progress=False)
    # the same value merges, and the merged config keeps it
    y_same = _edited(saved[1], tmp_path / "y_same", **{field: a})
    merged = merge_adapters([x, y_same], progress=False)
    assert cfgmod._norm(getattr(merged.config, field)) == cfgmod._norm(getattr(LoraConfig(**{field: a}), field))


def test_unset_task_type_agrees_with_any(saved, tmp_path):
    y = _edited(saved[1], tmp_path / "y", task_type="CAUSAL_LM")
    assert merge_adapters([str(saved[0]), y], progress=False).config.task_type == "CAUSAL_LM"


def test_merged_config_fields():
    """The merged and first-adapter fields take the values the table describes."""
    a = LoraConfig(r=2, lora_alpha=7, target_modules=["q"], use_rslora=True, rank_pattern={"q": 4},
                   alpha_pattern={"q": 3}, init_lora_weights="gaussian", lora_dropout=0.1)
    b = LoraConfig(r=3, target_modules=["v"], init_lora_weights="eva", eva_config={"rho": 2.0}, lora_dropout=0.3)
    if "peft_version" in PRESENT:
        a.peft_version = "0.0.1"
    m = merged_config([a, b], 5)
    assert (m.r, m.lora_alpha, m.use_rslora, m.rank_pattern, m.alpha_pattern) == (5, 5, False, {}, {})
    assert m.init_lora_weights is True and m.eva_config is None and m.lora_dropout == 0.1
    assert set(m.target_modules) == {"q", "v"}
    if "peft_version" in PRESENT:
        import peft
        assert m.peft_version.split("@")[0] == peft.__version__


def test_a_field_missing_from_the_table_is_refused_unless_default(monkeypatch):
    """At run time, a LoraConfig field the table does not know (a newer PEFT's) is refused when it is not default."""
    monkeypatch.delitem(LORA_CONFIG_FIELDS, "lora_dropout")
    cfgmod.check_lora_config(LoraConfig(target_modules=["q"]), "a")
    with pytest.raises(UnsupportedAdapterError, match="lora_dropout=0.2.*does not know"):
        cfgmod.check_lora_config(LoraConfig(target_modules=["q"], lora_dropout=0.2), "a")


# --- layers_to_transform / layers_pattern / exclude_modules: the union with PEFT's semantics, or refused ------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.v(torch.tanh(self.q(x)))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block() for _ in range(3)])


class Stack(nn.Module):
    """Three blocks in ``model.layers`` (module names ``model.layers.<i>.q``), as in a transformers decoder."""

    def __init__(self):
        super().__init__()
        self.model = Decoder()

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return x


def _stack_model(adapters):
    torch.manual_seed(0)
    model = None
    for i, (name, kw) in enumerate(adapters.items()):
        cfg = LoraConfig(r=2, lora_alpha=4, **kw)
        if model is None:
            model = get_peft_model(Stack().double(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".{name}." in pname and "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


UNITABLE = {"p1": {"target_modules": ["q", "v"], "layers_to_transform": [0]},
            "p2": {"target_modules": ["q", "v"], "layers_to_transform": 2}}


def _both_active_output(model, x):
    """PEFT's own forward with both adapters active (their updates summed): the reference for weights [1, 1]."""
    model.base_model.set_adapter(["p1", "p2"])
    with torch.no_grad():
        return model(x)


def test_different_layers_are_united_through_add_weighted_adapter():
    model = _stack_model(UNITABLE)
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = _both_active_output(model, x)
    model.add_weighted_adapter(["p1", "p2"], [1.0, 1.0], "m", combination_type="cp", cp_rank=2)
    assert sorted(model.peft_config["m"].layers_to_transform) == [0, 2]
    model.set_adapter("m")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-10)


def test_different_layers_are_united_through_merge_adapters(tmp_path):
    model = _stack_model(UNITABLE)
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = _both_active_output(model, x)
    model.save_pretrained(tmp_path / "src")
    merged = merge_adapters([str(tmp_path / "src" / "p1"), str(tmp_path / "src" / "p2")], [1.0, 1.0], rank=2,
                            base_model="stack", progress=False)
    out = merged.save_pretrained(tmp_path / "merged")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Stack().double(), str(out))
    layers = {k: m for k, m in loaded.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == sorted(f"model.layers.{i}.{p}" for i in (0, 2) for p in "qv")
    # every module of the merged file is applied by PEFT, and the output is the two adapters' together
    assert len(load_file(str(out / "adapter_model.safetensors"))) == 2 * len(layers)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("adapters", [
    {"p1": {"target_modules": ["q"], "layers_to_transform": [0]},
     "p2": {"target_modules": ["v"], "layers_to_transform": [1]}},
    {"p1": {"target_modules": ["q", "v"], "exclude_modules": ["model.layers.0.q"]},
     "p2": {"target_modules": ["q", "v"]}},
    {"p1": {"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": "layers"},
     "p2": {"target_modules": ["q"], "layers_to_transform": [1]}},
], ids=["targets and layers", "exclude_modules", "layers_pattern"])
def test_selections_no_single_config_expresses_are_refused(adapters, tmp_path):
    model = _stack_model(adapters)
    with pytest.raises(MergeInputError, match="select their modules differently"):
        model.add_weighted_adapter(["p1", "p2"], [1.0, 1.0], "m", combination_type="cp", cp_rank=2)
    assert "m" not in model.peft_config
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(MergeInputError, match="select their modules differently"):
        merge_adapters([str(tmp_path / "src" / n) for n in ("p1", "p2")], base_model="stack", progress=False)
