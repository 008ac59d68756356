"""``AdapterLibrary``: a folder or Hub repo of per-cluster LoRA adapters with their routing centroids.

Layout (format version 1)::

    library.json            format, base and embedding model, clusters (size, previews, sha256), training config,
                            package versions
    centroids.safetensors   "centroids" (k x dim, float32, L2-normalised), "assignments" (n, int64)
    clusters.png            training embeddings in 2-D (PCA) coloured by cluster, and the cluster sizes
    README.md               model card with a table of the clusters
    cluster_<i>/            a plain PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)

Each ``cluster_<i>/`` is complete once it exists (written to a temporary folder and renamed) and its sha256
(over ``adapter_config.json`` and ``adapter_model.safetensors``) is recorded in ``library.json`` and in its own
``training_state.json``; :meth:`AdapterLibrary.verify` checks them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._io import MARKER_FIELD, atomic_folder, atomic_write_json, atomic_write_text, marker, tree_size
from .._schema import first_error
from .cluster import Routing, route_embeddings
from .errors import LibraryConfigError, LibraryError, LibraryExistsError, LibraryFormatError

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel

    from ..files.adapter import MergedAdapter

logger = logging.getLogger(__name__)

FORMAT = "peft-cp-merge/adapter-library"
FORMAT_VERSION = 1
MAX_FORMAT_VERSION = 2
"""Newest ``format_version`` this code reads: 1 (trained libraries, written by the trainer), 2 (built with
:meth:`AdapterLibrary.from_adapters`: ``kind: built``, cluster ``members``, no embedding model or centroids)."""
LIBRARY_FILE = "library.json"
CENTROIDS_FILE = "centroids.safetensors"
PLOT_FILE = "clusters.png"
CARD_FILE = "README.md"
STATE_FILE = "training_state.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_META_PATTERNS = [LIBRARY_FILE, CENTROIDS_FILE, PLOT_FILE, CARD_FILE]


def cluster_dirname(i: int) -> str:
    return f"cluster_{i}"


def adapter_checksum(folder: str | Path) -> str:
    """sha256 over the adapter's config and weights (file names and bytes)."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        p = Path(folder) / name
        h.update(name.encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --- model card ---------------------------------------------------------------------------------------------------

def _cell(text: str, n: int = 60) -> str:
    t = " ".join(str(text).split())
    t = t if len(t) <= n else t[: n - 1] + "…"
    from ..files.adapter import _md

    return _md(t)  # a sample is untrusted text: no markup, HTML comment or cell break


def cluster_table(meta: dict[str, Any]) -> str:
    """Markdown table: cluster, size, share, status, first sample preview."""
    total = sum(c["size"] for c in meta["clusters"]) or 1
    built = meta.get("kind") == "built"
    lines = [f"| cluster | {'adapters' if built else 'examples'} | share | status | "
             f"{'members' if built else 'sample'} |", "|---|---:|---:|---|---|"]
    for c in meta["clusters"]:
        preview = c.get("previews", [""])[0] if c.get("previews") else ""
        lines.append(f"| {c['name']} | {c['size']} | {c['size'] / total:.1%} | {c.get('status', '')} | "
                     f"{_cell(preview)} |")
    return "\n".join(lines)


def render_card(meta: dict[str, Any]) -> str:
    """The library's README.md: a Hub model card (:func:`peft_cp_merge.files.adapter.model_card`) with the cluster
    table, the plot, how to use it and the training recipe."""
    from ..files.adapter import _md, model_card
    from ..files.recipe import dump_recipe

    training = meta.get("training", {})
    keep = ("num_clusters", "lora_r", "lora_alpha", "target_modules", "max_steps", "batch_size", "learning_rate",
            "parallel_mode", "seed")
    recipe = {k: training[k] for k in keep if k in training}
    plot = f"\n![clusters]({PLOT_FILE})\n" if meta.get("plot") else ""
    if meta.get("kind") == "built":
        return _built_card(meta)
    body = (
        f"\n# TC-LoRA adapter library: {len(meta['clusters'])} cluster adapters\n\n"
        f"One LoRA adapter per cluster of the training examples, clustered with {_md(meta.get('embedding_model'))} "
        f"embeddings (KMeans), on base model {_md(meta.get('base_model'))}. Built with "
        "[peft-cp-merge](https://pypi.org/project/peft-cp-merge/) (`peft-cp-merge library train`).\n\n"
        f"{cluster_table(meta)}\n{plot}\n"
        "## Use\n\n```python\nfrom peft_cp_merge.library import AdapterLibrary\n\n"
        "lib = AdapterLibrary.from_pretrained(\"<this repo or folder>\")\n"
        "ids = lib.route([\"your prompt\"]).top1        # cluster of each input\n"
        "peft_model = lib.load_into(base_model)         # every cluster adapter, named cluster_<i>\n"
        "merged = lib.merge(method=\"cp\")                # one adapter (CP merge)\n```\n\n"
        "## Training recipe\n\n```yaml\n" + dump_recipe(recipe) + "```\n"
    )
    return model_card(body, base_model=meta.get("base_model"), relation="adapter",
                      tags=["lora", "peft-cp-merge", "tc-lora", "adapter-library"])


def _built_card(meta: dict[str, Any]) -> str:
    """The model card of a library built from existing adapters (:meth:`AdapterLibrary.from_adapters`)."""
    from ..files.adapter import _md, model_card
    from ..files.recipe import dump_recipe

    merge = meta.get("merge", {})
    members = "\n".join(f"- {_md(c['name'])}: " + ", ".join(_md(m["source"]) for m in c["members"])
                        for c in meta["clusters"])
    body = (
        f"\n# Adapter library: {len(meta['clusters'])} clusters of {meta.get('num_adapters')} LoRA adapters\n\n"
        "Existing LoRA adapters clustered by their parameters (k-means on a sketch of their updates) and merged "
        f"per cluster with `{merge.get('method')}`, on base model {_md(meta.get('base_model'))}. Built with "
        "[peft-cp-merge](https://pypi.org/project/peft-cp-merge/) (`peft-cp-merge library build`).\n\n"
        f"{cluster_table(meta)}\n\n## Members\n\n{members}\n\n"
        "## Use\n\n```python\nfrom peft_cp_merge.library import AdapterLibrary\n\n"
        "lib = AdapterLibrary.from_pretrained(\"<this repo or folder>\")\n"
        "arrow = lib.arrow_model(base_model)            # route per token over the clusters (PEFT's Arrow)\n"
        "merged = lib.merge(method=\"cp\")                # one adapter\n```\n\n"
        "## Build\n\n```yaml\n" + dump_recipe({"clustering": meta.get("clustering"), "merge": merge}) + "```\n"
    )
    return model_card(body, base_model=meta.get("base_model"), relation="adapter",
                      tags=["lora", "peft-cp-merge", "adapter-library"])


# --- the library --------------------------------------------------------------------------------------------------

class AdapterLibrary:
    """A trained adapter library (see the module docstring for the layout).

    Create one with :func:`peft_cp_merge.library.train_library` or open one with :meth:`from_pretrained`.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any], centroids: torch.Tensor | None,
                 assignments: torch.Tensor | None = None, *, available: Sequence[int] | None = None):
        self.path = Path(path)
        self.meta = meta
        self.centroids = centroids
        self.assignments = assignments
        self.available = sorted(available) if available is not None else list(range(len(meta["clusters"])))
        self._embedder = None

    # properties
    @property
    def num_clusters(self) -> int:
        return len(self.meta["clusters"])

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model")

    @property
    def embedding_model(self) -> str | None:
        """The sentence-transformers model of :meth:`route` (``None`` for a built library)."""
        return self.meta.get("embedding_model")

    @property
    def kind(self) -> str:
        """``"trained"`` (clusters of training examples, :func:`train_library`) or ``"built"`` (clusters of
        existing adapters, :meth:`from_adapters`)."""
        return self.meta.get("kind", "trained")

    @property
    def sizes(self) -> list[int]:
        return [c["size"] for c in self.meta["clusters"]]

    @property
    def adapter_names(self) -> list[str]:
        return [cluster_dirname(i) for i in self.available]

    def adapter_path(self, i: int) -> Path:
        if i not in self.available:
            raise LibraryError(f"Cluster {i} was not loaded (available: {self.available}). Open the library with "
                               "clusters=None to get every cluster.")
        return self.path / cluster_dirname(i)

    def cluster_table(self) -> str:
        return cluster_table(self.meta)

    def __repr__(self) -> str:
        return (f"AdapterLibrary({str(self.path)!r}, clusters={self.num_clusters}, sizes={self.sizes}, "
                f"base_model={self.base_model!r})")

    # loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, clusters: int | Sequence[int] | None = None,
                        revision: str | None = None, cache_dir: str | None = None, token: str | None = None,
                        verify: bool = True) -> AdapterLibrary:
        """Open a library from a local folder or a Hub repo id (``huggingface_hub.snapshot_download``; honours
        ``HF_HUB_OFFLINE`` and the cache). ``clusters`` (an id or a list) downloads only those adapters
        (``allow_patterns``). ``verify`` checks every loaded adapter's sha256 against ``library.json``."""
        if isinstance(clusters, int):
            clusters = [clusters]
        path = Path(name_or_path)
        if not path.is_dir():
            if path.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") != 1:
                raise LibraryFormatError(f"{name_or_path}: no such library folder, and not a Hub repo id "
                                         "(user/name).")
            from huggingface_hub import snapshot_download

            patterns = list(_META_PATTERNS)
            patterns += ["cluster_*/*"] if clusters is None else [f"{cluster_dirname(i)}/*" for i in clusters]
            try:
                path = Path(snapshot_download(str(name_or_path), revision=revision, cache_dir=cache_dir,
                                              token=token, allow_patterns=patterns))
            except Exception as e:
                raise LibraryFormatError(
                    f"Could not get the library {name_or_path!r} from the Hub: {type(e).__name__}: {e}. Check the "
                    "repo id, log in for private repos; offline (HF_HUB_OFFLINE=1) it must already be in the cache."
                ) from e
        meta = _read_meta(path)
        k = len(meta["clusters"])
        wanted = list(range(k)) if clusters is None else list(clusters)
        bad = [i for i in wanted if not 0 <= i < k]
        if bad:
            raise LibraryError(f"Clusters {bad} do not exist; the library has clusters 0..{k - 1}.")
        centroids, assignments = (None, None) if meta.get("kind") == "built" else \
            _read_centroids(path, k, meta.get("embedding_dim"))  # built from adapters: no text centroids
        lib = cls(path, meta, centroids, assignments, available=wanted)
        if verify:
            lib.verify()
        return lib

    @classmethod
    def from_adapters(cls, sources: Sequence[str | Path], num_clusters: int | None = None, *, out: str | Path,
                      method: str = "cp", rank: int | None = None, overwrite: bool = False, wait: bool = False,
                      **kwargs) -> AdapterLibrary:
        """A library from LoRA adapters you already have: cluster them by their parameters and merge each cluster.

        ``sources`` are adapter folders or Hub ids (``user/repo[/subfolder][@revision]``) of plain LoRAs for one
        base model (a mix is refused unless ``base_model="<id>"`` says they are the same weights). Each adapter is
        embedded by a sketch of its updates ``s B A`` (factorisation-invariant, never the dense matrix), reduced
        with a truncated SVD; k-means on cosine similarity clusters them, with ``num_clusters`` clusters or, when
        ``None``, the k in ``min_clusters..max_clusters`` (default 2..16) with the best silhouette
        (:func:`peft_cp_merge.library.cluster.cluster_adapters` explains the choice). Cluster ``i`` is the merge of
        its members with ``method`` (any registered method, ``**options`` its options; members weighted equally),
        at ``rank`` (default: the largest source rank for every cluster that can reach it, so the library is
        Arrow-ready). ``library.json`` lists each cluster's members.

        Written to ``out`` atomically (temporary folder, then rename) under the output's lock (another writer is
        refused unless ``wait``); an existing ``out`` is refused unless ``overwrite``, which replaces only a library
        this package wrote; ``out`` may not be, contain or be inside a source; a source file that changes between
        the clustering and the merges is refused, nothing written. Other keyword arguments: ``base_model``,
        ``min_clusters``, ``max_clusters``, ``sketch_dim`` (16), ``components`` (32), ``n_init``, ``seed``,
        ``token``, ``progress``. The result has no text centroids: :meth:`route` refuses it; :meth:`merge`,
        :meth:`arrow_model`, :meth:`load_into` and ``push_to_hub`` work.
        """
        from .._io import check_unchanged
        from .build import plan_build

        plan = plan_build(sources, out, num_clusters=num_clusters, method=method, rank=rank, overwrite=overwrite,
                          **kwargs)

        def write(tmp: Path) -> None:
            clusters = []
            for i in range(plan.num_clusters):
                clusters.append(plan.merge_cluster(i, tmp / cluster_dirname(i), cluster_dirname(i)))
                clusters[-1]["sha256"] = adapter_checksum(tmp / cluster_dirname(i))
            check_unchanged(plan.identities, "building the library")  # the files clustered are the ones merged
            meta = plan.meta(FORMAT, clusters)  # with the marker that lets overwrite=True replace it later
            atomic_write_json(tmp / LIBRARY_FILE, meta)
            atomic_write_text(tmp / CARD_FILE, render_card(meta))

        try:
            atomic_folder(plan.out, write, overwrite=overwrite, kind="adapter-library", wait=wait,
                          sources=plan.source_paths, needed=plan.needed_bytes)
        except FileExistsError as e:
            raise LibraryExistsError(str(e)) from None
        return cls.from_pretrained(plan.out)

    def verify(self) -> None:
        """Raise :class:`LibraryFormatError` if a loaded cluster adapter is missing or fails its checksum."""
        for i in self.available:
            c = self.meta["clusters"][i]
            folder = self.path / cluster_dirname(i)
            if c.get("status") != "done" or not all((folder / f).is_file() for f in ADAPTER_FILES):
                raise LibraryFormatError(
                    f"Cluster {i} of {self.path} is not trained/complete (status {c.get('status')!r}). Rerun "
                    "`peft-cp-merge library train` with the same config to resume it."
                )
            if adapter_checksum(folder) != c.get("sha256"):
                raise LibraryFormatError(
                    f"{folder} does not match its sha256 in library.json (modified or corrupt). Rerun training "
                    "with the same config to retrain it, or restore the file."
                )

    # saving / pushing
    def save_pretrained(self, save_directory: str | Path, *, overwrite: bool = False, wait: bool = False) -> Path:
        """Copy the library (the loaded clusters) to ``save_directory`` with :func:`peft_cp_merge._io.atomic_folder`
        (temporary folder, then rename; an existing folder is refused unless ``overwrite``, which replaces only a
        library this package wrote; a folder inside this library or containing it is refused; another writer of
        the same folder is refused unless ``wait``)."""
        dest = Path(save_directory)
        if dest.exists() and dest.resolve() == self.path.resolve():
            return dest

        def write(tmp: Path) -> None:
            meta = json.loads(json.dumps(self.meta))
            meta[MARKER_FIELD] = marker("adapter-library")
            for i, c in enumerate(meta["clusters"]):
                if i not in self.available:
                    c["status"] = "not-included"
                    c.pop("sha256", None)
            for name in (CENTROIDS_FILE, PLOT_FILE):
                if (self.path / name).is_file():
                    shutil.copy2(self.path / name, tmp / name)
            for i in self.available:
                shutil.copytree(self.path / cluster_dirname(i), tmp / cluster_dirname(i))
            atomic_write_json(tmp / LIBRARY_FILE, meta)
            atomic_write_text(tmp / CARD_FILE, render_card(meta))

        try:
            return atomic_folder(dest, write, overwrite=overwrite, kind="adapter-library", wait=wait,
                                 libraries=[self.path], needed=tree_size(self.path))
        except FileExistsError as e:
            raise LibraryExistsError(str(e)) from None

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, token: str | None = None) -> CommitInfo:
        """Create ``repo_id`` (if needed) and upload the whole library in one commit (``HfApi.upload_folder``).
        Returns the commit info."""
        from huggingface_hub import HfApi

        if len(self.available) != self.num_clusters:
            raise LibraryError("This library was opened with only some clusters; open it with clusters=None "
                               "before pushing, so the repo is complete.")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        message = commit_message or f"Upload TC-LoRA adapter library ({self.num_clusters} clusters)"
        return api.upload_folder(folder_path=str(self.path), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=message, ignore_patterns=[".*", "**/.*", f"**/{STATE_FILE}"])

    # using
    def load_into(self, model: PreTrainedModel | PeftModel, *, clusters: Sequence[int] | None = None,
                  is_trainable: bool = False) -> PeftModel:
        """Load the cluster adapters into ``model`` (a transformers model or a ``PeftModel``) as
        ``cluster_<i>``; returns the ``PeftModel``. The first loaded cluster is the active adapter."""
        from peft import PeftModel

        ids = self.available if clusters is None else [int(i) for i in clusters]
        for i in ids:
            self.adapter_path(i)
        for i in ids:
            name, path = cluster_dirname(i), str(self.adapter_path(i))
            if isinstance(model, PeftModel):
                model.load_adapter(path, adapter_name=name, is_trainable=is_trainable)
            else:
                model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=is_trainable)
        model.set_adapter(cluster_dirname(ids[0]))
        return model

    def merge(self, method: str = "cp", weights: Sequence[float] | str | None = None, *, rank: int | None = None,
              clusters: Sequence[int] | None = None, **options: Any) -> MergedAdapter:
        """Merge the cluster adapters into one with the adapter-file engine
        (:func:`peft_cp_merge.merge_adapters`); returns its merged-adapter object (``save_pretrained(dir)``).

        ``weights``: ``None`` (the engine's default), one float per cluster, or ``"size"`` (each cluster weighted
        by its share of the training examples). ``options`` go to the merge method (e.g. ``cp_init``).
        """
        from ..files.merge import merge_adapters

        ids = self.available if clusters is None else [int(i) for i in clusters]
        if isinstance(weights, str):
            if weights != "size":
                raise LibraryConfigError(f"weights={weights!r}: use None, one number per cluster, or 'size'.")
            total = sum(self.sizes[i] for i in ids)
            weights = [self.sizes[i] / total for i in ids]
        if weights is not None and len(weights) != len(ids):
            raise LibraryConfigError(f"{len(weights)} weight(s) for {len(ids)} clusters {ids}: give one weight per "
                                     "cluster, or 'size' (weights proportional to the cluster sizes).")
        sources = [str(self.adapter_path(i)) for i in ids]
        merged = merge_adapters(sources, weights=None if weights is None else list(weights), method=method,
                                rank=rank, **options)
        merged.libraries = [self.path]  # its save_pretrained never writes into (or over) this library
        return merged

    def route(self, texts: str | Sequence[str], top_k: int = 1, temperature: float = 0.05, *,
              embedder: SentenceTransformer | None = None) -> Routing:
        """Clusters for new inputs: cosine similarity of their embeddings (the library's embedding model) to the
        centroids; ``.top1`` gives one id per text, ``.ids``/``.weights`` the ``top_k`` clusters with softmax
        weights at ``temperature``."""
        from .embed import embed_texts, load_embedder

        if self.centroids is None:
            raise LibraryError(
                f"{self.path} was built from existing adapters (AdapterLibrary.from_adapters), not trained on "
                "examples, so it has no text centroids to route by. Route it per token with "
                "lib.arrow_model(base_model), or merge it with lib.merge()."
            )
        if isinstance(texts, str):
            texts = [texts]
        if embedder is None:
            if self._embedder is None:
                self._embedder = load_embedder(self.embedding_model)
            embedder = self._embedder
        emb = embed_texts(texts, embedder)
        if emb.ndim != 2 or emb.shape[1] != self.centroids.shape[1]:
            raise LibraryFormatError(
                f"The embedding model gives {tuple(emb.shape)[1:]}-dim embeddings but the centroids of {self.path} "
                f"are {self.centroids.shape[1]} wide: this is not the library's embedding model "
                f"({self.embedding_model}), or the library is corrupt."
            )
        return route_embeddings(emb, self.centroids, top_k=top_k, temperature=temperature)

    def arrow_model(self, base_model: PreTrainedModel, top_k: int = 3, router_temperature: float = 1.0,
                    general_adapters: Sequence[str | Path] | None = None, *, clusters: Sequence[int] | None = None,
                    rng_seed: int | None = None, **load_kwargs: Any) -> PeftModel:
        """PEFT's Arrow model (``peft.create_arrow_model``, peft >= 0.18) over the cluster adapters: per token and
        layer, the ``top_k`` clusters whose prototype (top right singular vector of ``B A``) is most aligned with
        the hidden state, softmax-mixed at ``router_temperature``. Unlike :meth:`route` it needs no embedding model
        and routes inside the network, so it also works for libraries built with :meth:`from_adapters`.

        Cluster ``clusters[j]`` (default: every loaded cluster) is PEFT's expert ``task_j``
        (``model.arrow_clusters``). ``general_adapters`` (folders or Hub ids of general-purpose LoRAs with the same
        rank and target modules) turn on GenKnowSub: their mean is subtracted from every expert **in place on the
        first forward**. The experts are copies in memory (the library's files are never written) and the
        returned ``PeftModel`` refuses ``save_pretrained``/``push_to_hub``. ``rng_seed`` seeds the power iteration
        of the prototypes; ``load_kwargs`` go to PEFT's adapter loading. ``base_model`` is wrapped in place, as
        ``PeftModel.from_pretrained`` does. Raises :class:`LibraryError` naming the cluster when the adapters
        differ in rank or target modules, and naming the installed version when peft is older than 0.18.
        """
        from .arrow import arrow_model

        return arrow_model(self, base_model, top_k=top_k, router_temperature=router_temperature,
                           general_adapters=general_adapters, clusters=clusters, rng_seed=rng_seed, **load_kwargs)


@functools.cache
def _library_schema():
    """pydantic models of the ``library.json`` fields this code reads (other fields are kept as they are)."""
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class Member(BaseModel):  # a source adapter of a built library's cluster
        model_config = ConfigDict(extra="allow", strict=True)
        source: str
        revision: str | None = None

    class Cluster(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        size: int = Field(ge=0)
        status: str = "pending"
        sha256: str | None = None
        previews: list[str] = []
        members: list[Member] | None = Field(default=None, max_length=MAX_CLUSTERS)

    class Meta(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        format: str
        format_version: int = Field(ge=1)
        kind: Literal["trained", "built"] = "trained"
        embedding_model: str | None = None
        base_model: str | None = None
        clusters: list[Cluster] = Field(min_length=1, max_length=MAX_CLUSTERS)

        @model_validator(mode="after")
        def _kind_fields(self):
            if self.kind == "trained" and self.embedding_model is None:
                raise ValueError("embedding_model: a trained library names its embedding model")
            if self.kind == "built" and any(c.members is None for c in self.clusters):
                raise ValueError("clusters: every cluster of a built library lists its members")
            return self

    return Meta


MAX_CLUSTERS = 4096
"""Most clusters a library may list (a ``library.json`` is untrusted: it must not decide how much we allocate)."""


def _read_meta(path: Path) -> dict[str, Any]:
    """``library.json``, checked: JSON object, our format, a version we read, typed cluster entries."""
    from pydantic import ValidationError

    f = path / LIBRARY_FILE
    if not f.is_file():
        raise LibraryFormatError(f"{path} has no {LIBRARY_FILE}: not an adapter library.")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LibraryFormatError(f"{f} is not valid JSON ({e}); the library is corrupt.") from e
    except RecursionError:
        raise LibraryFormatError(f"{f} is nested too deeply to be a {LIBRARY_FILE}; the library is corrupt.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LibraryFormatError(f"{f} is not a {FORMAT} file (expected a JSON object with \"format\": "
                                 f"\"{FORMAT}\").")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > MAX_FORMAT_VERSION:
        raise LibraryFormatError(f"{f} has format version {version}; this peft-cp-merge reads up to "
                                 f"{MAX_FORMAT_VERSION}. Upgrade peft-cp-merge.")
    try:
        checked = _library_schema().model_validate(meta)
    except ValidationError as e:
        where, msg, value = first_error(e)
        raise LibraryFormatError(f"{f}: field `{where}` {msg} (got {value!r:.60}); the "
                                 "library is corrupt or was not written by peft-cp-merge. Re-download or retrain "
                                 "it.") from None
    meta["clusters"] = [c.model_dump() for c in checked.clusters]
    return meta


def _read_centroids(path: Path, k: int, dim: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``centroids`` (k x dim, finite floats; ``dim`` the embedding width library.json records, when it does) and
    the optional ``assignments`` (n, integers in 0..k-1)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cpath = path / CENTROIDS_FILE
    if not cpath.is_file():
        raise LibraryFormatError(f"{path} has no {CENTROIDS_FILE}; the library is incomplete.")
    try:
        tensors = load_file(str(cpath))
    except (SafetensorError, OSError) as e:
        raise LibraryFormatError(f"{cpath} is not a readable safetensors file ({e}); the library is corrupt.") from e
    c, a = tensors.get("centroids"), tensors.get("assignments")
    if c is None or c.ndim != 2 or not c.is_floating_point() or c.shape[0] != k or not torch.isfinite(c).all():
        shape = None if c is None else f"{tuple(c.shape)} {c.dtype}"
        raise LibraryFormatError(f"{cpath} must hold `centroids`, finite floats of shape ({k}, dim) for the {k} "
                                 f"clusters of library.json; found {shape}. The library is corrupt.")
    if isinstance(dim, bool) or not isinstance(dim, (int, type(None))) or (dim is not None and dim < 1):
        raise LibraryFormatError(f"{path / LIBRARY_FILE}: `embedding_dim` must be a positive integer (got "
                                 f"{dim!r:.40}); the library is corrupt.")
    if dim is not None and c.shape[1] != dim:
        raise LibraryFormatError(
            f"{cpath}: the centroids are {c.shape[1]} wide, but library.json says its embedding model gives "
            f"{dim}-dim embeddings, so no input could be routed. The library is corrupt: re-download or retrain it."
        )
    if a is not None and (a.ndim != 1 or a.is_floating_point() or a.is_complex()
                          or (a.numel() and not 0 <= int(a.min()) <= int(a.max()) < k)):
        raise LibraryFormatError(f"{cpath}: `assignments` must be cluster ids in 0..{k - 1}, one per example. The "
                                 "library is corrupt.")
    return c.float(), None if a is None else a.long()
