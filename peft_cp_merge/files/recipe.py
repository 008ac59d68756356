"""Merge recipes: one typed schema (:class:`Recipe`), read from a YAML file or from the recipe block of a merged
adapter's model card (``files.adapter`` writes it), so

    peft-cp-merge merge --recipe path/to/merged/README.md

re-runs the merge (:func:`load_recipe` accepts a recipe file or a card).

A recipe is data, not authority: it may name the sources, weights, method, rank, options, base model, dtype,
device and batch size, never where to write, whether to overwrite or whether to push. Those come only from the
command line (``--out``, ``--overwrite``, ``--push-to-hub``); a recipe naming them is refused. Every field is
type-checked by one strict pydantic model (:class:`Recipe`): booleans and numbers are not strings, unknown
fields are errors.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._schema import first_error
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


# what a field must be, named in the error when a recipe's value is not that (pydantic decides that it is not)
_EXPECTED = {
    "sources": "must be a non-empty list of adapter folders or Hub ids; a source must be a string or "
               "{source: ..., revision: ...} (strings)",
    "weights": "must be a list of finite numbers, one per source",
    "method": "must be a non-empty string",
    "base_model": "must be a non-empty string",
    "device": "must be a non-empty string",
    "rank": "must be a positive integer",
    "batch_size": "must be a positive integer",
    "dtype": f"must be one of {list(DTYPE_NAMES)}",
    "options": "must be a mapping such as {cp_init: svd}",
}


class Source(BaseModel):
    """A source given as a mapping: the folder or Hub id, and the revision to pin."""

    model_config = ConfigDict(extra="forbid", strict=True)
    source: str = Field(min_length=1)
    revision: str | None = None

    def spec(self) -> str:
        return self.source + (f"@{self.revision}" if self.revision else "")


_Name = Annotated[str, Field(min_length=1)]
_Positive = Annotated[int, Field(ge=1)]


class Recipe(BaseModel):
    """A merge recipe, type-checked strictly (pydantic): what to merge and how, never where the result goes.

    ``None`` means "not given" (the command line or the engine's default decides). Strict: ``"3"`` is not a rank,
    ``true`` not a number, unknown fields are errors. Build one with :meth:`parse`, which names the fix.
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    sources: list[Annotated[str, Field(min_length=1)] | Source] | None = Field(default=None, min_length=1)
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(default=None, min_length=1)
    method: _Name | None = None
    rank: _Positive | None = None
    options: dict[str, Any] | None = None
    base_model: _Name | None = None
    dtype: Literal[DTYPE_NAMES] | None = None
    device: _Name | None = None
    batch_size: _Positive | None = None

    @classmethod
    def parse(cls, data: Any, where: str = "recipe") -> Recipe:
        """Check a recipe mapping (as YAML loads it); raise :class:`MergeInputError` naming the field and the fix."""
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
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            loc, msg, _ = first_error(e)
            name = loc.split(".")[0]
            raise MergeInputError(f"{where}: `{name}` {_EXPECTED[name]}, got {data[name]!r:.200} ({loc}: {msg})."
                                  ) from None

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set (``options`` always), as plain values; ``sources`` as spec strings
        (``repo@revision`` when the recipe pins a revision), ``weights`` as floats."""
        d = {k: v for k, v in self.model_dump(exclude={"sources"}).items() if v is not None}
        d["options"] = dict(self.options or {})
        if self.sources is not None:
            d["sources"] = [s if isinstance(s, str) else s.spec() for s in self.sources]
        if self.weights is not None:
            d["weights"] = [float(w) for w in self.weights]
        return d


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
