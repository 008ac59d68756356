"""A small single-process LoRA training loop (demo, tests, benchmarks). The library trainer adds Accelerate."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .evaluate import encode
from .tasks import Example

logger = logging.getLogger(__name__)


def collate(tokenizer, examples: Sequence[Example], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Right-padded batch with the loss on the completion (and end token) only; prompts are cut from the left
    when an example exceeds ``max_length``."""
    rows = []
    for e in examples:
        p, c = encode(tokenizer, e.prompt, e.completion)
        p = p[max(0, len(p) + len(c) - max_length) :]
        rows.append((p + c, [-100] * len(p) + c))
    length = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
        "labels": torch.full((len(rows), length), -100, dtype=torch.long),
    }
    for i, (ids, labels) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, : len(ids)] = 1
        batch["labels"][i, : len(ids)] = torch.tensor(labels)
    return batch


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
    """Train ``adapter_name`` of a ``PeftModel`` on ``examples`` (AdamW, linear schedule); returns the losses."""
    model.set_adapter(adapter_name)  # also makes only this adapter trainable
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, warmup_steps, steps)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    order: list[int] = []
    bar = tqdm(range(steps), desc=f"train {adapter_name}", disable=not progress, leave=False)
    for step in bar:
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        idx, order = order[:batch_size], order[batch_size:]
        batch = {k: v.to(device) for k, v in collate(tokenizer, [examples[i] for i in idx], max_length).items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % 20 == 0 or step == steps - 1:
            logger.info("adapter %s step %d/%d loss %.4f", adapter_name, step + 1, steps, losses[-1])
    model.eval()
    return losses
