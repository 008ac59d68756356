"""Model card of a merged adapter, and merge recipes (YAML) that can be read back from it.

The card's metadata says ``library_name: peft``, the ``base_model`` with ``base_model_relation: merge``, and the
tags ``lora``, ``peft-cp-merge`` and the method name; its body lists the source adapters (Hub sources pinned to
the downloaded commit) and holds the full recipe as a YAML block, so

    peft-cp-merge merge --recipe path/to/merged/README.md

re-runs the merge (:func:`load_recipe` accepts a recipe file or a card).

A recipe is data, not authority: it may name the sources, weights, method, rank, options, base model, dtype,
device and batch size, never where to write, whether to overwrite or whether to push. Those come only from the
command line (``--out``, ``--overwrite``, ``--push-to-hub``); a recipe naming them is refused. Every field is
type-checked (:class:`Recipe`): booleans and numbers are not strings, unknown fields are errors.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import yaml

from ..errors import MergeInputError

RECIPE_FIELDS = {
    "sources": "adapter folders or Hub ids (strings, or {source: ..., revision: ...})",
    "weights": "one weight per source (default 1/T each)",
    "method": "merge method (default cp)",
    "rank": "rank of the merged adapter (default: largest source rank)",
    "options": "the method's options, e.g. {cp_init: svd, cp_variant: weighted}",
    "base_model": "record this base model instead of checking the sources agree",
    "dtype": "dtype of the merged factors (float32, bfloat16, float16)",
    "device": "where to compute (cpu, cuda)",
    "batch_size": "equal-shape modules merged together",
}
# Where the result goes is the user's decision alone: never taken from a recipe or a model card.
COMMAND_LINE_ONLY = {"out": "--out DIR", "overwrite": "--overwrite", "push_to_hub": "--push-to-hub REPO_ID"}
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
MAX_RECIPE_BYTES = 4 * 2**20
RECIPE_START = "<!-- peft-cp-merge recipe -->"
_BLOCK = re.compile(re.escape(RECIPE_START) + r"\s*```yaml\n(.*?)```", re.S)


@dataclass
class Recipe:
    """A merge recipe, type-checked: what to merge and how, never where the result goes.

    ``None`` means "not given" (the command line or the engine's default decides). ``sources`` are spec strings
    (``repo@revision`` when the recipe pins a revision).
    """

    sources: list[str] | None = None
    weights: list[float] | None = None
    method: str | None = None
    rank: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    dtype: str | None = None
    device: str | None = None
    batch_size: int | None = None

    @classmethod
    def parse(cls, data: Any, where: str = "recipe") -> Recipe:
        """Check every field of a recipe mapping (as YAML loads it); raise :class:`MergeInputError` naming the fix."""
        if data is None:
            data = {}
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise MergeInputError(f"{where} must be a YAML mapping with fields {sorted(RECIPE_FIELDS)}.")
        forbidden = [k for k in COMMAND_LINE_ONLY if k in data]
        if forbidden:
            flags = " / ".join(COMMAND_LINE_ONLY[k] for k in forbidden)
            raise MergeInputError(
                f"{where} sets {forbidden}: a recipe or model card may describe the merge, but where to write, "
                f"whether to overwrite and whether to push come only from the command line. Remove "
                f"{'them' if len(forbidden) > 1 else 'it'} from the recipe and pass {flags} instead."
            )
        unknown = sorted(set(data) - set(RECIPE_FIELDS))
        if unknown:
            raise MergeInputError(f"{where}: unknown field(s) {unknown}. Valid fields: {sorted(RECIPE_FIELDS)}.")
        get = {k: v for k, v in data.items() if v is not None}.get
        recipe = cls()
        sources = get("sources")
        if sources is not None:
            if not isinstance(sources, list) or not sources:
                raise MergeInputError(f"{where}: `sources` must be a non-empty list of adapter folders or Hub ids.")
            recipe.sources = [source_spec(s, where) for s in sources]
        weights = get("weights")
        if weights is not None:
            if not isinstance(weights, list) or not weights or not all(_number(w) for w in weights):
                raise MergeInputError(f"{where}: `weights` must be a list of finite numbers, one per source, got "
                                      f"{weights!r}.")
            recipe.weights = [float(w) for w in weights]
        for key in ("method", "base_model", "device"):
            value = get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise MergeInputError(f"{where}: `{key}` must be a non-empty string, got {value!r}.")
            setattr(recipe, key, value)
        for key in ("rank", "batch_size"):
            value = get(key)
            if value is not None and (not _integer(value) or value < 1):
                raise MergeInputError(f"{where}: `{key}` must be a positive integer, got {value!r}.")
            setattr(recipe, key, value)
        dtype = get("dtype")
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise MergeInputError(f"{where}: `dtype` must be one of {list(DTYPE_NAMES)}, got {dtype!r}.")
        recipe.dtype = dtype
        options = get("options") or {}
        if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
            raise MergeInputError(f"{where}: `options` must be a mapping such as {{cp_init: svd}}, got {options!r}.")
        recipe.options = dict(options)
        return recipe

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set (``options`` always), as plain Python values."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe from a YAML file, or from the recipe block of a merged adapter's model card (README.md).

    Returns :meth:`Recipe.as_dict` of the checked recipe. A recipe naming ``out``, ``overwrite`` or
    ``push_to_hub`` is refused: those are only taken from the command line.
    """
    path = Path(path)
    if not path.is_file():
        raise MergeInputError(f"Recipe {str(path)!r} does not exist (or is not a file).")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise MergeInputError(f"Recipe {str(path)!r} is larger than {MAX_RECIPE_BYTES // 2**20} MiB; a recipe or "
                              "model card is a few kB. Give the right file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MergeInputError(f"Recipe {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    block = _BLOCK.search(text)
    if block is not None:
        text = block.group(1)
    elif path.suffix.lower() == ".md":
        raise MergeInputError(f"{path} has no peft-cp-merge recipe block; give a recipe YAML file or the "
                              "README.md of an adapter merged by peft-cp-merge.")
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergeInputError(f"Recipe {path} is not valid YAML: {' '.join(str(e).split())}") from None
    return check_recipe(recipe, str(path))


def check_recipe(recipe: Any, where: str = "recipe") -> dict[str, Any]:
    """:meth:`Recipe.parse` as a dict: field names and types checked, ``sources`` normalised to spec strings."""
    return Recipe.parse(recipe, where).as_dict()


def source_spec(s: Any, where: str = "recipe") -> str:
    if isinstance(s, str) and s:
        return s
    if (isinstance(s, dict) and isinstance(s.get("source"), str) and s["source"] and set(s) <= {"source", "revision"}
            and (s.get("revision") is None or isinstance(s["revision"], str))):
        return s["source"] + (f"@{s['revision']}" if s.get("revision") else "")
    raise MergeInputError(f"{where}: a source must be a string or {{source: ..., revision: ...}} (strings), "
                          f"got {s!r}.")
