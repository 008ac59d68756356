"""Route an adapter library per token with PEFT's Arrow (``peft.create_arrow_model``, peft >= 0.18).

Arrow (Ostapenko et al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs", ICML 2024; PEFT
``src/peft/tuners/lora/arrow.py``) loads the library's cluster adapters as experts ``task_0..task_{k-1}`` and adds an
``arrow_router`` adapter: in every LoRA layer, the prototype of expert e is the top right singular vector of its
``B_e A_e`` (power iteration, computed on the first forward); each token is mixed from the ``top_k`` experts with
the largest ``|<x, prototype_e>|``, softmax-weighted at ``router_temperature``. GenKnowSub (``use_gks``) first
subtracts the mean of some *general* adapters from every expert, **in place, on the first forward**.

PEFT needs every expert (and general adapter) to have the same rank ``r`` and the same target modules, on
Linear-like layers only. A trained library has that by construction (one ``LoraConfig`` for every cluster: one
``r``, no ``rank_pattern``, one ``target_modules``; :func:`arrow_blockers` lets ``library train`` warn up front
when the target modules include layers Arrow cannot route, e.g. ``embed_tokens``). :func:`check_arrow_ready`
checks it again from the adapter files' headers before anything is loaded, naming the cluster that breaks it.

The experts are loaded into memory from the files (safetensors, copied into the model's parameters); the library's
files are never written. Because GenKnowSub edits the loaded experts, and the router's state is not saved by
PEFT, the returned model refuses ``save_pretrained``/``push_to_hub``: the library folder is the saved form.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from ..errors import PeftCpMergeError
from .errors import LibraryConfigError, LibraryError

logger = logging.getLogger(__name__)

ARROW_MIN_PEFT = "0.18.0"
"""First PEFT release with ``ArrowConfig`` and ``create_arrow_model`` (PR #2644)."""

ARROW_LAYERS = ("Linear", "Conv1d", "Conv1D", "Linear4bit")
"""Base layer types PEFT's Arrow routes (``nn.Linear``, ``nn.Conv1d``, transformers' ``Conv1D``, bnb
``Linear4bit``): ``ensure_adapters_target_linear_layers_only``."""


def check_peft_version() -> str:
    """The installed PEFT version; :class:`LibraryError` naming it when it predates Arrow."""
    import peft
    from packaging.version import InvalidVersion, Version

    installed = str(getattr(peft, "__version__", "unknown"))
    try:
        ok = Version(installed) >= Version(ARROW_MIN_PEFT)
    except InvalidVersion:
        ok = False
    if not ok:
        raise LibraryError(
            f"Arrow routing needs peft >= {ARROW_MIN_PEFT} (ArrowConfig, create_arrow_model); the installed peft is "
            f"{installed}. Upgrade it: pip install -U 'peft>={ARROW_MIN_PEFT}'. (merge and load_into work with "
            "this peft.)"
        )
    return installed


def _describe(folder: str | Path, name: str) -> tuple[int, dict[str, int]]:
    """``(r of adapter_config.json, {module: rank})`` of one adapter, from its config and safetensors headers only
    (:mod:`peft_cp_merge.files.sources`: the same checks as a merge). Refuses ``rank_pattern``, embedding and
    convolution LoRA layers, which Arrow cannot route."""
    from ..files.sources import index_modules, open_weights, resolve_source

    src = resolve_source(str(folder))
    if src.config.rank_pattern:
        raise LibraryError(f"{name} has a rank_pattern ({dict(src.config.rank_pattern)}); Arrow needs one rank in "
                           "every layer of every adapter.")
    with contextlib.ExitStack() as stack:
        fh = open_weights(src, stack)
        embedding = [k for k in fh.keys() if k.endswith(("lora_embedding_A", "lora_embedding_B"))]
        if embedding:
            raise LibraryError(f"{name} has an embedding LoRA layer ({embedding[0]}); Arrow routes Linear layers "
                               "only. Train the library without embedding target modules.")
        index = index_modules([src], [fh])
    ranks = {}
    for module, (entry,) in index.items():
        if len(entry.a_shape) != 2:
            raise LibraryError(f"{name}: module {module!r} is a convolution LoRA layer (A {entry.a_shape}); Arrow "
                               "routes Linear layers only.")
        ranks[module] = entry.a_shape[0]
    return src.config.r, ranks


def check_arrow_ready(adapters: Sequence[tuple[str, str | Path]]) -> tuple[int, list[str]]:
    """``(r, modules)`` shared by every adapter ``(name, folder)``, or :class:`LibraryError` naming the first one that
    differs from the first adapter (rank, modules) or that Arrow cannot route. Reads headers only."""
    if not adapters:
        raise LibraryError("No adapters to route: the library has no clusters loaded.")
    described = []
    for name, folder in adapters:
        try:
            described.append((name, *_describe(folder, name)))
        except PeftCpMergeError as e:
            if isinstance(e, LibraryError):
                raise
            raise LibraryError(f"{name} cannot be routed with Arrow: {e}") from None
    ref_name, ref_r, ref = described[0]
    for name, r, ranks in described[1:]:
        if set(ranks) != set(ref):
            extra, missing = sorted(set(ranks) - set(ref)), sorted(set(ref) - set(ranks))
            raise LibraryError(
                f"{name} does not target the same modules as {ref_name} (only in {name}: {extra[:3]}, only in "
                f"{ref_name}: {missing[:3]}); Arrow needs identical target modules in every adapter. Route only "
                "matching clusters (clusters=[...]) or rebuild the library with one target_modules."
            )
        bad = sorted(m for m in ranks if ranks[m] != ref[m])
        if bad or r != ref_r:
            where = bad[0] if bad else "adapter_config.json"
            got = ranks[bad[0]] if bad else r
            want = ref[bad[0]] if bad else ref_r
            raise LibraryError(
                f"{name} has rank {got} where {ref_name} has rank {want} ({where}); Arrow needs the same rank r in "
                "every adapter. Route only clusters of one rank (clusters=[...]), or rebuild the library with one "
                "rank (AdapterLibrary.from_adapters(..., rank=R))."
            )
    return ref_r, sorted(ref)


def arrow_blockers(model, target_modules: Sequence[str]) -> list[str]:
    """The modules of ``model`` matched by ``target_modules`` (PEFT's suffix rule) whose type Arrow cannot route;
    empty when a library trained with these targets is Arrow-ready."""
    names = set(target_modules)
    out = []
    for full, module in model.named_modules():
        if full.rsplit(".", 1)[-1] in names and type(module).__name__ not in ARROW_LAYERS:
            out.append(f"{full} ({type(module).__name__})")
    return out


def _refuse_save(*_args, **_kwargs):
    raise LibraryError(
        "This is an Arrow routing model over an adapter library; it is not saved. PEFT computes its router state "
        "(the expert prototypes) on the first forward and does not save it, and with general adapters "
        "(GenKnowSub) the loaded experts were edited in place, so saving would write altered adapters. The "
        "library folder is the saved form: recreate the model with AdapterLibrary.arrow_model(base_model)."
    )


def _check_routing(top_k, router_temperature, n_experts: int) -> None:
    """:class:`LibraryConfigError` unless ``1 <= top_k <= n_experts`` (an int) and ``router_temperature > 0``."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise LibraryConfigError(f"top_k={top_k!r}: give an integer between 1 and the number of routed clusters "
                                 f"({n_experts}).")
    if isinstance(router_temperature, bool) or not isinstance(router_temperature, (int, float)) \
            or not router_temperature > 0:
        raise LibraryConfigError(f"router_temperature={router_temperature!r}: give a number > 0.")


def set_arrow_routing(model, *, top_k: int | None = None, router_temperature: float | None = None) -> int:
    """Change the routing of an Arrow model (from :meth:`AdapterLibrary.arrow_model` or ``peft.create_arrow_model``)
    in place: ``top_k`` experts per token and/or the softmax ``router_temperature``, in every routed layer. PEFT
    reads both at each forward and they do not enter the prototypes, so this equals building the model with the new
    values, without reloading the experts (how the quality benchmark tunes Arrow on validation). Returns the number
    of routed layers changed; :class:`LibraryError` when ``model`` has none."""
    check_peft_version()
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    routers = [m for m in model.modules() if isinstance(m, ArrowLoraLinearLayer)]
    if not routers:
        raise LibraryError("set_arrow_routing: the model has no Arrow router layers; build it with "
                           "AdapterLibrary.arrow_model(base_model) (or peft.create_arrow_model) first.")
    n_experts = len(routers[0].task_adapter_names)
    _check_routing(routers[0].top_k if top_k is None else top_k,
                   routers[0].temperature if router_temperature is None else router_temperature, n_experts)
    for m in routers:
        if top_k is not None:
            m.top_k = top_k
        if router_temperature is not None:
            m.temperature = float(router_temperature)
    return len(routers)


def arrow_model(library, base_model, *, top_k: int = 3, router_temperature: float = 1.0,
                general_adapters: Sequence[str | Path] | None = None, clusters: Sequence[int] | None = None,
                rng_seed: int | None = None, **load_kwargs):
    """PEFT's Arrow model over ``library``'s cluster adapters; see :meth:`AdapterLibrary.arrow_model`."""
    check_peft_version()
    from peft import ArrowConfig, create_arrow_model

    ids = list(library.available) if clusters is None else [int(i) for i in clusters]
    folders = [(f"cluster {i}", library.adapter_path(i)) for i in ids]
    _check_routing(top_k, router_temperature, len(ids))
    general = []
    if general_adapters is not None:
        if isinstance(general_adapters, (str, Path)):
            general_adapters = [general_adapters]
        from ..files.sources import resolve_source

        general = [resolve_source(str(g)).path for g in general_adapters]  # Hub ids are downloaded once, here
        if not general:
            raise LibraryConfigError("general_adapters=[]: give at least one general adapter, or None (no "
                                     "GenKnowSub).")
    check_arrow_ready(folders + [(f"general adapter {g}", p) for g, p in zip(general_adapters or [], general)])
    config = ArrowConfig(top_k=top_k, router_temperature=float(router_temperature), use_gks=bool(general),
                         rng_seed=rng_seed)
    logger.info("Arrow over clusters %s (top_k=%d, temperature %g%s)", ids, top_k, router_temperature,
                f", GenKnowSub with {len(general)} general adapter(s)" if general else "")
    model = create_arrow_model(base_model, [str(p) for _, p in folders], config,
                               general_adapter_paths=[str(p) for p in general] or None, **load_kwargs)
    model.save_pretrained = _refuse_save
    model.push_to_hub = _refuse_save
    model.arrow_clusters = ids  # expert task_j is cluster ids[j]
    return model
