"""Exceptions with messages that name the problem and the fix.

All derive from ``ValueError`` so code written against PEFT's own ``add_weighted_adapter`` checks keeps working.
"""


class PeftCpMergeError(ValueError):
    """Base class of this package's input errors."""


class MergeInputError(PeftCpMergeError):
    """The adapters, weights or ranks given to a merge cannot be merged as asked."""


class UnknownMergeMethodError(PeftCpMergeError):
    """No merge method is registered under that name."""


class UnknownMergeOptionError(PeftCpMergeError, TypeError):
    """An option the chosen merge method does not take (also a ``TypeError``, like an unknown keyword)."""


class UnsupportedAdapterError(PeftCpMergeError):
    """The adapter uses a PEFT feature these merge methods cannot represent (DoRA, lora_bias, ...)."""
