"""The one reader of untrusted YAML (recipes, model cards, ``--option``/``--set`` values, library train configs).

:func:`load_yaml` is ``yaml.safe_load`` with bounds, so a small input can never cost much memory or time or end in
a traceback:

- at most ``max_bytes`` of UTF-8 text (default :data:`MAX_YAML_BYTES`), checked before parsing;
- no anchors or aliases (``&name`` / ``*name``, and so no ``<<`` merge keys): an alias is how a 700-byte
  "billion laughs" document expands to gigabytes, and a recipe has no use for them;
- nesting at most ``max_depth`` levels (default :data:`MAX_YAML_DEPTH`), checked as the document is composed,
  before Python's recursion limit is near;
- no key given twice in one mapping (PyYAML would silently keep the second value);
- only the JSON-like tags (``!!str``, ``!!int``, ``!!float``, ``!!bool``, ``!!null``, ``!!seq``, ``!!map``):
  ``!!python/object`` and every other tag is refused, and a date-looking scalar stays a string.

Any violation, and any syntax error, is one exception of the caller's error type whose message names the place
and the fix.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import PeftCpMergeError

MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
_STANDARD_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}
_TIMESTAMP = "tag:yaml.org,2002:timestamp"


class _Refused(yaml.YAMLError):
    """A bound of :func:`load_yaml` was hit (carries the message and where in the text)."""

    def __init__(self, message: str, mark):
        super().__init__(message)
        self.message, self.mark = message, mark


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors/aliases, deep nesting, duplicate keys and non-JSON tags."""

    max_depth = MAX_YAML_DEPTH

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("uses YAML anchors or aliases (&name / *name), which are not accepted (a few bytes of "
                           "them can expand to gigabytes). Write each value out in full", event.start_mark)
        tag = getattr(event, "tag", None)
        if tag is not None and tag != "!" and tag not in _STANDARD_TAGS:
            raise _Refused(f"uses the YAML tag {tag!r}; only plain values (strings, numbers, booleans, null, lists "
                           "and mappings) are accepted. Remove the tag", event.start_mark)
        self._depth += 1
        if self._depth > self.max_depth:
            raise _Refused(f"nests values deeper than {self.max_depth} levels; a recipe or config is a few levels "
                           "deep. Flatten it", event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise _Refused("uses a YAML merge key (<<), which is not accepted. Write the keys out in full",
                                   key_node.start_mark)
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # unhashable: SafeConstructor names it below
                if first is not key_node:
                    raise _Refused(f"gives the key {key!r} twice (lines {first.start_mark.line + 1} and "
                                   f"{key_node.start_mark.line + 1}); YAML would silently keep the second. Keep one",
                                   key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# a date-looking scalar (2024-01-01, a Hub tag name) stays a string: no datetime objects from untrusted text
_BoundedLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str, where: str, *, error: type[Exception] = PeftCpMergeError, max_bytes: int = MAX_YAML_BYTES,
              max_depth: int = MAX_YAML_DEPTH) -> Any:
    """``text`` read as one YAML document, within the bounds above; raise ``error(message)`` naming ``where``
    (e.g. ``"Recipe 'r.yaml'"``) and the fix otherwise. Empty text is ``None``."""
    if not isinstance(text, str):
        raise error(f"{where} is not text.")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise error(f"{where} is {size} bytes, more than the {max_bytes} accepted; a recipe, card or config is a "
                    "few kB. Give the right file.")
    loader = _BoundedLoader(text)
    loader.max_depth = max_depth
    try:
        return loader.get_single_data()
    except _Refused as e:
        raise error(f"{where} {e.message} (line {e.mark.line + 1}).") from None
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:  # not reached within max_depth; kept so no input can end in a traceback
        raise error(f"{where} nests values too deeply. Flatten it.") from None
    finally:
        loader.dispose()
