"""Model card of a merged adapter, and merge recipes (YAML) that can be read back from it.

The card's metadata says ``library_name: peft``, the ``base_model`` with ``base_model_relation: merge``, and the
tags ``lora``, ``peft-cp-merge`` and the method name; its body lists the source adapters (Hub sources pinned to
the downloaded commit) and holds the full recipe as a YAML block, so

    peft-cp-merge merge --recipe path/to/merged/README.md

re-runs the merge (:func:`load_recipe` accepts a recipe file or a card).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import MergeInputError

if TYPE_CHECKING:
    from .engine import MergedAdapter

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
    "out": "output folder",
    "overwrite": "replace an existing output folder",
    "push_to_hub": "Hub repo id to upload the merged adapter to",
}
_RECIPE_START = "<!-- peft-cp-merge recipe -->"
_BLOCK = re.compile(re.escape(_RECIPE_START) + r"\s*```yaml\n(.*?)```", re.S)


def render_card(merged: MergedAdapter) -> str:
    """The README.md (YAML metadata + markdown) written next to a merged adapter."""
    from huggingface_hub import ModelCard, ModelCardData

    from .methods import get_merge_method

    r = merged.recipe
    method = get_merge_method(r["method"])
    base = r["base_model"] or "<base model>"
    data = ModelCardData(library_name="peft", tags=["lora", "peft-cp-merge", r["method"]])
    if r["base_model"]:
        data.base_model, data.base_model_relation = r["base_model"], "merge"
    rows = "\n".join(
        f"| {i} | `{s['source']}` | {s.get('revision') or 'local'} | {w:g} |"
        for i, (s, w) in enumerate(zip(r["sources"], r["weights"]))
    )
    recipe = yaml.safe_dump(r, sort_keys=False)
    stats = merged.stats
    body = f"""
# Merged LoRA adapter ({r['method']})

A LoRA adapter for `{base}` made by merging {len(r['sources'])} LoRA adapters with
**{method.pretty_name}** ({method.reference}) at rank {r['rank']}, using
[peft-cp-merge](https://pypi.org/project/peft-cp-merge/).

| # | source adapter | revision | weight |
|---|---|---|---|
{rows}

Merged {stats.get('modules', '?')} modules in {stats.get('seconds', float('nan')):.2f} s on {stats.get('created', '?')}
({', '.join(f'{k} {v}' for k, v in stats.get('versions', {}).items())}).

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "<this repo or folder>")
```

## Recipe

Re-run this merge with `peft-cp-merge merge --recipe README.md --out merged` (this card is a valid recipe).

{_RECIPE_START}
```yaml
{recipe}```
"""
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body))


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe from a YAML file, or from the recipe block of a merged adapter's model card (README.md)."""
    path = Path(path)
    if not path.is_file():
        raise MergeInputError(f"Recipe {str(path)!r} does not exist.")
    text = path.read_text()
    block = _BLOCK.search(text)
    if block is not None:
        text = block.group(1)
    elif path.suffix.lower() == ".md":
        raise MergeInputError(f"{path} has no peft-cp-merge recipe block; give a recipe YAML file or the "
                              "README.md of an adapter merged by peft-cp-merge.")
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergeInputError(f"Recipe {path} is not valid YAML: {e}") from e
    return check_recipe(recipe, str(path))


def check_recipe(recipe: Any, where: str = "recipe") -> dict[str, Any]:
    """Validate field names and normalise ``sources`` to spec strings (``repo@revision`` when pinned)."""
    if not isinstance(recipe, dict):
        raise MergeInputError(f"{where} must be a YAML mapping with fields {sorted(RECIPE_FIELDS)}.")
    unknown = sorted(set(recipe) - set(RECIPE_FIELDS))
    if unknown:
        raise MergeInputError(f"{where}: unknown field(s) {unknown}. Valid fields: {sorted(RECIPE_FIELDS)}.")
    recipe = dict(recipe)
    sources = recipe.get("sources")
    if sources is not None:
        if not isinstance(sources, list) or not sources:
            raise MergeInputError(f"{where}: `sources` must be a non-empty list.")
        recipe["sources"] = [source_spec(s, where) for s in sources]
    options = recipe.get("options") or {}
    if not isinstance(options, dict):
        raise MergeInputError(f"{where}: `options` must be a mapping such as {{cp_init: svd}}.")
    recipe["options"] = options
    return recipe


def source_spec(s: Any, where: str = "recipe") -> str:
    if isinstance(s, str):
        return s
    if isinstance(s, dict) and isinstance(s.get("source"), str) and set(s) <= {"source", "revision"}:
        return s["source"] + (f"@{s['revision']}" if s.get("revision") else "")
    raise MergeInputError(f"{where}: a source must be a string or {{source: ..., revision: ...}}, got {s!r}.")
