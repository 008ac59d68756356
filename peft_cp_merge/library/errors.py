"""The library trainer's exceptions; each message names the problem and the fix."""

from __future__ import annotations

from ..errors import PeftCpMergeError


class LibraryError(PeftCpMergeError):
    """Base class of the adapter-library errors."""


class LibraryConfigError(LibraryError):
    """A config field has a value the trainer cannot use."""


class LibraryDataError(LibraryError):
    """The training data is empty, lacks the expected fields, or cannot be read."""


class EmbeddingModelError(LibraryError):
    """The sentence-transformers model cannot be loaded (typically: offline without a local copy)."""


class ClusteringError(LibraryError):
    """The embeddings cannot be clustered as asked (e.g. more clusters than examples)."""


class LibraryExistsError(LibraryError):
    """The output folder holds something that is not this run's library; refusing to mix."""


class LibraryFormatError(LibraryError):
    """A folder or repo is not a readable adapter library (missing/corrupt files, unknown format version)."""


class RankFailedError(LibraryError):
    """Another process of a distributed run failed; this one stops with its error."""
