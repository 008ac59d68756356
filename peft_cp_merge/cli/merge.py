"""``peft-cp-merge merge`` (adapter files or Hub ids -> one adapter) and ``peft-cp-merge methods``."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import PeftCpMergeError
from ..files.recipe import DTYPE_NAMES, RECIPE_FIELDS, check_recipe, load_recipe
from . import key_value


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge LoRA adapters (folders or Hub ids) into one LoRA adapter, without the base model",
        description="Merge LoRA adapters from local folders or Hub repos into one PEFT LoRA adapter.\n\n"
        "A recipe (--recipe) is a YAML mapping of these fields; every flag overrides the same field:\n"
        + "".join(f"  {k}: {v}\n" for k, v in RECIPE_FIELDS.items())
        + "--out, --overwrite and --push-to-hub are only taken from the command line: a recipe or model card that\n"
        "names them is refused.\n\n"
        "examples:\n"
        "  peft-cp-merge merge user/math-lora user/code-lora --rank 16 --out merged\n"
        "  peft-cp-merge merge a b --method cp --option cp_variant=sign_elect --weights 0.6 0.4 --out merged\n"
        "  peft-cp-merge merge --recipe merged/README.md --out merged-again",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="*", metavar="SRC",
                   help="adapter folder, or Hub id user/repo[/subfolder][@revision]")
    p.add_argument("--recipe", metavar="PATH",
                   help="YAML recipe, or the README.md model card of an adapter merged by this tool")
    p.add_argument("--method", metavar="NAME",
                   help="merge method (default: cp); `peft-cp-merge methods` lists them with their options")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per source (default: 1/T each)")
    p.add_argument("--rank", type=int, metavar="N", help="rank of the merged adapter (default: the largest source "
                   "rank; at most the sum of the source ranks and the layers' min(out, in))")
    p.add_argument("--option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --option cp_variant=sign_elect --option cp_n_iter_max=200 "
                   "(repeatable; values parsed as YAML; `peft-cp-merge methods` lists each method's options)")
    p.add_argument("--out", metavar="DIR", help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing --out folder (only a merged adapter this tool wrote)")
    p.add_argument("--wait", action="store_true",
                   help="if another process is writing --out, wait for it instead of refusing")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the merged adapter to this Hub repo")
    p.add_argument("--private", action="store_true", default=None, help="create the --push-to-hub repo private")
    p.add_argument("--revision", metavar="BRANCH", help="branch to push to (created if missing)")
    p.add_argument("--commit-message", metavar="TEXT", help="commit message of the push")
    p.add_argument("--base-model", metavar="MODEL",
                   help="base model to record, skipping the check that all sources agree")
    p.add_argument("--device", metavar="DEVICE", help="where to compute: cpu (default) or cuda")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="dtype of the merged factors (default: the sources' dtype)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="at most this many equal-shape modules merged together (default: 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)


def merge_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe (if any) with the command-line flags on top, type-checked (:class:`..files.recipe.Recipe`).

    Where to write, whether to overwrite and whether to push are not part of it: they come only from the command
    line (``args.out``, ``args.overwrite``, ``args.push_to_hub``), never from a recipe or model card.
    """
    recipe = load_recipe(args.recipe) if args.recipe else {}
    flags = {
        "sources": args.sources or None, "method": args.method, "weights": args.weights, "rank": args.rank,
        "base_model": args.base_model, "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
    }
    settings = {**recipe, **{k: v for k, v in flags.items() if v is not None}}
    settings["options"] = {**recipe.get("options", {}), **dict(args.option)}
    settings = check_recipe(settings, "merge settings")
    if not settings.get("sources"):
        raise PeftCpMergeError("No adapters to merge: give SRC arguments or a --recipe with `sources`.")
    if not args.out and not args.push_to_hub:
        raise PeftCpMergeError("Nowhere to put the result: pass --out DIR and/or --push-to-hub REPO_ID "
                               "(a recipe or model card never chooses where to write).")
    return settings


def cmd_merge(args: argparse.Namespace) -> int:
    import contextlib
    from pathlib import Path

    from .._io import check_disjoint, check_output_folder, output_guard
    from ..files.merge import merge_adapters

    s = merge_settings(args)
    out = Path(args.out) if args.out else None
    local = [p for p in map(str, s["sources"]) if p.strip() and Path(p).expanduser().exists()]
    if out is not None:  # before the merge runs: an --out that is a source, exists or is unwritable costs nothing
        check_disjoint(out, sources=local)
        check_output_folder(out, overwrite=bool(args.overwrite), kind="merged-adapter")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as e:
            raise PeftCpMergeError(f"--push-to-hub {args.push_to_hub!r} is not a valid Hub repo id "
                                   f"('user/name'): {e}") from None
    # the output's lock is held from before the first source is read until the folder is in place
    guard = contextlib.nullcontext() if out is None else output_guard(
        out, kind="merged-adapter", overwrite=bool(args.overwrite), wait=args.wait, sources=local)
    with guard:
        merged = merge_adapters(
            s["sources"], s.get("weights"), s.get("method", "cp"), s.get("rank"), base_model=s.get("base_model"),
            device=s.get("device"), dtype=s.get("dtype"), batch_size=s.get("batch_size", 32),
            progress=not args.no_progress, **s["options"],
        )
        if out is not None:
            merged.save_pretrained(out, overwrite=bool(args.overwrite), wait=args.wait)
    url = None
    if args.push_to_hub:
        url = merged.push_to_hub(args.push_to_hub, private=args.private, revision=args.revision,
                                 commit_message=args.commit_message)
    r, st = merged.recipe, merged.stats
    print(f"merged {len(r['sources'])} adapters with {r['method']} at rank {r['rank']}: {st['modules']} modules in "
          f"{st['seconds']:.2f} s, {st['bytes'] / 1e6:.1f} MB ({r['dtype']})"
          + (f" -> {out}" if out else "") + (f" -> {url}" if url else ""))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from ..methods import get_merge_method, list_merge_methods
    from ..methods.advice import advice

    names = list_merge_methods()
    width = max(map(len, names))
    print("Merge methods and their options as NAME = DEFAULT, with the allowed values where they are a fixed set.\n"
          "Pass options as --option NAME=VALUE (merge, library merge) or as keywords of add_weighted_adapter.\n"
          "`use:` is the measured advice (benchmarks/README.md; margins in points vs the best matrix merge at the "
          "same output rank R).\n")
    for name in names:
        m = get_merge_method(name)
        where = "add_weighted_adapter + files" if m.peft_combination_type else "files (PEFT has its own)"
        print(f"{name:{width}s}  {m.pretty_name} [{where}; rank: {m.rank_option}]")
        print(f"{'':{width}s}  {m.reference}")
        print(f"{'':{width}s}  use: {advice(name)}")
        for k, v in m.options.items():
            allowed = m.choices.get(k)
            print(f"{'':{width}s}    {k} = {v!r}" + (f"  (one of: {', '.join(map(str, allowed))})" if allowed else ""))
    return 0


def add_merge_commands(sub) -> None:
    """Add ``merge`` and ``methods`` to the top-level sub-parsers."""
    _add_merge(sub)
    sub.add_parser("methods", help="list the merge methods, their options, defaults and allowed values",
                   description="List the merge methods, their options, defaults and allowed values."
                   ).set_defaults(func=cmd_methods)
