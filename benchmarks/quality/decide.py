"""The decision rule across regimes, from the JSON records the benchmark wrote (nothing is re-run):

    python -m benchmarks.quality.decide benchmarks/results/quality.json benchmarks/results/quality_sources.json

For every record, each tensor merge at output rank R = r against the best matrix merge at the same R (recomputed
from the stored per-prompt hits when the record predates the per-rank comparison), then the rule of
``run.DECISION_RULE``: a tensor merge wins if it beats the best matrix merge at R = r by >= 2 points with the paired
95% interval excluding 0 in at least one regime and is significantly worse in none. Prints a markdown table.
Tensor merges missing from a regime's record are shown as not measured there (the rule then covers only the
regimes that measured them, which the table says). A second record of a regime gets its own column, named after
its file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.quality.stats import by_rank, verdicts


def at_rank(data: dict, rank: int | None = None, n_resamples: int = 2000) -> dict[str, dict]:
    """``{regime name: compare(...) at R = rank}`` for one record (its single-skill rows as a second regime)."""
    r = str(rank or data["adapter_config"]["rank"])
    regime = data.get("regime", "tasks")
    comp = data.get("comparison", {})
    if regime == "library":  # one comparison per library, {k: {R: {"in_domain": ...}}}, rows named as elsewhere
        out = {}
        for k, per_r in comp.items():
            c, p = per_r.get(r, {}).get("in_domain", {}), f"k={k}: "
            out[f"library (k={k})"] = {**c, "reference": c.get("reference", "").removeprefix(p),
                                       "rows": {lab.removeprefix(p): v for lab, v in c.get("rows", {}).items()}}
        return out
    tasks, heldout = data["tasks"], list(data.get("heldout_tasks", {}))
    if "by_rank" not in comp:
        comp = {"by_rank": by_rank(data["hits"], data["summary"], data["methods"], tasks, heldout, n_resamples)}
    out = {regime: comp["by_rank"].get(r, {}).get("in_domain", {})}
    if comp.get("per_skill_by_rank"):
        out[f"{regime} (single skill)"] = comp["per_skill_by_rank"].get(r, {}).get("in_domain", {})
    return out


def table(records: dict[str, dict]) -> list[str]:
    v = verdicts(records)
    regimes = list(records)
    lines = ["| tensor merge (R = r) | " + " | ".join(f"{reg}: vs {records[reg].get('reference', '?')}"
                                                    for reg in regimes) + " | meets the rule |",
             "|---|" + "---:|" * len(regimes) + "---|"]
    by_method: dict[str, dict] = {}
    for label, x in v.items():
        by_method.setdefault(label.removeprefix("per-skill: "), {}).update(x["regimes"])
    for method, cells in sorted(by_method.items(), key=lambda kv: -max(c["diff"] for c in kv[1].values())):
        row = []
        for reg in regimes:
            c = cells.get(reg)
            if c is None:
                row.append("not measured")
                continue
            b = "**" if c["low"] > 0 or c["high"] < 0 else ""
            row.append(f"{b}{100 * c['diff']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]{b}")
        win = any(c["win"] for c in cells.values())
        worse = any(c["worse"] for c in cells.values())
        measured = sum(1 for reg in regimes if reg in cells)
        verdict = ("yes" if win and not worse else "no: significantly worse in a regime" if worse
                   else "no: no regime with >= +2 points and the interval above 0")
        row.append(verdict + ("" if measured == len(regimes) else f" ({measured} of {len(regimes)} regimes)"))
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="+", type=Path, help="quality*.json files written by the benchmark")
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    records: dict[str, dict] = {}
    for path in args.records:
        for name, comp in at_rank(json.loads(path.read_text()), n_resamples=args.bootstrap).items():
            records[f"{name} [{path.stem}]" if name in records else name] = comp  # a regime's second record
    print("Differences in points to the best matrix merge at R = r (paired 95% interval over test prompts; bold "
          "when it excludes 0).\n")
    print("\n".join(table(records)))


if __name__ == "__main__":
    main()
