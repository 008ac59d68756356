"""Training data for the library trainer: read, normalise to prompt/completion, tokenize, batch.

Three example formats are accepted, checked in this order per dataset:

* ``prompt`` + ``completion`` columns: the loss is on the completion (and the end token) only;
* ``messages`` (chat ``[{"role", "content"}, ...]``): rendered with the tokenizer's chat template; the loss is on the
  last assistant message (everything the template adds after the generation prompt);
* ``text``: plain language modelling, the loss is on every token.

Column names are configurable (:class:`~peft_cp_merge.library.config.LibraryTrainConfig`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LibraryDataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Record:
    """One normalised example: the model is trained to produce ``completion`` after ``prompt``.

    ``embed_text`` is what the sentence embedder sees for clustering (and what routing sees for new inputs).
    ``loss_on_prompt`` is true for plain-text examples (``prompt`` is empty then).
    """

    prompt: str
    completion: str
    embed_text: str
    loss_on_prompt: bool = False
    template: bool = False  # chat-template output: the end-of-turn tokens are already in the text


def read_rows(source: Any, *, split: str = "train", config_name: str | None = None) -> list[dict[str, Any]]:
    """Rows of ``source``: a ``datasets.Dataset``, a list of dicts, a local .jsonl/.json/.csv/.parquet file, or a
    Hub dataset id (through ``datasets.load_dataset``)."""
    if source is None:
        raise LibraryDataError("No training data given. Set `dataset` (a .jsonl/.json/.csv/.parquet file or a Hub "
                               "dataset id), or pass a datasets.Dataset to train_library(dataset=...).")
    if isinstance(source, Sequence) and not isinstance(source, str):
        return [dict(r) for r in source]
    try:
        import datasets

        if isinstance(source, datasets.DatasetDict):
            if split not in source:
                raise LibraryDataError(f"The DatasetDict has no split {split!r}; it has {list(source)}. "
                                       "Set `dataset_split`.")
            source = source[split]
        if isinstance(source, datasets.Dataset):
            return source.to_list()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    path = Path(str(source))
    if path.is_file():
        try:
            return _read_file(path, split)
        except UnicodeDecodeError as e:
            raise LibraryDataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}). Re-save it as UTF-8."
                                   ) from None
        except (json.JSONDecodeError, csv.Error) as e:
            raise LibraryDataError(f"{path} is not valid {path.suffix[1:].upper()}: {e}. Fix or remove that line."
                                   ) from None
    if path.exists() or str(source).startswith((".", "/")):
        raise LibraryDataError(f"{source}: not a data file. Point `dataset` at a .jsonl/.json/.csv/.parquet file.")
    import datasets

    try:
        ds = datasets.load_dataset(str(source), config_name, split=split)
    except Exception as e:  # the datasets error, explained
        raise LibraryDataError(
            f"Could not load the Hub dataset {source!r} (config {config_name!r}, split {split!r}): {e}. Check the id "
            "and split, log in for private datasets, or pass a local file when offline."
        ) from e
    return ds.to_list()


def _read_file(path: Path, split: str) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise json.JSONDecodeError(f"line {n}: {e.msg}", e.doc, e.pos) from None
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data.get("data", data.get(split)) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise LibraryDataError(f"{path}: a .json file must hold a list of examples (or {{'data': [...]}}).")
        return rows
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise LibraryDataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet.")


def _text(value: Any, where: str, *, blank: bool = False) -> str:
    """``value`` as text; None/NaN (and blank text unless ``blank``) is refused: nothing to learn from."""
    if value is None or (isinstance(value, float) and value != value) or not (blank or str(value).strip()):
        raise LibraryDataError(f"{where} is empty. Remove or fill such examples.")
    return str(value)


def normalize(
    rows: Iterable[Mapping[str, Any]],
    *,
    tokenizer=None,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    text_field: str = "text",
    messages_field: str = "messages",
    embed_on: str = "prompt",
) -> list[Record]:
    """Rows -> :class:`Record` s. The format is decided from the first row's columns and required of every row."""
    rows = list(rows)
    if not rows:
        raise LibraryDataError("The dataset is empty (0 examples). Check the file, split or max_examples.")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise LibraryDataError(f"Example {i} is a {type(row).__name__}, not an object of named fields "
                                   "(e.g. {\"prompt\": ..., \"completion\": ...}).")
    cols = set(rows[0])
    if prompt_field in cols and completion_field in cols:
        kind = "prompt"
    elif messages_field in cols:
        kind = "messages"
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise LibraryDataError(
                f"The data has chat `{messages_field}` but the tokenizer has no chat template. Use an instruct model "
                "whose tokenizer has one, or convert the data to prompt/completion columns."
            )
    elif text_field in cols:
        kind = "text"
    else:
        raise LibraryDataError(
            f"The examples have columns {sorted(cols)}, none of the expected formats: "
            f"`{prompt_field}`+`{completion_field}`, `{messages_field}` or `{text_field}`. Rename the columns, or set "
            "prompt_field/completion_field, messages_field or text_field in the config."
        )
    out = []
    for i, row in enumerate(rows):
        missing = [f for f in {"prompt": (prompt_field, completion_field), "messages": (messages_field,),
                               "text": (text_field,)}[kind] if f not in row]
        if missing:
            raise LibraryDataError(f"Example {i} lacks field(s) {missing} (the first example has them). "
                                   "Every example needs the same fields.")
        if kind == "prompt":
            p = _text(row[prompt_field], f"Example {i} `{prompt_field}`", blank=True)
            c = _text(row[completion_field], f"Example {i} `{completion_field}`")
            out.append(Record(p, c, p if embed_on == "prompt" else p + c))
        elif kind == "text":
            t = _text(row[text_field], f"Example {i} `{text_field}`")
            out.append(Record("", t, t, loss_on_prompt=True))
        else:
            msgs = row[messages_field]
            if not msgs or not isinstance(msgs, list) or msgs[-1].get("role") != "assistant":
                raise LibraryDataError(f"Example {i}: `{messages_field}` must be a non-empty list of "
                                       "{role, content} ending with an assistant message.")
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs, tokenize=False)
            if not full.startswith(prompt):
                raise LibraryDataError(f"Example {i}: the chat template does not render the conversation as its "
                                       "prompt followed by the answer; convert the data to prompt/completion.")
            user = "\n".join(str(m.get("content", "")) for m in msgs[:-1] if m.get("role") != "system")
            embed = user if embed_on == "prompt" else user + "\n" + str(msgs[-1].get("content", ""))
            out.append(Record(prompt, full[len(prompt):], embed, template=True))
    return out


def fingerprint(records: Sequence[Record]) -> str:
    """Hash of the normalised examples (a resumed run must see the same data)."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.prompt, r.completion, r.embed_text, r.loss_on_prompt]).encode())
    return h.hexdigest()[:16]


def tokenize(tokenizer, record: Record, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` with ``labels = -100`` where no loss is taken. The prompt is cut from the left when
    too long (the answer matters most), then the completion from the right."""
    eos = [] if record.template or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if record.loss_on_prompt:
        ids = (tokenizer(record.completion, add_special_tokens=True)["input_ids"] + eos)[:max_length]
        return ids, list(ids)
    p = tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
    c = (tokenizer(record.completion, add_special_tokens=False)["input_ids"] + eos)[:max_length]
    p = p[max(0, len(p) + len(c) - max_length):]
    return p + c, [IGNORE_INDEX] * len(p) + c


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``."""
    length = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
        "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
    }
    for i, (ids, labels) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, : len(ids)] = 1
        batch["labels"][i, : len(ids)] = torch.tensor(labels)
    return batch


def num_loss_tokens(labels: Sequence[int]) -> int:
    """Tokens that contribute to the loss (after the one-position shift of causal LM training)."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)
