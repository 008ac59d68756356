"""The one way untrusted mappings (recipes, ``library.json``, the library config) become checked values: a strict
pydantic model, and its first error turned into one line that names the field."""

from __future__ import annotations

from typing import Any


def first_error(error: Any) -> tuple[str, str, Any]:
    """``(field, message, input)`` of a pydantic ``ValidationError``'s first error: the field's dotted location
    (``clusters.0.size``), pydantic's message in lower case, and the offending input."""
    err = error.errors()[0]
    return ".".join(str(x) for x in err["loc"]) or "?", err["msg"].lower(), err.get("input")
