"""Smoke test of an installed peft-cp-merge wheel, run by .ci/wheel_check.sh in a fresh virtual environment, from a
directory outside the checkout (no downloads: the model is a tiny Llama built from a transformers config).

1. Two LoRA adapters of the tiny model, saved as plain PEFT folders.
2. ``peft-cp-merge merge a b --method cp`` (the console script) writes a merged adapter folder.
3. ``import peft_cp_merge`` and ``add_weighted_adapter(combination_type="cp")`` on the same two adapters: the CLI's
   folder, loaded back with plain PEFT, has the same update on every layer (both front ends share the method).
4. The merged update has the rank asked for and equals the weighted sum when that rank covers the sum.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

CHECKOUT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj", "down_proj"]
RANKS = {"math": 2, "code": 3}
WEIGHTS = [0.7, 0.4]


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).double()


def delta(layer: LoraLayer, name: str) -> torch.Tensor:
    A, B = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
    return float(layer.scaling[name]) * (B @ A)


def lora_layers(model) -> dict[str, LoraLayer]:
    return {k: m for k, m in model.named_modules() if isinstance(m, LoraLayer)}


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"wheel smoke test FAILED: {message}")


def main() -> None:
    import peft_cp_merge

    where = Path(peft_cp_merge.__file__).resolve()
    check(CHECKOUT not in where.parents, f"peft_cp_merge imported from the checkout ({where}), not the wheel")
    print(f"peft_cp_merge {peft_cp_merge.__version__} from {where.parent}")
    check(peft_cp_merge.is_registered(), "import peft_cp_merge did not register the combination types with PEFT")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = None
        for name, r in RANKS.items():
            config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
            if model is None:
                model = get_peft_model(base_model(), config, adapter_name=name)
            else:
                model.add_adapter(name, config)
        for config in model.peft_config.values():  # a model built from a config has no name: give the base one
            config.base_model_name_or_path = "tiny-llama"
        model.save_pretrained(tmp / "adapters", save_embedding_layers=False)
        sources = [str(tmp / "adapters" / n) for n in RANKS]

        rank = 4
        cmd = ["peft-cp-merge", "merge", *sources, "--method", "cp", "--rank", str(rank), "--weights",
               *map(str, WEIGHTS), "--out", str(tmp / "merged"), "--no-progress"]
        print("+", " ".join(cmd))
        subprocess.run(cmd, check=True)
        check((tmp / "merged" / "adapter_model.safetensors").is_file(), "the CLI wrote no adapter_model.safetensors")

        model.add_weighted_adapter(list(RANKS), WEIGHTS, "peft_cp", combination_type="cp", cp_rank=rank)
        model.load_adapter(str(tmp / "merged"), adapter_name="cli_cp")
        full = 2 + 3
        model.add_weighted_adapter(list(RANKS), WEIGHTS, "peft_cp_full", combination_type="cp", cp_rank=full)
        layers = lora_layers(model)
        check(len(layers) == 2 * len(TARGETS), f"expected {2 * len(TARGETS)} LoRA layers, found {len(layers)}")
        for key, layer in layers.items():
            ours, cli = delta(layer, "peft_cp"), delta(layer, "cli_cp")
            err = float((ours - cli).norm() / ours.norm())
            check(err < 1e-5, f"{key}: CLI merge differs from add_weighted_adapter (relative {err:.2e})")
            check(int(torch.linalg.matrix_rank(ours)) == rank, f"{key}: merged update is not of rank {rank}")
            target = sum(w * delta(layer, n) for n, w in zip(RANKS, WEIGHTS))
            err = float((delta(layer, "peft_cp_full") - target).norm() / target.norm())
            check(err < 1e-6, f"{key}: full-rank cp is not the weighted sum (relative {err:.2e})")

        reloaded = PeftModel.from_pretrained(base_model(), str(tmp / "merged"))
        x = torch.arange(10).reshape(1, 10)
        with torch.no_grad():
            model.set_adapter("cli_cp")
            check(torch.allclose(reloaded(x).logits, model(x).logits, atol=1e-8),
                  "the merged folder loaded with plain PEFT gives other outputs")
    print("wheel smoke test passed: CLI merge == add_weighted_adapter(cp) on every layer; plain-PEFT reload")


if __name__ == "__main__":
    main()
