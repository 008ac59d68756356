"""Tiny models for tests (importable from subprocesses: ``sys.path.insert(0, tests_dir)``)."""

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
    """PEFT's own ``get_delta_weight`` put in LoRA-factor orientation (out x in): an independent reference."""
    d = layer.get_delta_weight(adapter)
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
