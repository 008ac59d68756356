"""The one optimisation loop (``peft_cp_merge.library.train.fit_adapter``) on a tiny random Llama, one process: the
demo's ``train_lora`` on it equals a plain-PyTorch reference loop, gradient accumulation keeps the global-token loss
normalisation, AdamW steps once per optimizer step, and the accelerator is left as it was found."""

import copy
import math
import random

import pytest
import torch
from _library import make_tiny_model

from peft_cp_merge.demo.tasks import make_examples

pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    path = make_tiny_model(tmp_path_factory.mktemp("fit") / "model")
    return path, AutoTokenizer.from_pretrained(path)


def _peft_model(path, dropout=0.0, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(path)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"])
    pm = get_peft_model(base, cfg, adapter_name="task")
    with torch.no_grad():  # B = 0 at init: give the update a direction, so that every step moves both factors
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return pm


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _reference_train(model, tok, examples, *, steps, batch_size, lr, warmup_steps, max_length, seed):
    """The demo loop written out in plain PyTorch: ``random.Random(seed)`` permutations of the examples one after
    another, right-padded batches with the loss on the completion + end token (prompt cut from the left), the
    Hugging Face mean token loss, AdamW without weight decay, linear warmup then linear decay, clip 1.0."""
    model.set_adapter("task")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warmup_steps if s < warmup_steps else max(0.0, (steps - s) / (steps - warmup_steps)))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    order, losses = [], []
    for _ in range(steps):
        while len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        idx, order = order[:batch_size], order[batch_size:]
        seqs = []
        for e in (examples[i] for i in idx):
            p = tok(e.prompt, add_special_tokens=False)["input_ids"]
            c = tok(e.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            p = p[max(0, len(p) + len(c) - max_length):]
            seqs.append((p + c, [-100] * len(p) + c))
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s, _ in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in seqs])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in seqs])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_train_lora_equals_a_plain_pytorch_loop(tiny):
    """Same batches in the same order (7 steps of 5 over 13 examples: three reshuffles, a batch across two of them),
    same LoRA dropout masks, same optimizer and schedule: same losses and adapter weights."""
    from peft_cp_merge.demo.training import train_lora

    path, tok = tiny
    examples = make_examples("add", 13, split="train", seed=0)
    kw = dict(steps=7, batch_size=5, lr=1e-2, warmup_steps=2, max_length=12, seed=3)  # max_length cuts prompts
    model = _peft_model(path, dropout=0.1)
    ref_model = copy.deepcopy(model)
    ref_losses = _reference_train(ref_model, tok, examples, **kw)
    torch.manual_seed(123)  # train_lora seeds torch itself
    losses = train_lora(model, tok, examples, adapter_name="task", progress=False, **kw)
    assert len(losses) == 7 and all(math.isfinite(x) for x in losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=0)
    got, want = _lora(model), _lora(ref_model)
    assert got.keys() == want.keys() and len(got) == 8
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=0, msg=n)
    assert any(not torch.equal(got[n], w) for n, w in _lora(_peft_model(path)).items())  # it did train
    assert not model.training


def _rows(tok, n=12):
    from peft_cp_merge.demo.training import encode_example

    return [encode_example(tok, e, 48) for e in make_examples("reverse", n, split="train", seed=1)]


def test_accumulation_keeps_the_global_token_normalisation(tiny, monkeypatch):
    """k micro-batches of b rows give the gradient of one batch of k*b rows (sum of token losses / answer tokens of
    the whole batch, with ``accelerator.backward``'s division by k undone): the same gradients, losses and weights as
    k=1 with batch k*b, the same order stream. AdamW.step runs once per optimizer step, and the accelerator's
    accumulation steps and micro-step counter are restored."""
    from accelerate import Accelerator

    from peft_cp_merge.library.train import fit_adapter

    path, tok = tiny
    rows = _rows(tok)
    calls = []
    real_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):  # records the gradients each real step applies
        calls.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    acc = Accelerator()
    results = {}
    for k, b in ((1, 6), (3, 2)):
        model = _peft_model(path)
        calls.clear()
        stats = fit_adapter(model, rows, accelerator=acc, pad_token_id=tok.pad_token_id, steps=4, batch_size=b,
                            gradient_accumulation_steps=k, lr=1e-2, order_seed=5, warmup_steps=1,
                            max_grad_norm=100.0, weight_decay=0.01, lr_scheduler="cosine", progress=False)
        assert len(calls) == 4, k  # the fault-injection hook of tests/_fault_cli.py counts on this
        assert stats["steps"] == 4 and stats["examples_seen"] == 24 and stats["losses"][0] == stats["loss_first"]
        assert acc.gradient_accumulation_steps == 1 and acc.step == 0
        results[k] = stats["losses"], _lora(model), list(calls)
    torch.testing.assert_close(torch.tensor(results[3][0]), torch.tensor(results[1][0]), atol=1e-6, rtol=0)
    for g3, g1 in zip(results[3][2], results[1][2]):  # the gradients themselves, not only Adam's scale-free steps
        for a, b in zip(g3, g1):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    for n, w in results[1][1].items():
        torch.testing.assert_close(results[3][1][n], w, atol=1e-6, rtol=0, msg=n)


def test_a_conflicting_accelerator_is_refused(tmp_path):
    """An accelerator told to accumulate over another number of micro-batches than the config is refused before
    anything is written (1, the default, is fine: the config's value is used)."""
    from accelerate import Accelerator

    from peft_cp_merge.library import LibraryConfigError, LibraryTrainConfig, train_library

    acc = Accelerator()
    acc.gradient_accumulation_steps = 3
    try:
        cfg = LibraryTrainConfig(output_dir=str(tmp_path / "out"), gradient_accumulation_steps=2)
        with pytest.raises(LibraryConfigError, match="accumulates gradients over 3 micro-batches"):
            train_library(cfg, dataset=[{"prompt": "a", "completion": "b"}], accelerator=acc)
    finally:
        acc.gradient_accumulation_steps = 1
    assert not (tmp_path / "out").exists()
