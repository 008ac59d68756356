"""Per-task and joint LoRA adapters: trained with ``peft_cp_merge.demo.training.train_lora``, cached on disk.

The cache key is a hash of everything that changes the weights (model, LoRA config, steps, lr, batch size,
max length, training data size, data seed, seed), so a rerun with the same settings loads the adapters instead of
training them: ``<cache>/<hash>/<task>/`` (a plain PEFT adapter folder plus ``train_info.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from peft_cp_merge._io import atomic_folder
from peft_cp_merge.demo.tasks import Example
from peft_cp_merge.demo.training import train_lora

logger = logging.getLogger("benchmarks.quality")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CACHE_VERSION = 1


@dataclass(frozen=True)
class AdapterConfig:
    """The one LoRA/training config shared by every adapter of the benchmark."""

    model: str
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = field(default_factory=lambda: tuple(LLAMA_TARGETS))
    steps: int = 24
    joint_steps: int = 48
    batch_size: int = 8
    lr: float = 3e-3
    max_length: int = 64
    n_train: int = 200
    data_seed: int = 0

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM")

    @classmethod
    def from_args(cls, args) -> AdapterConfig:
        """The adapters' config of a benchmark run, from its parsed arguments (no ``--model``: the embedded model)."""
        return cls(model=args.model or "HuggingFaceTB/SmolLM2-135M-Instruct (embedded)", rank=args.rank,
                   alpha=args.alpha, target_modules=tuple(args.targets), steps=args.steps,
                   joint_steps=args.joint_steps, batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                   n_train=args.n_train, data_seed=0)

    def key(self, seed: int) -> str:
        """The cache folder of one seed's adapters. ``joint_steps`` is left out (the joint adapter's folder is named
        by its steps and task list), so runs over different task lists share their per-task adapters."""
        d = {**asdict(self), "target_modules": list(self.target_modules), "seed": seed, "v": CACHE_VERSION}
        del d["joint_steps"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def adapter_seed(seed: int, name: str) -> int:
    """Seed of one adapter's init and data order: depends on the run seed and the adapter, not the task list."""
    return seed * 100_003 + zlib.crc32(name.encode()) % 100_003


def _add_adapter(pm, base, name: str, cfg: AdapterConfig, path: Path | None):
    """Add ``name`` (fresh, or loaded from ``path``) to the PeftModel ``pm``; ``pm is None`` wraps ``base``."""
    from peft import PeftModel, get_peft_model

    if pm is None:
        if path is None:
            return get_peft_model(base, cfg.lora_config(), adapter_name=name)
        return PeftModel.from_pretrained(base, str(path), adapter_name=name)
    if path is None:
        pm.add_adapter(name, cfg.lora_config())
    else:
        pm.load_adapter(str(path), adapter_name=name)
    return pm


def _save(pm, name: str, dest: Path, info: dict) -> None:
    """Save one adapter as a plain PEFT folder plus ``train_info.json``, atomically (temporary folder + rename)."""

    def write(tmp: Path) -> None:
        pm.save_pretrained(str(tmp), selected_adapters=[name])
        sub = tmp / name  # PEFT saves a non-default adapter into a subfolder named after it
        if sub.is_dir():
            for f in sub.iterdir():
                f.rename(tmp / f.name)
            sub.rmdir()
        (tmp / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")

    atomic_folder(dest, write, overwrite=True)


def _cached(path: Path) -> bool:
    return (path / "adapter_model.safetensors").is_file() and (path / "train_info.json").is_file()


def build_adapters(base, tok, train: dict[str, list[Example]], cfg: AdapterConfig, seed: int, cache: Path,
                   *, joint: bool = True, per_task: bool = True, progress: bool = True):
    """A PeftModel over ``base`` holding one adapter per task (named by the task; not with ``per_task=False``) and
    ``joint`` (trained on all tasks' data), each trained once and then loaded from ``cache``. Returns
    ``(peft_model, info)``, where ``info`` maps adapter name -> {cached, seconds, loss_first, loss_last, path}."""
    from tqdm.auto import tqdm

    root = cache / cfg.key(seed)
    tasks = list(train)
    jobs = [(t, train[t], cfg.steps, root / t) for t in tasks] if per_task else []
    if joint:
        tag = hashlib.sha256(json.dumps(sorted(tasks)).encode()).hexdigest()[:8]
        pooled = [e for t in tasks for e in train[t]]
        jobs.append(("joint", pooled, cfg.joint_steps, root / f"joint-{cfg.joint_steps}-{tag}"))
    pm = None
    info: dict[str, dict] = {}
    for name, examples, steps, path in tqdm(jobs, desc=f"adapters seed {seed}", disable=not progress):
        if _cached(path):
            pm = _add_adapter(pm, base, name, cfg, path)
            meta = json.loads((path / "train_info.json").read_text())
            info[name] = {**{k: meta[k] for k in ("seconds", "loss_first", "loss_last")}, "cached": True,
                          "path": str(path)}
            logger.info("adapter %s (seed %d): loaded from cache %s", name, seed, path)
            continue
        torch.manual_seed(adapter_seed(seed, name))  # LoRA init (A random, B zero)
        pm = _add_adapter(pm, base, name, cfg, None)
        t0 = time.perf_counter()
        losses = train_lora(pm, tok, examples, adapter_name=name, steps=steps, batch_size=cfg.batch_size,
                            lr=cfg.lr, max_length=cfg.max_length, seed=adapter_seed(seed, name), progress=progress)
        seconds = time.perf_counter() - t0
        meta = {"adapter": name, "seed": seed, "steps": steps, "examples": len(examples), "seconds": seconds,
                "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
                "config": {**asdict(cfg), "target_modules": list(cfg.target_modules)}}
        _save(pm, name, path, meta)
        info[name] = {"seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1], "cached": False,
                      "path": str(path)}
        logger.info("adapter %s (seed %d): trained %d steps in %.0fs, loss %.3f -> %.3f", name, seed, steps,
                    seconds, losses[0], losses[-1])
    pm.eval()
    return pm, info
