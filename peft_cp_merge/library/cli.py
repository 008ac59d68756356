"""Deprecated: ``python -m peft_cp_merge.library.cli ARGS`` runs ``peft-cp-merge library ARGS``; use
``python -m peft_cp_merge.cli library ARGS`` (e.g. ``accelerate launch -m peft_cp_merge.cli library train``). The
parsers live in :mod:`peft_cp_merge.cli.library`."""

import sys
import warnings


def main(argv=None) -> int:
    from ..cli import main as cli_main

    warnings.warn("`python -m peft_cp_merge.library.cli` is deprecated; run `python -m peft_cp_merge.cli library` "
                  "(or `peft-cp-merge library`).", DeprecationWarning, stacklevel=2)
    return cli_main(["library", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
