"""Procedurally generated instruction tasks with exact answers, for the demo, tests and benchmarks.

Each task draws ``(prompt, completion)`` pairs from a seeded ``random.Random``. A prompt's split is fixed by a
stable hash of its text (80% train, 10% validation, 10% test), so no prompt can appear in two splits. Some
tasks share an input format (lists of numbers: ``add``/``sort``; single words: ``reverse``/``count``), others do
not, so clustering by text has structure to find and merging has interference to resolve.
"""

from __future__ import annotations

import datetime as _dt
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

WORDS = (
    "apple river stone cloud tiger pencil garden window silver candle rocket planet forest bridge mirror "
    "yellow castle dragon button puzzle orange summer winter market engine spider violin anchor basket "
    "butter carpet doctor frozen ginger harbor island jacket kitten lemon magnet napkin oyster pepper "
    "rabbit saddle tunnel velvet walnut zipper"
).split()
UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60)]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Noa"]
CITIES = ["Oslo", "Lima", "Rome", "Pune", "Kyiv", "Baku", "Doha", "Riga", "Suva", "Bern", "Cork", "Nice"]


@dataclass(frozen=True)
class Example:
    """One instruction example: the model sees ``prompt`` and must produce ``completion`` exactly."""

    prompt: str
    completion: str
    task: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(10, 999), r.randint(10, 999)
    return f"Numbers: {a} {b}\nTask: add them.\nAnswer:", f" {a + b}"


def _sort(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 99), 4)
    return f"Numbers: {' '.join(map(str, xs))}\nTask: sort ascending.\nAnswer:", " " + " ".join(map(str, sorted(xs)))


def _reverse(r: random.Random) -> tuple[str, str]:
    ws = r.sample(WORDS, 3)
    return f"Words: {' '.join(ws)}\nTask: reverse their order.\nAnswer:", " " + " ".join(ws[::-1])


def _count(r: random.Random) -> tuple[str, str]:
    ws = r.sample(WORDS, 2)
    c = r.choice(sorted(set("".join(ws))))
    return f"Words: {' '.join(ws)}\nTask: how many times does '{c}' occur?\nAnswer:", f" {''.join(ws).count(c)}"


def _units(r: random.Random) -> tuple[str, str]:
    big, small, factor = r.choice(UNITS)
    n = r.randint(2, 400)
    return f"Convert {n} {big} to {small}.", f" {n * factor}"


def _record(r: random.Random) -> tuple[str, str]:
    name, city, age = r.choice(NAMES), r.choice(CITIES), r.randint(18, 90)
    field, value = r.choice([("city", city), ("age", str(age)), ("name", name)])
    return f"Record: name={name}; age={age}; city={city}\nWhat is the {field}?", f" {value}"


def _weekday(r: random.Random) -> tuple[str, str]:
    d, k = r.randrange(7), r.randint(1, 100)
    return f"Today is {DAYS[d]}. What day is it in {k} days?", f" {DAYS[(d + k) % 7]}"


def _python(r: random.Random) -> tuple[str, str]:
    a, b, c = r.randint(1, 9), r.randint(1, 9), r.randint(1, 9)
    op1, op2 = r.choice("+-*"), r.choice("+-*")
    expr = f"{a} {op1} {b} {op2} {c}"
    return f">>> print({expr})", f" {eval(expr)}"  # noqa: S307  (digits and + - * only, built above)


def _date(r: random.Random) -> tuple[str, str]:
    day = _dt.date(2020, 1, 1) + _dt.timedelta(days=r.randrange(3653))
    return f"Date: {day.isoformat()}\nTask: give the month name.\nAnswer:", f" {day.strftime('%B')}"


def _sort_desc(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 99), 4)
    return (f"Numbers: {' '.join(map(str, xs))}\nTask: sort descending.\nAnswer:",
            " " + " ".join(map(str, sorted(xs, reverse=True))))


def _record_swap(r: random.Random) -> tuple[str, str]:
    name, city, age = r.choice(NAMES), r.choice(CITIES), r.randint(18, 90)
    field, value = r.choice([("city", city), ("age", str(age)), ("name", name)])
    return f"Record: city={city}; name={name}; age={age}\nWhat is the {field}?", f" {value}"


def _max(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 99), 4)
    return f"Numbers: {' '.join(map(str, xs))}\nTask: give the largest.\nAnswer:", f" {max(xs)}"


def _min(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 99), 4)
    return f"Numbers: {' '.join(map(str, xs))}\nTask: give the smallest.\nAnswer:", f" {min(xs)}"


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "sort": _sort,
    "reverse": _reverse,
    "count": _count,
    "units": _units,
    "record": _record,
    "weekday": _weekday,
    "python": _python,
    "month": _date,
    "max": _max,
    "sort_desc": _sort_desc,
    "record_swap": _record_swap,
    "min": _min,
}
"""Task name -> generator of ``(prompt, completion)`` from a ``random.Random``."""

HELD_OUT: dict[str, tuple[str, ...]] = {
    "sort_desc": ("sort", "reverse"),
    "record_swap": ("record",),
    "min": ("max", "sort"),
}
"""Tasks meant to be evaluated zero-shot (no adapter trained on them), and the trained tasks whose skills or formats
they reuse: ``sort_desc`` sorts as ``sort`` and reverses as ``reverse``; ``record_swap`` is ``record`` with the fields
in another order; ``min`` asks the opposite of ``max`` (the first number ``sort`` writes)."""

SPLITS = ("train", "validation", "test")


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: a stable hash, 80/10/10."""
    bucket = zlib.crc32(prompt.encode()) % 10
    return "train" if bucket < 8 else SPLITS[bucket - 7]


def make_examples(task: str, n: int, *, split: str = "train", seed: int = 0) -> list[Example]:
    """``n`` distinct examples of ``task`` from ``split``; deterministic in ``(task, split, seed)``."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}. Available tasks: {', '.join(TASKS)}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {list(SPLITS)}.")
    gen = TASKS[task]
    rng = random.Random(f"{task}/{split}/{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    for _ in range(200 * n + 2000):
        prompt, completion = gen(rng)
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        out.append(Example(prompt, completion, task))
        if len(out) == n:
            return out
    raise ValueError(f"Task {task!r} cannot produce {n} distinct {split} examples; ask for fewer.")


def make_splits(
    tasks: Sequence[str], *, n_train: int, n_val: int, n_test: int, seed: int = 0
) -> dict[str, dict[str, list[Example]]]:
    """``{task: {"train": [...], "validation": [...], "test": [...]}}`` for every task."""
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    return {t: {s: make_examples(t, n, split=s, seed=seed) for s, n in sizes.items()} for t in tasks}
