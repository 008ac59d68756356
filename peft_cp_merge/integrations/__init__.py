"""Integrations with other libraries. ``peft.py`` is the ``add_weighted_adapter`` front end; this module holds the
registration with PEFT, which must stay light (it runs on ``import peft_cp_merge``, before PEFT is loaded)."""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings

_ORIGINAL = "_peft_cp_merge_original"


def register() -> None:
    """Make this package's combination types available in ``add_weighted_adapter``. Idempotent.

    PEFT has no registry of combination types, so this wraps ``LoraModel.add_weighted_adapter`` once. PEFT's own
    types go to the original method untouched; ours go to :func:`add_weighted_adapter_registry`.
    ``PeftModel.add_weighted_adapter`` forwards to ``LoraModel`` and so works too.
    """
    from peft.tuners.lora import LoraModel

    if hasattr(LoraModel.add_weighted_adapter, _ORIGINAL):
        return
    original = LoraModel.add_weighted_adapter

    @functools.wraps(original)
    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", *args, **kwargs):
        from ..methods import list_merge_methods

        if combination_type not in list_merge_methods(peft_only=True):
            return original(self, adapters, weights, adapter_name, combination_type, *args, **kwargs)
        if args:
            raise TypeError(
                f"combination_type={combination_type!r} takes its options as keyword arguments only "
                f"(e.g. svd_rank=8 / cp_rank=8); got {len(args)} extra positional argument(s)."
            )
        from .peft import add_weighted_adapter_registry

        return add_weighted_adapter_registry(self, adapters, weights, adapter_name, combination_type, **kwargs)

    setattr(add_weighted_adapter, _ORIGINAL, original)
    # not listed by name: this can run while peft_cp_merge.methods is still being imported (it imports PEFT)
    add_weighted_adapter.__doc__ = (original.__doc__ or "") + (
        "\n        With peft-cp-merge imported, `combination_type` also accepts the names in "
        "`peft_cp_merge.list_merge_methods(peft_only=True)` (cp, tsv, knots, ...; see "
        "`peft_cp_merge.add_weighted_adapter_registry`).\n"
    )
    LoraModel.add_weighted_adapter = add_weighted_adapter


def unregister() -> None:
    """Restore PEFT's original ``add_weighted_adapter``. Idempotent."""
    from peft.tuners.lora import LoraModel

    original = getattr(LoraModel.add_weighted_adapter, _ORIGINAL, None)
    if original is not None:
        LoraModel.add_weighted_adapter = original


def is_registered() -> bool:
    from peft.tuners.lora import LoraModel

    return hasattr(LoraModel.add_weighted_adapter, _ORIGINAL)


class _RegisterWhenPeftLoads:
    """A ``sys.meta_path`` finder that finds nothing itself: when ``peft`` is first imported, it asks the other
    finders for peft's spec and has :func:`register` run right after peft's ``__init__`` (then it removes itself).

    Only the ``exec_module`` of that one loader instance is wrapped, so peft's module, spec and loader type stay
    exactly what they would be without this package.
    """

    _peft_cp_merge_hook = True

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        for finder in sys.meta_path:
            if getattr(finder, "_peft_cp_merge_hook", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return None  # let the normal import run; register() then runs on our first use of PEFT
        hook = self

        def exec_then_register(module):
            exec_module(module)
            with contextlib.suppress(AttributeError):
                del loader.exec_module
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(hook)
            try:
                register()
            except Exception as e:  # never break `import peft` because of this package
                warnings.warn(f"peft-cp-merge could not register its combination types with PEFT: {e!r}. "
                              "Call peft_cp_merge.register() to retry.", stacklevel=2)

        loader.exec_module = exec_then_register
        return spec


def _register_now_or_when_peft_loads() -> None:
    if "peft" in sys.modules:
        register()
    elif not any(getattr(f, "_peft_cp_merge_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenPeftLoads())

