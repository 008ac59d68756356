"""Exact-match scoring of instruction examples by one teacher-forced forward pass.

A completion is produced exactly under greedy decoding iff, with the prompt and the completion fed in, every
completion token and the end token are the argmax of the logits one position before them. So one batched forward
pass scores a batch, with logits computed only at the scored positions (``logits_to_keep``): the 49k-vocabulary
LM head is the costly part of a small model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .tasks import Example


def encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt, and of the completion followed by the end token (tokenized separately, so the
    prompt/answer boundary is the same in training and scoring)."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return p, c


@torch.no_grad()
def exact_match(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 32, progress: bool = False):
    """``[bool]``: whether greedy decoding of each example's prompt yields exactly its completion + end token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[bool] = []
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc="exact match", disable=not progress, leave=False):
        enc = [encode(tokenizer, e.prompt, e.completion) for e in examples[start : start + batch_size]]
        length = max(len(p) + len(c) for p, c in enc)
        keep = max(len(c) for _, c in enc) + 1
        ids = torch.full((len(enc), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, c) in enumerate(enc):  # left padding: every sequence ends at the last position
            seq = p + c
            ids[i, length - len(seq) :] = torch.tensor(seq)
            mask[i, length - len(seq) :] = 1
        position_ids = (mask.cumsum(1) - 1).clamp_min(0)
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device),
            logits_to_keep=keep,
        ).logits
        pred = logits[:, :-1].argmax(-1).cpu()  # predictions for the last keep-1 tokens
        for i, (_, c) in enumerate(enc):
            results.append(pred[i, pred.shape[1] - len(c) :].tolist() == c)
    model.train(was_training)
    return results


def accuracy(model, tokenizer, examples: Sequence[Example], **kwargs) -> float:
    """Fraction of ``examples`` answered exactly (see :func:`exact_match`)."""
    hits = exact_match(model, tokenizer, examples, **kwargs)
    return sum(hits) / max(len(hits), 1)


def paired_difference(hits_a, hits_b, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Mean exact-match difference ``a - b`` and its paired bootstrap interval over the test prompts.

    ``hits_a[i]`` and ``hits_b[i]`` are per-prompt verdicts (0/1) of the two methods on the same prompts, one pair of
    equal-length sequences per (seed, task) cell, the cells in the same order; a task's cells (one per seed) list the
    same prompts in the same order. The statistic is the mean over cells. A resample draws prompt positions with
    replacement, the same for both methods and every cell: per task it resamples that task's test prompts
    (stratified by task, one joint draw per position; prompts of different tasks are independent, so the coupling
    adds no bias), the same prompts for every seed (seeds are not resampled: the interval is over test prompts, for
    these seeds). Prompt difficulty cancels out of the paired difference. ``scipy.stats.bootstrap``, percentile
    interval. Returns ``{"diff", "low", "high", "n_prompts"}``; ``[diff, diff]`` when no prompt's verdicts differ.
    """
    import numpy as np
    from scipy.stats import bootstrap

    a = np.asarray(hits_a, dtype=float)
    b = np.asarray(hits_b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"hits_a and hits_b must be equal, non-empty (cells x prompts) arrays; got {a.shape}, "
                         f"{b.shape}")
    per_prompt = (a - b).mean(axis=0)  # the mean over cells, per prompt position (same prompts in every cell)
    diff = float(per_prompt.mean())
    if np.all(per_prompt == per_prompt[0]):
        return {"diff": diff, "low": diff, "high": diff, "n_prompts": int(per_prompt.size)}
    res = bootstrap((per_prompt,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                    method="percentile", random_state=np.random.default_rng(seed))
    return {"diff": diff, "low": float(res.confidence_interval.low), "high": float(res.confidence_interval.high),
            "n_prompts": int(per_prompt.size)}
