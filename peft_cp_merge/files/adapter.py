"""A merged LoRA adapter in memory (:class:`MergedAdapter`): PEFT-format tensors, config and recipe; written
atomically as a plain PEFT folder with a model card (``huggingface_hub.ModelCard``) that holds the recipe, or pushed
to the Hub in one commit."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from .._io import MARKER_KEY, atomic_folder
from ..errors import MergeInputError
from .recipe import RECIPE_START, dump_recipe
from .sources import CONFIG_FILE, WEIGHTS_FILE


@dataclass
class MergedAdapter:
    """A merged LoRA adapter in memory: PEFT-format tensors, its ``LoraConfig`` and the recipe that made it."""

    tensors: dict[str, torch.Tensor]
    config: LoraConfig
    recipe: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)
    # what the merge read (local folders, Hub snapshot folders) and the libraries they belong to: never written to
    source_paths: list[Path] = field(default_factory=list, repr=False)
    libraries: list[Path] = field(default_factory=list, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def config_json(self) -> str:
        """``adapter_config.json`` as PEFT writes it (sorted keys), with set-valued fields (``target_modules``)
        written as sorted lists, so the same merge always gives the same bytes."""
        d = self.config.to_dict()
        for k, v in d.items():
            if isinstance(v, (set, frozenset)):
                d[k] = sorted(v)
        return json.dumps(d, indent=2, sort_keys=True)

    def _write(self, folder: Path) -> None:
        from safetensors.torch import save_file

        (folder / CONFIG_FILE).write_text(self.config_json())
        save_file({k: v.contiguous().cpu() for k, v in self.tensors.items()}, str(folder / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        (folder / "README.md").write_text(render_card(self))

    def save_pretrained(self, save_directory: str | Path, *, overwrite: bool = False, wait: bool = False) -> Path:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md`` (the model card with
        the recipe) into a new folder, atomically; an existing folder is refused unless ``overwrite``, which
        replaces only a merged adapter this package wrote. A folder that is, contains or is inside a source or a
        library of the merge is refused; another writer of the same folder is refused unless ``wait``
        (:func:`peft_cp_merge._io.atomic_folder`)."""
        try:
            return atomic_folder(save_directory, self._write, overwrite=overwrite, kind="merged-adapter", wait=wait,
                                 sources=self.source_paths, libraries=self.libraries, needed=self.nbytes)
        except FileExistsError as e:
            raise MergeInputError(str(e)) from None

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, token: str | bool | None = None) -> str:
        """Upload the adapter folder to ``repo_id`` (created if missing) in one commit; returns the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "adapter"
            folder.mkdir()
            self._write(folder)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(folder), revision=revision,
                commit_message=commit_message or f"Merge {len(self.recipe['sources'])} LoRA adapters with "
                                                 f"{self.recipe['method']} (peft-cp-merge)",
            )
        return str(getattr(info, "commit_url", info))


def render_card(merged: MergedAdapter) -> str:
    """The README.md (YAML metadata + markdown) written next to a merged adapter."""
    from ..methods import get_merge_method

    r = merged.recipe
    method = get_merge_method(r["method"])
    base = _md(r["base_model"]) if r["base_model"] else "&lt;base model&gt;"
    rows = "\n".join(
        f"| {i} | {_md(s['source'])} | {_md(s.get('revision') or 'local')} | {w:g} |"
        for i, (s, w) in enumerate(zip(r["sources"], r["weights"]))
    )
    recipe = dump_recipe(r)
    stats = merged.stats
    body = f"""
# Merged LoRA adapter ({r['method']})

A LoRA adapter for {base} made by merging {len(r['sources'])} LoRA adapters with
**{method.pretty_name}** ({method.reference}) at rank {r['rank']}, using
[peft-cp-merge](https://pypi.org/project/peft-cp-merge/).

| # | source adapter | revision | weight |
|---|---|---|---|
{rows}

Merged {stats.get('modules', '?')} modules with {', '.join(f'{k} {v}' for k, v in stats.get('versions', {}).items())}.

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({_py(r["base_model"] or "<base model>")}),
                                  "<this repo or folder>")
```

## Recipe

Re-run this merge with `peft-cp-merge merge --recipe README.md --out merged` (this card is a valid recipe; where
to write and whether to push are only ever taken from the command line).

{RECIPE_START}
```yaml
{recipe}```
"""
    return model_card(body, base_model=r["base_model"], relation="merge", tags=["lora", "peft-cp-merge", r["method"]],
                      **{MARKER_KEY: "merged-adapter"})  # the marker that lets --overwrite replace this folder


def _md(name: str) -> str:
    """``name`` as literal Markdown text (also inside a table cell): every character that can open a code span,
    emphasis, link, HTML, an HTML comment or a table cell backslash-escaped, line breaks and other unprintable
    characters written as ``\\n``/``\\uXXXX``, so any folder or Hub name shows as itself."""
    text = "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in str(name))
    return "".join("\\" + c if c in _PUNCTUATION else c for c in text)


def _py(name: str) -> str:
    """``name`` as a Python string literal on one line, with ``<``, ``>`` and backticks escaped (no HTML or fence
    can appear in the card's code block)."""
    return json.dumps(str(name)).replace("<", "\\u003c").replace(">", "\\u003e").replace("`", "\\u0060")


_PUNCTUATION = frozenset("\\`*_[]<>!|~&$")  # what can open Markdown/HTML inside a line (line breaks are escaped)
# base_model goes into the card's metadata only when it looks like a Hub id or a plain path
_METADATA_NAME = re.compile(r"[A-Za-z0-9_.\-/]+")


def model_card(body: str, *, base_model: str | None, relation: str, tags: list[str], **fields: str) -> str:
    """A Hub model card (``huggingface_hub.ModelCard``): metadata ``library_name: peft``, ``tags`` and, when known,
    ``base_model`` with ``base_model_relation`` (``merge``, ``adapter``), then the markdown ``body``. Used for
    merged adapters and adapter libraries alike."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="peft", tags=tags, **fields)
    if base_model and _METADATA_NAME.fullmatch(base_model):
        data.base_model, data.base_model_relation = base_model, relation
    # the body is a template *value*, never template text: a name in it such as ``{{ ... }}`` is not Jinja to run
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n{{ body }}", body=body))


