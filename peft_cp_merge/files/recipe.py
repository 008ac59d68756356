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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._schema import first_error
from .._yaml import load_yaml
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
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./@:+=-]*")
_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")


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
    if RECIPE_START in text:
        text = card_recipe(text, str(path))
    elif path.suffix.lower() == ".md":
        raise MergeInputError(f"{path} has no peft-cp-merge recipe block; give a recipe YAML file or the "
                              "README.md of an adapter merged by peft-cp-merge.")
    recipe = load_yaml(text, f"Recipe {str(path)!r}", error=MergeInputError, max_bytes=MAX_RECIPE_BYTES)
    return check_recipe(recipe, str(path))


def card_recipe(text: str, where: str = "model card") -> str:
    """The recipe of a model card: the text of its one visible YAML block, found by a rule a reader can check.

    The rule: outside the metadata header (``---`` ... ``---``), the card has exactly one line that is exactly
    ``<!-- peft-cp-merge recipe -->`` (the marker may appear nowhere else, not even inside a comment or a code
    block), that line is outside any HTML comment and code block, the next non-blank line opens a fenced code
    block whose info string is ``yaml``, and that block is the only ``yaml`` block of the card outside HTML
    comments. The recipe is that block's text up to its closing fence. Anything else (a second marker, e.g. a
    recipe hidden in an HTML comment, a second ``yaml`` block, a marker inside a comment, an unclosed block) is
    refused: a card must never run a recipe other than the one it shows.
    """
    def refuse(problem: str) -> MergeInputError:
        return MergeInputError(f"{where}: {problem}; refusing to guess which recipe to run. Give a recipe YAML "
                               "file, or the README.md of an adapter merged by peft-cp-merge as it was written.")

    if text.count(RECIPE_START) != 1:
        raise refuse(f"the recipe marker {RECIPE_START!r} appears {text.count(RECIPE_START)} times (once is "
                     "expected: a second one may hide a recipe in an HTML comment)")
    lines = text.splitlines()
    i = 0
    if lines and lines[0].strip() == "---":  # the metadata header (huggingface_hub's card_data)
        ends = [j for j in range(1, len(lines)) if lines[j].strip() == "---"]
        i = ends[0] + 1 if ends else 0
    recipe, blocks, in_comment = None, 0, False
    while i < len(lines):
        line = lines[i]
        if in_comment:
            in_comment = "-->" not in line
            if RECIPE_START in line:
                raise refuse("the recipe marker is inside an HTML comment")
            i += 1
            continue
        opening = _FENCE.match(line)
        if line == RECIPE_START:
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            opening = _FENCE.match(lines[j]) if j < len(lines) else None
            if opening is None or opening["info"] != "yaml":
                raise refuse("the recipe marker is not directly followed by a ```yaml block")
            i = j
        if opening is not None:  # a fenced code block: skip to its closing fence
            fence, start = opening["fence"], i + 1
            i = start
            closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
            while i < len(lines) and not closing.match(lines[i]):
                i += 1
            if i == len(lines):
                raise refuse(f"the code block opened on line {start} is never closed")
            body = "\n".join(lines[start:i]) + "\n"
            if RECIPE_START in body:
                raise refuse("the recipe marker is inside a code block")
            if opening["info"] == "yaml":
                blocks += 1
                if recipe is None and _marked(lines, start - 1):
                    recipe = body
            i += 1
            continue
        if RECIPE_START in line:
            raise refuse("the recipe marker is not on a line of its own")
        rest = line
        while "<!--" in rest:  # an HTML comment opens here; it may close on this line
            rest = rest.split("<!--", 1)[1]
            if "-->" not in rest:
                in_comment = True
                break
            rest = rest.split("-->", 1)[1]
        i += 1
    if recipe is None:
        raise refuse("the recipe marker is not followed by a visible ```yaml block")
    if blocks != 1:
        raise refuse(f"the card has {blocks} ```yaml blocks outside HTML comments (one, the recipe, is expected)")
    return recipe


def dump_recipe(recipe: dict[str, Any]) -> str:
    """``recipe`` as the YAML text of a card's recipe block: ASCII only, one line per value, and every string that
    is not a plain word double-quoted with ``<``, ``>`` and backticks written as escapes, so no name (backtick
    fences, newlines, HTML comment markers, the recipe marker itself) can end the block or hide in it, and
    :func:`card_recipe` reads back exactly ``recipe``."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def represent_str(dumper, value: str):
        if _PLAIN.fullmatch(value):
            return dumper.represent_str(value)
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')

    Dumper.add_representer(str, represent_str)
    text = yaml.dump(recipe, Dumper=Dumper, sort_keys=False, allow_unicode=False, width=float("inf"))
    # only double-quoted scalars hold these characters (plain words and the field names do not)
    return text.replace("<", "\\x3C").replace(">", "\\x3E").replace("`", "\\x60")


def _marked(lines: list[str], fence_line: int) -> bool:
    """The last non-blank line before ``fence_line`` is the recipe marker."""
    j = fence_line - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    return j >= 0 and lines[j] == RECIPE_START


def check_recipe(recipe: Any, where: str = "recipe") -> dict[str, Any]:
    """:meth:`Recipe.parse` as a dict: field names and types checked, ``sources`` normalised to spec strings."""
    return Recipe.parse(recipe, where).as_dict()
