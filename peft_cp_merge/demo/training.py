"""A small LoRA training loop (demo, tests, benchmarks): the demo's own tokenization on the library trainer's one
optimisation loop, :func:`peft_cp_merge.library.train.fit_adapter`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .evaluate import encode
from .tasks import Example

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def encode_example(tokenizer, example: Example, max_length: int = 128) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` with the loss on the completion (and end token) only; the prompt is cut from the left
    when the example exceeds ``max_length`` (the completion is kept whole)."""
    p, c = encode(tokenizer, example.prompt, example.completion)
    p = p[max(0, len(p) + len(c) - max_length) :]
    return p + c, [IGNORE_INDEX] * len(p) + c


def train_lora(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    adapter_name: str,
    steps: int = 60,
    batch_size: int = 8,
    lr: float = 2e-3,
    warmup_steps: int = 5,
    max_length: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train ``adapter_name`` of a ``PeftModel`` on ``examples``; returns the loss of every step.

    One micro-batch of ``batch_size`` examples per step, in the order of ``random.Random(seed)`` permutations of the
    examples (one after another), ``torch.manual_seed(seed)`` first (LoRA dropout); AdamW (no weight decay), linear
    schedule with ``warmup_steps``, gradients clipped to norm 1.0; the loss of a step is the mean token loss of its
    batch (the Hugging Face causal-LM loss). The batches go to the device of the model's parameters.
    """
    from accelerate import Accelerator

    from ..library.train import fit_adapter

    model.set_adapter(adapter_name)  # also makes only this adapter trainable
    # no arguments: reuses the process's AcceleratorState (e.g. mixed precision) instead of conflicting with it
    accelerator = Accelerator()
    torch.manual_seed(seed)
    rows = [encode_example(tokenizer, e, max_length) for e in examples]
    stats = fit_adapter(model, rows, accelerator=accelerator, pad_token_id=tokenizer.pad_token_id, steps=steps,
                        batch_size=batch_size, lr=lr, order_seed=seed, weight_decay=0.0, lr_scheduler="linear",
                        warmup_steps=warmup_steps, max_grad_norm=1.0, desc=f"adapter {adapter_name}", log_every=20,
                        progress=progress, log=logger)
    return stats["losses"]
