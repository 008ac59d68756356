"""The ``peft-cp-merge`` command line: one parser tree (``merge`` and ``methods`` in :mod:`.merge`, ``library`` in
:mod:`.library`), one error handler (:func:`run_command`) and one KEY=VALUE parser (:func:`key_value`).

``--help`` must start at once: this package and the parsers import nothing heavy (no torch, PEFT, tensorly); each
command imports what it needs when it runs. :data:`DESCRIPTION` is the text users see. ``python -m
peft_cp_merge.cli`` is the same command (e.g. under ``accelerate launch``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .._version import __version__
from .._yaml import load_yaml
from ..errors import PeftCpMergeError

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


MAX_VALUE_BYTES = 64 * 1024  # one --option / --set value


def yaml_value(text: str) -> Any:
    """A command-line value read as YAML (``4`` -> int, ``[a, b]`` -> list, ``null`` or empty -> None) by the bounded
    reader :func:`peft_cp_merge._yaml.load_yaml` (no anchors/aliases, tags, duplicate keys or deep nesting); invalid
    YAML is an argparse error naming the value. An argparse ``type``."""
    try:
        return load_yaml(text, f"{text!r:.80}", max_bytes=MAX_VALUE_BYTES) if text.strip() else None
    except PeftCpMergeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def key_value(text: str) -> tuple[str, Any]:
    """The one ``KEY=VALUE`` parser of the command line (``--option``, ``--set``): the value is read by
    :func:`yaml_value`; ``-`` in the key reads as ``_``. An argparse ``type``."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. cp_init=svd), got {text!r}")
    return key, yaml_value(value)


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
    from .merge import add_merge_commands

    try:
        from .library import add_subcommands
    except ImportError as e:  # merge-only install: everything but `library` works
        add_subcommands = _library_missing(e)

    parser = _Parser(prog="peft-cp-merge", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{merge,methods,library}", required=True)
    add_merge_commands(sub)
    add_subcommands(sub)
    return parser


INTERRUPTED = 130  # the shell's code for a command ended by SIGINT


def main(argv: list[str] | None = None) -> int:
    """The command line; Ctrl-C anywhere is one line (``interrupted; nothing written``, or what a command that
    keeps resumable work says) and exit code 130, never a traceback (every writer cleans up on the way out)."""
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(name)s: %(message)s")
        return run_command(args)
    except KeyboardInterrupt as e:
        print(f"interrupted; {getattr(e, 'peft_cp_merge_note', None) or 'nothing written'}", file=sys.stderr)
        return INTERRUPTED


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

