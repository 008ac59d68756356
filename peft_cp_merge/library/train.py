"""The TC-LoRA library trainer: embed -> cluster -> one LoRA per cluster, with Accelerate.

Run it the same way on one process, several CPU processes or N GPUs::

    peft-cp-merge library train --config library.yaml
    accelerate launch --num_processes 8 -m peft_cp_merge.cli library train --config library.yaml

Parallel modes (``parallel_mode``):

* ``data``: every rank trains every cluster (DDP). The global batch ``batch_size`` is split across ranks and the
  loss is normalised by the global number of answer tokens, so the gradient equals the single-process gradient
  (up to float summation order): the result does not depend on the number of processes.
* ``clusters``: ranks split the clusters (largest first, each to the least loaded rank) and train them
  independently, without gradient sync; a cluster's result is the same as in a single-process run.

One optimisation loop, :func:`fit_adapter` (shared with the demo's ``train_lora``), trains each adapter with
Accelerate: ``prepare`` (the DDP wrapper in data mode, the AcceleratedOptimizer that applies the fp16 gradient scaler
and steps only once per accumulated batch), ``accumulate``, ``backward``, ``clip_grad_norm_`` and ``autocast``. The
split of each global batch over the ranks stays manual, for the exact global-token loss normalisation.

Every cluster starts from ``torch.manual_seed(seed + cluster)`` (adapter init and data order), so the order and
the rank a cluster is trained on do not change it. Each finished cluster is written at once (temporary folder +
rename) with its sha256; a rerun with the same config and data resumes, skipping verified clusters. Only the main
process writes the shared files (library.json, centroids, plot, card).

A rank that raises writes ``.run/failed-rank<r>.txt`` in the output folder and exits non-zero; ``accelerate
launch``/``torchrun`` then stop the other ranks, ranks in ``clusters`` mode also check for that file between
clusters, and collectives time out after ``dist_timeout_s``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import logging
import math
import os
import random
import secrets
import shutil
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .._io import (
    MARKER_FIELD,
    OutputLockedError,
    OutputRefusedError,
    _folder_tag,
    _host_tag,
    _remove,
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
    check_disjoint,
    check_replaceable,
    clean_stale_folders,
    disk_errno,
    make_parents,
    marker,
    output_lock,
    remove_created,
)
from .cluster import Clustering, cluster_embeddings, plot_clusters
from .config import LibraryTrainConfig
from .data import collate, fingerprint, normalize, num_loss_tokens, read_rows, tokenize
from .errors import LibraryConfigError, LibraryDataError, LibraryExistsError, RankFailedError
from .library import (
    CARD_FILE,
    CENTROIDS_FILE,
    LIBRARY_FILE,
    PLOT_FILE,
    STATE_FILE,
    AdapterLibrary,
    adapter_checksum,
    cluster_dirname,
    render_card,
)
from .store import (
    RUN_DIR,
    base_model_id,
    check_output,
    cluster_finished,
    initial_meta,
    public_stats,
    save_cluster,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from accelerate import Accelerator
    from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)


def _dist_note(accelerator) -> str:
    return f"rank {accelerator.process_index}/{accelerator.num_processes}"


def _make_accelerator(config: LibraryTrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=_dt.timedelta(seconds=config.dist_timeout_s))],
    )


def _check_peer_failures(out: Path, accelerator) -> None:
    run = out / RUN_DIR
    if not run.is_dir():
        return
    for f in sorted(run.glob("failed-rank*.txt")):
        if f.name != f"failed-rank{accelerator.process_index}.txt":
            raise RankFailedError(f"{f.stem.removeprefix('failed-')} failed; stopping {_dist_note(accelerator)}: "
                                  + f.read_text().strip().splitlines()[-1])


@contextlib.contextmanager
def _frozen_gc():
    """``gc.freeze()`` for the duration: the base model, tokenizer and data, alive for the whole run, move to the
    permanent generation, so the ``gc.collect()`` that ``accelerator.free_memory()`` runs after every cluster scans
    only the objects made since. Without it each collect scanned every object of the process (torch,
    transformers, the model): about 0.5 s per cluster on the tiny test model, several times its training. What
    becomes garbage is still freed (reference counts; new cycles by the collector); unfrozen on exit."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _assign_clusters(pending: list[int], sizes: list[int], world: int) -> list[list[int]]:
    """Largest-first to the least loaded rank (deterministic)."""
    load = [0] * world
    plan: list[list[int]] = [[] for _ in range(world)]
    for c in sorted(pending, key=lambda c: (-sizes[c], c)):
        r = min(range(world), key=lambda r: (load[r], r))
        plan[r].append(c)
        load[r] += sizes[c]
    return [sorted(p) for p in plan]


class _Run:
    """What this run did to ``output_dir`` (main process), so a failure can undo exactly that."""

    def __init__(self, out: Path):
        self.out = out
        self.existed = out.exists()
        self.created: list[Path] = []  # parent folders made for it
        self.aside: Path | None = None  # overwrite: the old library, renamed aside until the new one is complete

    def set_aside(self) -> None:
        tag = f"{_host_tag()}.{os.getpid()}.{secrets.token_hex(4)}.{_folder_tag(self.out)}"
        self.aside = self.out.parent / f".old.{tag}"
        os.rename(self.out, self.aside)

    def undo(self, error: BaseException) -> None:
        """After a failure: an overwritten library is put back; a folder this run created is removed when it holds
        nothing resumable (no library.json yet) or the disk is full; a resumed library is kept as it is."""
        out = self.out
        if self.aside is not None:
            if out.exists():
                _remove(out)
            os.rename(self.aside, out)
            logger.info("the run failed: %s is back as it was before", out)
            return
        if self.existed or not out.is_dir():
            return
        if disk_errno(error) or not (out / LIBRARY_FILE).is_file():
            _remove(out)


def _local_sources(config: LibraryTrainConfig, dataset) -> list[Path]:
    """The local paths the run reads (data, base and embedding model folders): never written to."""
    found = []
    for value in (config.dataset if dataset is None else None, config.base_model, config.embedding_model):
        if value is not None and isinstance(value, (str, os.PathLike)) and os.path.exists(os.path.expanduser(value)):
            found.append(Path(value))
    return found


def train_library(config: LibraryTrainConfig, *,
                  dataset: Dataset | DatasetDict | Sequence[Mapping[str, Any]] | None = None,
                  accelerator: Accelerator | None = None, wait: bool = False
                  ) -> AdapterLibrary:
    """Build (or resume) the adapter library described by ``config``; returns it on every rank.

    Args:
        config: the run's :class:`LibraryTrainConfig`.
        dataset: optional in-memory data (``datasets.Dataset``, ``DatasetDict`` or list of dicts) used instead of
            ``config.dataset``.
        accelerator: an existing ``accelerate.Accelerator`` (default: one built from the config).
        wait: when another run writes the same ``output_dir``, wait for it instead of refusing.

    The main process holds the output's lock (:func:`peft_cp_merge._io.output_lock`) for the whole run; the output
    must not overlap the data or the models; ``overwrite`` replaces only a library this package wrote, and the old
    one is kept until the new one is complete; a failed run removes the folder it created unless it holds a
    resumable library (and always on a full disk).
    """
    accelerator = accelerator or _make_accelerator(config)
    out = Path(config.output_dir)
    run = _Run(out)
    main = accelerator.is_main_process
    try:
        with contextlib.ExitStack() as stack:
            if main:
                check_disjoint(out, sources=_local_sources(config, dataset), name="output_dir")
                if out.exists() and not out.is_dir():
                    raise LibraryExistsError(f"output_dir {str(out)!r} is a file, not a folder. Choose a folder.")
                run.created = make_parents(out.parent)
                stack.callback(lambda: remove_created(run.created) if not out.exists() else None)
                stack.enter_context(output_lock(out, wait=wait))
                clean_stale_folders(out)  # puts back the old library of a killed overwrite
                run.existed = out.exists()
            try:
                lib = _train(config, dataset, accelerator, out, run)
            except BaseException as e:
                if main:  # still under the lock: nobody else writes here yet
                    run.undo(e)
                raise
            if main and run.aside is not None:
                _remove(run.aside)
            return lib
    except BaseException as e:
        refused = (RankFailedError, OutputRefusedError, OutputLockedError, LibraryExistsError, KeyboardInterrupt)
        if accelerator.num_processes > 1 and not isinstance(e, refused) and out.is_dir():
            with contextlib.suppress(OSError):
                (out / RUN_DIR).mkdir(exist_ok=True)
                atomic_write_text(out / RUN_DIR / f"failed-rank{accelerator.process_index}.txt",
                                  "".join(traceback.format_exception(e)))
        logger.error("%s failed: %s: %s", _dist_note(accelerator), type(e).__name__, e)
        raise


def _train(config: LibraryTrainConfig, dataset, accelerator, out: Path, run: _Run) -> AdapterLibrary:
    from accelerate.utils import broadcast_object_list, gather_object

    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    t_start = time.perf_counter()
    if config.parallel_mode == "data" and config.batch_size % world:
        raise LibraryDataError(
            f"batch_size={config.batch_size} is the global batch in data mode and must be divisible by the "
            f"{world} processes. Use a multiple of {world}."
        )
    if accelerator.gradient_accumulation_steps not in (1, config.gradient_accumulation_steps):
        raise LibraryConfigError(
            f"The accelerator accumulates gradients over {accelerator.gradient_accumulation_steps} micro-batches but "
            f"the config says gradient_accumulation_steps={config.gradient_accumulation_steps}. Set it in the config "
            "only (not in `accelerate launch --gradient_accumulation_steps` or the Accelerator you pass)."
        )
    # 1. check everything that can be wrong before writing anything: the output folder (fresh, resume or refuse),
    #    the data, the base model
    if out.exists() and not out.is_dir():
        raise LibraryExistsError(f"output_dir {str(out)!r} is a file, not a folder. Choose a folder.")
    if config.overwrite and out.is_dir():  # only a library this package wrote, holding nothing else
        check_replaceable(out, "adapter-library")
    meta = None if config.overwrite else check_output(out, config)
    with accelerator.main_process_first():
        rows = read_rows(dataset if dataset is not None else config.dataset, split=config.dataset_split,
                         config_name=config.dataset_config)
    if config.max_examples is not None:
        rows = rows[: config.max_examples]
    from ..models import load_model_and_tokenizer

    with accelerator.main_process_first():
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.model_dtype]
        model, tokenizer = load_model_and_tokenizer(config.base_model, dtype=dtype)
    from .arrow import arrow_blockers

    blockers = arrow_blockers(model, config.target_modules)
    if blockers and main:  # one r and one target_modules for every cluster: only the layer types can break Arrow
        logger.warning("target_modules %s include layers PEFT's Arrow cannot route (Linear-like layers only): %s; "
                       "this library will merge and load, but AdapterLibrary.arrow_model will refuse it. Drop them "
                       "from target_modules for an Arrow-ready library.", list(config.target_modules),
                       ", ".join(blockers[:4]) + (" ..." if len(blockers) > 4 else ""))
    records = normalize(rows, tokenizer=tokenizer, prompt_field=config.prompt_field,
                        completion_field=config.completion_field, text_field=config.text_field,
                        messages_field=config.messages_field, embed_on=config.embed_on)
    data_fp = fingerprint(records)
    if meta is not None and meta.get("data_fingerprint") != data_fp:
        raise LibraryExistsError(
            f"{out} holds a library trained on different data ({meta.get('num_examples')} examples, fingerprint "
            f"{meta.get('data_fingerprint')}; now {len(records)}, {data_fp}). Refusing to mix: use the same data to "
            "resume, another output_dir, or overwrite: true."
        )
    accelerator.wait_for_everyone()
    if main:
        if config.overwrite and out.exists() and any(out.iterdir()):
            run.set_aside()  # deleted once the new library is complete, put back if this run fails
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / RUN_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()
    logger.info("%s: %d examples", _dist_note(accelerator), len(records))

    # 3. embed + cluster (or reuse the saved clustering when resuming)
    if meta is not None and (out / CENTROIDS_FILE).is_file():
        from safetensors.torch import load_file

        t = load_file(str(out / CENTROIDS_FILE))
        clustering = Clustering(t["centroids"], t["assignments"])
        logger.info("resuming %s: %d clusters", out, clustering.num_clusters)
    else:
        from .embed import _embedding_dim, embed_distributed, load_embedder

        with accelerator.main_process_first():
            embedder = load_embedder(config.embedding_model, device=accelerator.device)
        emb = embed_distributed([r.embed_text for r in records], embedder, accelerator,
                                batch_size=config.embed_batch_size)
        dim = _embedding_dim(embedder)
        del embedder
        gc.collect()
        result = [None]
        if main:
            result = [cluster_embeddings(
                emb, num_clusters=config.num_clusters, k_range=(config.min_clusters, config.max_clusters),
                min_cluster_size=config.min_cluster_size, n_init=config.kmeans_n_init, seed=config.seed)]
        if world > 1:
            broadcast_object_list(result)
        clustering = result[0]
        if main:
            meta = initial_meta(config, clustering, records, data_fp, dim)
            atomic_save_tensors(out / CENTROIDS_FILE, {"centroids": clustering.centroids,
                                                       "assignments": clustering.assignments})
            plot_clusters(emb, clustering.assignments, out / PLOT_FILE)
            atomic_write_json(out / LIBRARY_FILE, meta)
            atomic_write_text(out / CARD_FILE, render_card(meta))
        accelerator.wait_for_everyone()
        meta = json.loads((out / LIBRARY_FILE).read_text())
    sizes = clustering.sizes()
    members = [torch.nonzero(clustering.assignments == c).flatten().tolist() for c in range(len(sizes))]

    # 4. which clusters remain (main decides; a corrupt cluster folder is removed and retrained)
    pending_box: list[Any] = [None]
    if main:
        pending = []
        for c in range(len(sizes)):
            if cluster_finished(out, c, meta):
                continue
            if (out / cluster_dirname(c)).exists():
                logger.warning("%s fails its checksum or is incomplete; retraining it", out / cluster_dirname(c))
                shutil.rmtree(out / cluster_dirname(c))
            pending.append(c)
        pending_box = [pending]
    if world > 1:
        broadcast_object_list(pending_box)
    pending = pending_box[0]
    done = [c for c in range(len(sizes)) if c not in pending]
    if done:
        logger.info("%s: clusters %s already trained (checksums verified), skipping them", _dist_note(accelerator),
                    done)

    # 5. train
    if config.parallel_mode == "clusters":
        mine = _assign_clusters(pending, sizes, world)[rank]
    else:
        mine = pending
    logger.info("%s: training clusters %s (%s mode)", _dist_note(accelerator), mine, config.parallel_mode)
    model.to(accelerator.device)
    peft_model = None
    with _frozen_gc():  # per cluster, free_memory's gc.collect() scans only that cluster's objects
        for c in mine:
            if config.parallel_mode == "clusters":
                _check_peer_failures(out, accelerator)
            peft_model = _add_cluster_adapter(peft_model, model, c, config)
            stats = _train_cluster(peft_model, tokenizer, [records[i] for i in members[c]], c, config, accelerator)
            name = cluster_dirname(c)
            if config.parallel_mode == "data":
                per_rank = gather_object([(rank, stats["examples_seen"])]) if world > 1 else [(0,
                                                                                               stats["examples_seen"])]
                stats["examples_per_rank"] = {str(r): n for r, n in per_rank}
                if main:
                    sha = save_cluster(peft_model, name, out, stats, base_model_id(config))
                    meta["clusters"][c].update(status="done", sha256=sha, **public_stats(stats))
                    atomic_write_json(out / LIBRARY_FILE, meta)  # progress and resume record; the card at the end
                accelerator.wait_for_everyone()
            else:
                stats["examples_per_rank"] = {str(rank): stats["examples_seen"]}
                save_cluster(peft_model, name, out, stats, base_model_id(config))
            logger.info("%s: cluster %d done (%d steps, loss %.4f -> %.4f)", _dist_note(accelerator), c,
                        stats["steps"], stats["loss_first"], stats["loss_last"])

    # 6. finish: main collects every cluster's state, verifies and writes the final library.json + card
    accelerator.wait_for_everyone()
    if main:
        for c in range(len(sizes)):
            folder = out / cluster_dirname(c)
            state = json.loads((folder / STATE_FILE).read_text())
            sha = adapter_checksum(folder)
            if sha != state["sha256"]:
                raise RuntimeError(f"{folder} changed while training (sha256 mismatch); rerun to retrain it.")
            meta["clusters"][c].update(status="done", sha256=sha, **public_stats(state))
        meta["status"] = "complete"
        meta[MARKER_FIELD] = marker("adapter-library")  # also on a library resumed from an earlier version
        meta["num_processes"] = world
        meta["train_seconds_last_run"] = round(time.perf_counter() - t_start, 1)
        atomic_write_json(out / LIBRARY_FILE, meta)
        atomic_write_text(out / CARD_FILE, render_card(meta))
        shutil.rmtree(out / RUN_DIR, ignore_errors=True)
        logger.info("library complete: %s (%d clusters, %.0fs)", out, len(sizes), time.perf_counter() - t_start)
    accelerator.wait_for_everyone()
    return AdapterLibrary.from_pretrained(out)


def _lora_config(config: LibraryTrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")


def _add_cluster_adapter(peft_model, base, c: int, config: LibraryTrainConfig):
    """Add ``cluster_<c>`` (initialised from ``seed + c``) to the one base model; drop the previous adapter."""
    from peft import get_peft_model

    name = cluster_dirname(c)
    torch.manual_seed(config.seed + c)
    if peft_model is None:
        peft_model = get_peft_model(base, _lora_config(config), adapter_name=name)
    else:
        previous = list(peft_model.peft_config)
        peft_model.add_adapter(name, _lora_config(config))
        peft_model.set_adapter(name)
        for p in previous:
            peft_model.delete_adapter(p)
    peft_model.set_adapter(name)  # only this adapter is trainable
    return peft_model


def _train_cluster(peft_model, tokenizer, records, c: int, config: LibraryTrainConfig, accelerator):
    """Train the active adapter ``cluster_<c>`` on ``records`` with :func:`fit_adapter` (data order from
    ``seed * 1_000_003 + c``); returns its stats."""
    rank, world = accelerator.process_index, accelerator.num_processes
    data_parallel = config.parallel_mode == "data"
    rows = [tokenize(tokenizer, r, config.max_length) for r in records]
    for p in peft_model.parameters():  # LoRA weights train in float32 whatever the base dtype
        if p.requires_grad:
            p.data = p.data.float()
    per_step = config.batch_size * config.gradient_accumulation_steps
    stats = fit_adapter(
        peft_model, rows, accelerator=accelerator, pad_token_id=tokenizer.pad_token_id,
        steps=config.max_steps or max(1, math.ceil(config.num_epochs * len(rows) / per_step)),
        batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        lr=config.learning_rate, weight_decay=config.weight_decay, lr_scheduler=config.lr_scheduler,
        warmup_steps=config.warmup_steps, max_grad_norm=config.max_grad_norm, order_seed=config.seed * 1_000_003 + c,
        data_parallel=data_parallel, desc=f"{_dist_note(accelerator)} cluster {c}", log_every=config.log_every,
        progress=accelerator.is_main_process or not data_parallel, position=0 if data_parallel else rank)
    stats["trained_by_ranks"] = list(range(world)) if data_parallel and world > 1 else [rank]
    return stats


def fit_adapter(
    model: torch.nn.Module,
    rows: Sequence[tuple[list[int], list[int]]],
    *,
    accelerator: Accelerator,
    pad_token_id: int,
    steps: int,
    batch_size: int,
    lr: float,
    order_seed: int,
    gradient_accumulation_steps: int = 1,
    weight_decay: float = 0.0,
    lr_scheduler: str = "linear",
    warmup_steps: int = 0,
    max_grad_norm: float | None = 1.0,
    data_parallel: bool = False,
    desc: str = "train",
    log_every: int = 10,
    progress: bool = True,
    position: int = 0,
    log: logging.Logger | None = None,
) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` (a ``PeftModel`` with its active adapter) on ``rows``, the one
    optimisation loop of the library trainer and of the demo's ``train_lora``.

    Args:
        rows: pre-tokenized ``(input_ids, labels)`` pairs (labels ``-100`` where no loss is taken), batched with
            :func:`peft_cp_merge.library.data.collate` and sent to the device of ``model``'s parameters.
        accelerator: the ``accelerate.Accelerator`` doing mixed precision, gradient scaling and accumulation and,
            with ``data_parallel``, DDP. Its accumulation steps are set to ``gradient_accumulation_steps`` for the
            run (restored after), and it ends with ``accelerator.free_memory()``, which drops every object it had
            prepared: pass an accelerator that holds nothing else of yours.
        steps: optimizer steps; each takes the next ``batch_size * gradient_accumulation_steps`` indices of the
            order stream (one ``random.Random(order_seed).sample`` permutation of the rows after another), as
            ``gradient_accumulation_steps`` micro-batches of ``batch_size`` rows.
        data_parallel: with several processes, every rank trains this adapter (DDP, through
            ``accelerator.prepare``): each global micro-batch is split into ``num_processes`` equal contiguous
            shards and rank r takes shard r; ``batch_size`` must be divisible by ``num_processes``. Otherwise
            each process trains on its own, without communication.
        desc, log_every, progress, position, log: the progress bar and ``log`` (default: this module's logger)
            lines ``"{desc} step i/steps loss ... lr ..."`` every ``log_every`` steps and at the last one.

    The loss of optimizer step s is the mean token loss of its whole global batch B_s (all micro-batches, all
    ranks), ``L_s = sum_{tokens of B_s} CE / T_s`` with ``T_s`` its number of answer tokens, as in a
    single-process run: rank r backpropagates ``shards * sum_{its tokens} CE / T_s`` per micro-batch (DDP
    averages the gradients over the ``shards`` ranks; ``shards = 1`` without DDP), times
    ``gradient_accumulation_steps`` because ``accelerator.backward`` divides by it. So the gradient, and the
    adapter, do not depend on the number of processes (up to float summation order). Gradients are clipped to
    ``max_grad_norm`` (global L2 norm) before each step; the ``lr_scheduler`` (a transformers scheduler name, with
    ``warmup_steps``) steps once per optimizer step. AdamW's ``step`` runs once per optimizer step, never while
    accumulating, and not when the fp16 gradient scaler skips a step (nor does the scheduler then).

    Returns ``{"steps", "loss_first", "loss_last", "losses": [L_s], "examples_seen" (by this rank), "seconds"}``.
    """
    from transformers import get_scheduler

    log = log or logger
    k = gradient_accumulation_steps
    rank, world = accelerator.process_index, accelerator.num_processes
    ddp = data_parallel and world > 1
    shards = world if ddp else 1
    if not rows:
        raise ValueError("fit_adapter: no rows to train on")
    if batch_size % shards:
        raise ValueError(f"batch_size={batch_size} must be divisible by the {shards} processes in data-parallel mode")
    ntok = [num_loss_tokens(labels) for _, labels in rows]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = get_scheduler(lr_scheduler, opt, num_warmup_steps=warmup_steps, num_training_steps=steps)
    # the accumulation steps live in Accelerate's process-wide GradientState: set them for this run only
    previous_k, accelerator.gradient_accumulation_steps = accelerator.gradient_accumulation_steps, k
    accelerator.step = 0  # micro-step counter of accelerator.accumulate: sync on every k-th micro-batch
    fwd = model
    try:
        if ddp:
            # the frozen base weights and buffers are the same on every rank (one checkpoint): DDP need not
            # broadcast them when it wraps the model, nor the buffers at every forward; it syncs the adapter only
            model._ddp_params_and_buffers_to_ignore = [n for n, p in model.named_parameters() if not p.requires_grad]
            model._ddp_params_and_buffers_to_ignore += [n for n, _ in model.named_buffers()]
            fwd, opt = accelerator.prepare(model, opt)
        else:  # no DDP wrapper: in clusters mode the ranks train different adapters
            opt = accelerator.prepare(opt)
        device = next(iter(params)).device
        rng = random.Random(order_seed)
        order: list[int] = []
        losses: list[float] = []
        seen = 0
        model.train()
        bar = tqdm(range(steps), desc=f"{desc} ({len(rows)} ex.)", disable=not progress, leave=False,
                   position=position)
        t0 = time.perf_counter()
        for step in bar:
            while len(order) < batch_size * k:
                order += rng.sample(range(len(rows)), len(rows))
            idx, order = order[: batch_size * k], order[batch_size * k :]
            total = max(1, sum(ntok[i] for i in idx))  # answer tokens in the global batch of this optimizer step
            step_loss = torch.zeros((), device=device)
            for m in range(k):
                micro = idx[m * batch_size : (m + 1) * batch_size]
                per = len(micro) // shards
                local = micro[rank * per : (rank + 1) * per] if ddp else micro
                seen += len(local)
                batch = {key: v.to(device) for key, v in collate([rows[i] for i in local], pad_token_id).items()}
                # accumulate: DDP all-reduces (no_sync otherwise) and the AcceleratedOptimizer steps and zeroes the
                # gradients only on the k-th micro-batch, where accelerator.sync_gradients is true
                with accelerator.accumulate(fwd):
                    with accelerator.autocast():
                        logits = fwd(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                        loss_sum = torch.nn.functional.cross_entropy(
                            logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                            ignore_index=-100, reduction="sum")
                    accelerator.backward(loss_sum * (shards * accelerator.gradient_accumulation_steps / total))
                    if accelerator.sync_gradients and max_grad_norm is not None:
                        accelerator.clip_grad_norm_(params, max_grad_norm)  # unscales fp16 gradients first
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                step_loss += loss_sum.detach()
            if not opt.step_was_skipped:  # the fp16 scaler skips steps with inf/nan gradients
                sched.step()
            if ddp:
                step_loss = accelerator.reduce(step_loss, reduction="sum")
            losses.append(float(step_loss) / total)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step % log_every == 0 or step == steps - 1:
                log.info("%s step %d/%d loss %.4f lr %.2e", desc, step + 1, steps, losses[-1], sched.get_last_lr()[0])
        bar.close()
        seconds = round(time.perf_counter() - t0, 2)
    finally:
        model.eval()
        accelerator.gradient_accumulation_steps = previous_k
        if ddp:  # drop the wrapper; undo the mixed-precision forward Accelerate may have put on the model
            accelerator.unwrap_model(fwd, keep_fp32_wrapper=False)
            vars(model).pop("_ddp_params_and_buffers_to_ignore", None)
        accelerator.free_memory()  # release the prepared model and optimizer (one adapter after another)
    return {"steps": steps, "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
            "examples_seen": seen, "seconds": seconds}


