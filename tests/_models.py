"""Tiny models for tests (importable from subprocesses: ``sys.path.insert(0, tests_dir)``)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

SEQ = 5
TARGETS = ["emb", "lin0", "conv1", "conv2", "conv3", "c1d"]


class TinyNet(nn.Module):
    """Embedding -> Linear -> Conv1d -> Conv2d -> Conv3d -> GPT-2 Conv1D (fan_in_fan_out) -> Linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.lin0 = nn.Linear(12, 20)
        self.conv1 = nn.Conv1d(20, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, (3, 3), padding=1)
        self.conv3 = nn.Conv3d(8, 6, 3, padding=1)
        self.c1d = Conv1D(10, 6 * SEQ)  # Conv1D(nf=out, nx=in): weight (in, out)
        self.head = nn.Linear(10, 3)

    def forward(self, ids):
        x = torch.relu(self.lin0(self.emb(ids)))  # b, s, 20
        x = torch.relu(self.conv1(x.transpose(1, 2)))  # b, 16, s
        x = torch.relu(self.conv2(x[..., None]))  # b, 8, s, 1
        x = torch.relu(self.conv3(x[..., None]))  # b, 6, s, 1, 1
        return self.head(torch.relu(self.c1d(x.flatten(1))))


def inputs(seed=0, batch=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30, (batch, SEQ), generator=g)


def randomize_lora(model, adapter, seed):
    """LoRA B starts at zero in PEFT; give both factors random values so every update is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter}" in name and "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)


def delta_matrix(layer, adapter):
    """PEFT's own ``get_delta_weight`` put in LoRA-factor orientation (out x in): an independent reference.
    Detached: the adapters are trainable, and a reference is a value, not a node of an autograd graph."""
    d = layer.get_delta_weight(adapter).detach()
    if adapter in getattr(layer, "lora_embedding_A", {}) or getattr(layer, "fan_in_fan_out", False):
        return d.T
    return d.flatten(1)


def make_peft_model(adapters, dtype=torch.float64, seed=0):
    """TinyNet with PEFT LoRA adapters ``{name: LoraConfig kwargs}``, randomized, in ``dtype``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = TinyNet().to(dtype)
    model = None
    for i, (name, kw) in enumerate(adapters.items()):
        cfg = LoraConfig(**{"target_modules": TARGETS, **kw})
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        randomize_lora(model, name, seed=seed * 100 + i)
    return model.to(dtype)


def assert_loads_with_plain_peft(adapter_dir, x, expected, rank, tmp_path, rtol=1e-6, atol=1e-8):
    """In a fresh interpreter that never imports ``peft_cp_merge``, plain ``PeftModel.from_pretrained`` on a
    float64 ``TinyNet`` loads ``adapter_dir`` as a rank-``rank`` LoRA and maps ``x`` to ``expected``."""
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from _models import TinyNet
        from peft import PeftModel
        torch.manual_seed(0)
        model = PeftModel.from_pretrained(TinyNet().double(), {str(adapter_dir)!r})
        assert "peft_cp_merge" not in sys.modules
        io = torch.load({str(tmp_path / "io.pt")!r})
        torch.testing.assert_close(model(io["x"]), io["expected"], rtol={rtol}, atol={atol})
        print("OK", model.peft_config["default"].r)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"OK {rank}" in res.stdout


def random_factors(ranks, out=14, inn=11, dtype=torch.float64, seed=0):
    """Random LoRA factors of the given ranks, task t with scaling 0.5 + 0.25 t (the baselines' test inputs)."""
    from peft_cp_merge import LoraFactors

    g = torch.Generator().manual_seed(seed)
    return [
        LoraFactors(torch.randn(r, inn, generator=g, dtype=dtype), torch.randn(out, r, generator=g, dtype=dtype),
                    0.5 + 0.25 * t)
        for t, r in enumerate(ranks)
    ]


def rel_err(a, b):
    """||a - b|| / ||b||."""
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def lora_layers(model):
    """The PeftModel's LoRA layers by module name."""
    from peft.tuners.lora import LoraLayer

    return {k: m for k, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def capped_svd(matrix, n_eigenvecs=None, **kw):
    """tensorly's truncated SVD, asked for at most min(matrix.shape) vectors (``parafac(..., svd=capped_svd)``).
    ``parafac(init="svd")`` asks for ``rank`` vectors of every unfolding; at rank > T (the usual merge) the task mode
    has fewer, and tensorly would cap the number with a UserWarning and pad the factor with random columns. Capping
    here gives the same start, without the warning."""
    from tensorly.tenalg.svd import truncated_svd

    return truncated_svd(matrix, n_eigenvecs=min(n_eigenvecs or min(matrix.shape), *matrix.shape), **kw)


def dense_truncated(X, rank):
    """The best rank-``rank`` approximation of a dense matrix (truncated SVD)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def dense_ties(tasks, w, density, sign):
    """TIES (Yadav et al.) on dense task matrices, as PEFT's ``ties``: top-k per task, sign election on the pruned
    tensors (``"total"``: sign of the sum, ``"frequency"``: of the count; ties -> +), weights, disjoint mean over the
    sign-agreeing entries. The reference for ``knots`` and ``core_ties``."""
    pruned = []
    for M in tasks:
        if density < 1:
            n_keep = int(density * M.numel())
            thresh = M.abs().flatten().sort(descending=True).values[n_keep - 1]
            M = torch.where(M.abs() >= thresh, M, torch.zeros_like(M))
        pruned.append(M)
    stack = torch.stack(pruned)
    votes = stack.sum(0) if sign == "total" else torch.sign(stack).sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stack.dtype)
    agree = torch.sign(stack) == elected
    wt = torch.as_tensor(w, dtype=stack.dtype).reshape(-1, 1, 1)
    return (stack * wt * agree).sum(0) / agree.sum(0).clamp_min(1)


def dense_core_space(fs):
    """Core space from dense SVDs: U_B of [B_1 .. B_T], V_A of [s_1 A_1; ..], svd_flip signs, M_t = U_B^T X_t V_A."""
    U_B = torch.linalg.svd(torch.cat([f.B for f in fs], 1), full_matrices=False)[0]
    V_A = torch.linalg.svd(torch.cat([f.scaling * f.A for f in fs], 0), full_matrices=False)[2].T

    def flip(M):
        return M * torch.sign(M[M.abs().argmax(0), torch.arange(M.shape[1])])

    U_B, V_A = flip(U_B), flip(V_A)
    return U_B, V_A, [U_B.T @ f.delta() @ V_A for f in fs]


def save_tiny_adapters(root, adapters, dtype=torch.float64):
    """``make_peft_model(adapters, dtype)`` saved as plain PEFT folders ``root/<name>`` (base model 'tiny-net',
    adapters only: no Hub lookup of the base model); returns the model and the folders' paths as strings."""
    model = make_peft_model(adapters, dtype=dtype)
    for config in model.peft_config.values():
        config.base_model_name_or_path = "tiny-net"
    model.save_pretrained(root, save_embedding_layers=False)
    return model, [str(Path(root) / n) for n in adapters]


def run_cli(argv, capsys):
    """(exit code, stderr) of ``peft-cp-merge argv``, argparse's own exits (a flag's type or choices) included."""
    from peft_cp_merge.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def cli_one_line(argv, capsys):
    """:func:`run_cli`, checking that a failure is exactly one stderr line, without a traceback."""
    rc, err = run_cli(argv, capsys)
    if rc != 0:
        assert err.count("\n") == 1 and "Traceback" not in err, err
    return rc, err
