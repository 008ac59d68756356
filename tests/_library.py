"""Shared helpers of the library tests (tiny model, data, subprocess launches); no tests here."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASKS3 = ("add", "reverse", "weekday")


@contextlib.contextmanager
def offline(threads: int | None = None):
    """``HF_HUB_OFFLINE=1`` (and ``threads`` torch threads, if given) for the duration; both restored after."""
    import pytest
    import torch

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def make_tiny_model(path: Path) -> Path:
    """A random 2-layer Llama (hidden 32) with the SmolLM2 tokenizer, saved as safetensors to ``path``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peft_cp_merge.models import default_model_path

    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(default_model_path())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_rows(tasks=TASKS3, n=12, split="train", seed=0) -> list[dict]:
    from peft_cp_merge.demo.tasks import make_examples

    rows = []
    for t in tasks:
        rows += [e.to_dict() for e in make_examples(t, n, split=split, seed=seed)]
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_config(tmp: Path, model: Path, data: Path, out: Path, **kw):
    from peft_cp_merge.library import LibraryTrainConfig

    base = dict(output_dir=str(out), base_model=str(model), dataset=str(data), num_clusters=3, max_steps=3,
                batch_size=4, max_length=48, lora_r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                warmup_steps=1, kmeans_n_init=2, log_every=1)
    base.update(kw)
    return LibraryTrainConfig(**base)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict[str, str]:
    e = dict(os.environ)
    e.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
              "PYTHONPATH": str(REPO) + os.pathsep + e.get("PYTHONPATH", "")})
    e.pop("PEFT_CP_MERGE_TEST_FAIL", None)
    e.update(extra)
    return e


def run_cli(args, *, ranks: int = 1, timeout: float = 240, fail: str | None = None,
            **extra_env) -> subprocess.CompletedProcess:
    """``python -m peft_cp_merge.cli library ARGS`` on one process, or under
    ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N`` (real gloo ranks). ``fail``
    (``cluster=C,step=S[,rank=R][,mode=exit|raise]``) runs it through ``tests/_fault_cli.py`` instead, which injects
    that fault by monkeypatching."""
    module = "peft_cp_merge.cli"
    args = ["library", *args]
    if fail:
        module = "_fault_cli"
        extra_env = {"PEFT_CP_MERGE_TEST_FAIL": fail,
                     "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
                     **extra_env}
    if ranks == 1:
        cmd = [sys.executable, "-m", module, *args]
        e = env(**extra_env)
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(ranks),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", module, *args]
        e = env(ACCELERATE_USE_CPU="true", **extra_env)
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
