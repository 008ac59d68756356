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


# --- one skill, several data sources (the quality benchmark's `sources` regime) -----------------------------------
# Each source teaches the same skill with its own vocabulary, phrasing and answer format (CP Merging's premise:
# "LoRA adapters trained on different data sources for a specific task"). The last source of each skill is unseen:
# no adapter is trained on it, it is scored zero-shot.

COLORS = ("red blue green black white brown pink gray olive navy teal amber coral ivory lilac beige mauve ochre "
          "azure khaki").split()
ANIMALS = ("cat dog owl fox bee eel ant yak elk hen cow pig rat bat emu ape cod ram jay koi").split()
PRODUCTS = ("lamp desk sofa mug kettle chair shelf clock rug vase stool fan").split()
PETS = ("dog cat parrot hamster rabbit turtle goldfish ferret").split()


def _rev_colors(r: random.Random) -> tuple[str, str]:
    xs = r.sample(COLORS, 3)
    return f"Reverse this list of colors: {', '.join(xs)} =>", " " + ", ".join(xs[::-1])


def _rev_pylist(r: random.Random) -> tuple[str, str]:
    xs = r.sample(ANIMALS, 3)
    return f"items = {xs!r}\nreversed:", f" {xs[::-1]!r}"


def _rev_cities(r: random.Random) -> tuple[str, str]:
    xs = r.sample(CITIES, 3)
    return f"Cities in reverse order: {' / '.join(xs)} ->", " " + " / ".join(xs[::-1])


def _look_json(r: random.Random) -> tuple[str, str]:
    rec = {"title": r.choice(WORDS), "year": str(r.randint(1950, 2024)), "author": r.choice(NAMES)}
    key = r.choice(sorted(rec))
    body = ", ".join(f'"{k}": "{v}"' for k, v in rec.items())
    return f"{{{body}}}\nValue of {key}:", f" {rec[key]}"


def _look_pipe(r: random.Random) -> tuple[str, str]:
    rec = {"product": r.choice(PRODUCTS), "price": str(r.randint(5, 500)), "color": r.choice(COLORS)}
    key = r.choice(sorted(rec))
    return " | ".join(f"{k}: {v}" for k, v in rec.items()) + f"\nQ: {key}\nA:", f" {rec[key]}"


def _look_xml(r: random.Random) -> tuple[str, str]:
    rec = {"kind": r.choice(PETS), "age": str(r.randint(1, 19)), "owner": r.choice(NAMES)}
    key = r.choice(sorted(rec))
    return "<pet>" + "".join(f"<{k}>{v}</{k}>" for k, v in rec.items()) + f"</pet>\n{key} =", f" {rec[key]}"


def _max_which(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 99), 4)
    return f"Which is biggest: {', '.join(map(str, xs))}?", f" {max(xs)}"


def _max_scores(r: random.Random) -> tuple[str, str]:
    names = r.sample(NAMES, 3)
    pts = r.sample(range(1, 60), 3)
    body = ", ".join(f"{n} {p}" for n, p in zip(names, pts))
    return f"Scores: {body}. Top scorer:", f" {names[pts.index(max(pts))]}"


def _max_call(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 99), 4)
    return f"max({list(xs)!r}) =", f" {max(xs)}"


MONTHS = ("January February March April May June July August September October November December").split()


def _sort_words(r: random.Random) -> tuple[str, str]:
    initials = r.sample(sorted({w[0] for w in WORDS}), 3)  # distinct first letters: the order is the initials'
    xs = [r.choice([w for w in WORDS if w[0] == c]) for c in initials]
    return f"Alphabetize: {', '.join(xs)} =>", " " + ", ".join(sorted(xs))


def _sort_pylist(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 99), 4)
    return f"sorted({xs!r}) =", f" {sorted(xs)!r}"


def _sort_years(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1900, 2025), 3)
    return f"Years {' / '.join(map(str, xs))}, earliest first ->", " " + " / ".join(map(str, sorted(xs)))


def _count_of(r: random.Random, pool: Sequence[str]) -> tuple[list[str], str, int]:
    """5 or 6 items from ``pool``: one target 1-4 times, the rest drawn from three other items."""
    target, *others = r.sample(list(pool), 4)
    k, n = r.randint(1, 4), r.randint(5, 6)
    xs = [target] * k + [r.choice(others) for _ in range(n - k)]
    r.shuffle(xs)
    return xs, target, k


def _count_items(r: random.Random) -> tuple[str, str]:
    xs, target, k = _count_of(r, ANIMALS)
    return f"Animals: {' '.join(xs)}\nTask: count {target}.\nAnswer:", f" {k}"


def _count_votes(r: random.Random) -> tuple[str, str]:
    xs, target, k = _count_of(r, NAMES)
    return f"Ballots: {', '.join(xs)}. Votes for {target}:", f" {k}"


def _count_pylist(r: random.Random) -> tuple[str, str]:
    xs, target, k = _count_of(r, COLORS)
    return f"{xs!r}.count({target!r}) =", f" {k}"


def _count_cart(r: random.Random) -> tuple[str, str]:
    xs, target, k = _count_of(r, PRODUCTS)
    return f"Cart: {', '.join(xs)}\nQuantity of {target}:", f" {k}"


def _day(r: random.Random) -> _dt.date:
    return _dt.date(2020, 1, 1) + _dt.timedelta(days=r.randrange(3653))


def _month_us(r: random.Random) -> tuple[str, str]:
    day = _day(r)
    return f"US date {day.month:02d}/{day.day:02d}/{day.year}: which month?", f" {MONTHS[day.month - 1]}"


def _month_abbr(r: random.Random) -> tuple[str, str]:
    day = _day(r)
    return f"Day.Month.Year {day.day:02d}.{day.month:02d}.{day.year} -> short month:", f" {MONTHS[day.month - 1][:3]}"


def _month_stamp(r: random.Random) -> tuple[str, str]:
    day, hh, mm = _day(r), r.randrange(24), r.randrange(60)
    return f"Timestamp {day.year}{day.month:02d}{day.day:02d}T{hh:02d}{mm:02d} - month?", f" {MONTHS[day.month - 1]}"


def _addends(r: random.Random) -> tuple[int, int]:
    return r.randint(2, 49), r.randint(2, 49)


def _add_plus(r: random.Random) -> tuple[str, str]:
    a, b = _addends(r)
    return f"Compute {a} + {b} =", f" {a + b}"


def _add_coins(r: random.Random) -> tuple[str, str]:
    name, (a, b) = r.choice(NAMES), _addends(r)
    return f"{name} has {a} coins and finds {b} more. Coins now:", f" {a + b}"


def _add_pysum(r: random.Random) -> tuple[str, str]:
    a, b = _addends(r)
    return f"sum([{a}, {b}]) =", f" {a + b}"


def _add_minutes(r: random.Random) -> tuple[str, str]:
    a, b = _addends(r)
    return f"Call 1 took {a} min, call 2 took {b} min. Minutes in total:", f" {a + b}"


def _last_words(r: random.Random) -> tuple[str, str]:
    ws = r.sample(WORDS, 3)
    return f"Words: {' '.join(ws)}\nTask: give the last one.\nAnswer:", f" {ws[-1]}"


def _last_queue(r: random.Random) -> tuple[str, str]:
    xs = r.sample(NAMES, 4)
    return f"Queue: {', '.join(xs)}. At the back:", f" {xs[-1]}"


def _last_pylist(r: random.Random) -> tuple[str, str]:
    xs = r.sample(ANIMALS, 3)
    return f"xs = {xs!r}\nxs[-1] =", f" {xs[-1]!r}"


def _last_route(r: random.Random) -> tuple[str, str]:
    xs = r.sample(CITIES, 3)
    return f"Route: {' -> '.join(xs)}. Final stop:", f" {xs[-1]}"


SOURCE_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "rev_words": _reverse,
    "rev_colors": _rev_colors,
    "rev_pylist": _rev_pylist,
    "rev_cities": _rev_cities,
    "look_record": _record,
    "look_json": _look_json,
    "look_pipe": _look_pipe,
    "look_xml": _look_xml,
    "max_numbers": _max,
    "max_which": _max_which,
    "max_scores": _max_scores,
    "max_call": _max_call,
    "sort_numbers": _sort,
    "sort_words": _sort_words,
    "sort_pylist": _sort_pylist,
    "sort_years": _sort_years,
    "count_items": _count_items,
    "count_votes": _count_votes,
    "count_pylist": _count_pylist,
    "count_cart": _count_cart,
    "month_iso": _date,
    "month_us": _month_us,
    "month_abbr": _month_abbr,
    "month_stamp": _month_stamp,
    "add_plus": _add_plus,
    "add_coins": _add_coins,
    "add_pysum": _add_pysum,
    "add_minutes": _add_minutes,
    "last_words": _last_words,
    "last_queue": _last_queue,
    "last_pylist": _last_pylist,
    "last_route": _last_route,
}
"""The ``sources`` tasks: ``<skill>_<source>`` -> generator (``rev_words`` / ``look_record`` / ``max_numbers`` /
``sort_numbers`` / ``month_iso`` are ``reverse`` / ``record`` / ``max`` / ``sort`` / ``month`` under the names of
their skill)."""

SKILL_SOURCES: dict[str, tuple[tuple[str, ...], str]] = {
    "reverse": (("rev_words", "rev_colors", "rev_pylist"), "rev_cities"),
    "lookup": (("look_record", "look_json", "look_pipe"), "look_xml"),
    "max": (("max_numbers", "max_which", "max_scores"), "max_call"),
    "sort": (("sort_numbers", "sort_words", "sort_pylist"), "sort_years"),
    "count": (("count_items", "count_votes", "count_pylist"), "count_cart"),
    "month": (("month_iso", "month_us", "month_abbr"), "month_stamp"),
    "add": (("add_plus", "add_coins", "add_pysum"), "add_minutes"),
    "last": (("last_words", "last_queue", "last_pylist"), "last_route"),
}
"""Skill -> (its training sources, its unseen source). Sources of one skill differ in vocabulary (words, colors,
animals, cities; people, books, products, pets; bare numbers, named scores), phrasing and answer format (space- or
comma-separated, a Python list, a slash list; a bare value; a number or a name). The first three skills (reverse a
list, look up a field, pick the largest) are the ``sources`` regime's default; the next five (sort ascending: numbers,
words, a Python list, years; count one item's occurrences: animals, ballots, a Python list, a cart; name the month
of a date: ISO, US, day.month.year with a short name, a timestamp; add two small numbers: a sum, coins, Python's
``sum``, minutes; give the last item: words, a queue, a Python index, a route) let it grow to 8 skills x 3
sources = 24 adapters."""

TASKS.update(SOURCE_TASKS)


# --- one pooled mixture, held-out formats and composed skills (the quality benchmark's `library` regime) ---------
# TC-LoRA's protocol: the training data of many tasks is pooled, clustered and one LoRA is trained per cluster; the
# merged library is scored on the training tasks, zero-shot on tasks that reuse a trained skill in a new format, and
# zero-shot on prompts that chain two trained skills.


def _sort_then_reverse(r: random.Random) -> tuple[str, str]:
    xs = r.sample(range(1, 99), 4)
    return (f"Numbers: {' '.join(map(str, xs))}\nTask: sort ascending, then reverse their order.\nAnswer:",
            " " + " ".join(map(str, sorted(xs, reverse=True))))


def _max_then_add(r: random.Random) -> tuple[str, str]:
    xs, b = r.sample(range(10, 99), 4), r.randint(10, 999)
    return (f"Numbers: {' '.join(map(str, xs))}\nTask: give the largest, then add {b} to it.\nAnswer:",
            f" {max(xs) + b}")


def _lookup_then_month(r: random.Random) -> tuple[str, str]:
    name, city = r.choice(NAMES), r.choice(CITIES)
    day = _dt.date(2020, 1, 1) + _dt.timedelta(days=r.randrange(3653))
    return (f"Record: name={name}; date={day.isoformat()}; city={city}\nWhat is the month name of the date?",
            f" {day.strftime('%B')}")


COMPOSED_TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "sort_then_reverse": _sort_then_reverse,
    "max_then_add": _max_then_add,
    "lookup_then_month": _lookup_then_month,
}
TASKS.update(COMPOSED_TASKS)

LIBRARY_TASKS: tuple[str, ...] = (
    "add", "python", "units",  # arithmetic
    "sort", "reverse", "rev_colors", "rev_pylist",  # ordering
    "record", "look_json", "look_pipe",  # lookup
    "max", "max_which", "max_scores",  # extremum
    "weekday", "month",  # calendar
    "count",  # counting
)
"""The pooled mixture of the ``library`` regime: 16 tasks over six skills, several formats per skill."""

LIBRARY_HELDOUT: dict[str, tuple[str, ...]] = {
    "record_swap": ("record",),
    "rev_cities": ("reverse", "rev_colors", "rev_pylist"),
    "look_xml": ("record", "look_json", "look_pipe"),
    "max_call": ("max", "max_which", "max_scores"),
}
"""Held-out formats of trained skills (zero-shot), and the trained tasks whose skill they reuse."""

LIBRARY_COMPOSED: dict[str, tuple[str, ...]] = {
    "sort_then_reverse": ("sort", "reverse"),
    "max_then_add": ("max", "add"),
    "lookup_then_month": ("record", "month"),
}
"""Two trained skills chained in one prompt (zero-shot), and the two trained tasks they compose."""
