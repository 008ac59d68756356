"""The ``peft-cp-merge`` command line (``merge``, ``methods``, ``library``).

``--help`` must start at once: this module and the parsers import nothing heavy (no torch, PEFT, tensorly); each
command imports what it needs when it runs. :data:`DESCRIPTION` is the text users see.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import yaml

from .card import DTYPE_NAMES, RECIPE_FIELDS, check_recipe, load_recipe
from .errors import PeftCpMergeError

logger = logging.getLogger("peft_cp_merge")

DESCRIPTION = """\
Merge LoRA adapters from local folders or Hub repos into one LoRA adapter, and train, inspect and merge TC-LoRA
adapter libraries.

examples:
  peft-cp-merge merge user/math-lora user/code-lora ./qa-lora --method cp --rank 16 --out merged
  peft-cp-merge merge --recipe recipe.yaml --out merged    # or the README.md of a merged adapter
  peft-cp-merge merge a b --method tsv --weights 0.7 0.3 --out merged --push-to-hub me/merged
  peft-cp-merge methods                                    # the merge methods, their options and values
  peft-cp-merge library train --config library.yaml        # more: peft-cp-merge library --help

Each command has its own --help.
"""


def yaml_value(text: str) -> Any:
    """A command-line value read as YAML (``4`` -> int, ``[a, b]`` -> list, ``null`` or empty -> None); invalid YAML
    is an argparse error naming the value. An argparse ``type``."""
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid YAML ({' '.join(str(e).split())})") from None


def key_value(text: str) -> tuple[str, Any]:
    """The one ``KEY=VALUE`` parser of the command line (``--option``, ``--set``): the value is read by
    :func:`yaml_value`; ``-`` in the key reads as ``_``. An argparse ``type``."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. cp_init=svd), got {text!r}")
    return key, yaml_value(value)


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
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out folder")
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
    """The recipe (if any) with the command-line flags on top, type-checked (:class:`~peft_cp_merge.card.Recipe`).

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
    from pathlib import Path

    from ._io import check_output_folder
    from .engine import merge_adapters

    s = merge_settings(args)
    out = Path(args.out) if args.out else None
    if out is not None:  # before the merge runs: an unwritable or existing --out costs nothing
        check_output_folder(out, overwrite=bool(args.overwrite))
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as e:
            raise PeftCpMergeError(f"--push-to-hub {args.push_to_hub!r} is not a valid Hub repo id "
                                   f"('user/name'): {e}") from None
    merged = merge_adapters(
        s["sources"], s.get("weights"), s.get("method", "cp"), s.get("rank"), base_model=s.get("base_model"),
        device=s.get("device"), dtype=s.get("dtype"), batch_size=s.get("batch_size", 32),
        progress=not args.no_progress, **s["options"],
    )
    if out is not None:
        merged.save_pretrained(out, overwrite=bool(args.overwrite))
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
    from .methods import get_merge_method, list_merge_methods

    names = list_merge_methods()
    width = max(map(len, names))
    print("Merge methods and their options as NAME = DEFAULT, with the allowed values where they are a fixed set.\n"
          "Pass options as --option NAME=VALUE (merge, library merge) or as keywords of add_weighted_adapter.\n")
    for name in names:
        m = get_merge_method(name)
        where = "add_weighted_adapter + files" if m.peft_combination_type else "files (PEFT has its own)"
        print(f"{name:{width}s}  {m.pretty_name} [{where}; rank: {m.rank_option}]")
        print(f"{'':{width}s}  {m.reference}")
        for k, v in m.options.items():
            allowed = m.choices.get(k)
            print(f"{'':{width}s}    {k} = {v!r}" + (f"  (one of: {', '.join(map(str, allowed))})" if allowed else ""))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``peft-cp-merge merge: error: ... (see --help)``, exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def _library_missing(error: ImportError):
    """``library`` when the trainer's extra is not installed: the command says how to install it."""
    def add_subcommands(sub):
        p = sub.add_parser("library", help="TC-LoRA adapter libraries (needs: pip install 'peft-cp-merge[library]')",
                           add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

        def fail(args):
            raise PeftCpMergeError(str(error))

        p.set_defaults(func=fail)
    return add_subcommands


def build_parser() -> argparse.ArgumentParser:
    try:
        from .library.cli import add_subcommands
    except ImportError as e:  # merge-only install: everything but `library` works
        add_subcommands = _library_missing(e)

    parser = _Parser(prog="peft-cp-merge", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="{merge,methods,library}", required=True)
    _add_merge(sub)
    sub.add_parser("methods", help="list the merge methods, their options, defaults and allowed values",
                   description="List the merge methods, their options, defaults and allowed values."
                   ).set_defaults(func=cmd_methods)
    add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """``args.func(args)``, with bad input (our errors, an unusable path) as one line on stderr and exit code 2."""
    try:
        return args.func(args)
    except PeftCpMergeError as e:  # LibraryError included
        logger.debug("bad input", exc_info=True)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # an output folder that is a file or not writable, a full disk, ...
        logger.debug("I/O error", exc_info=True)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
