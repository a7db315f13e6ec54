"""Checks on call arguments that every path relies on (cache key, request body).

A lone UTF-16 surrogate (``"\\ud800"``, often the half of an emoji cut by a slice) is a
valid ``str`` but not Unicode text: it cannot be encoded as UTF-8, so neither the
request body nor the cache key can be built from it. Call arguments are checked once,
before either, and the caller gets an :class:`~holysheep_lb.errors.InvalidRequestError`
naming where the bad text is.
"""

from __future__ import annotations

import re
from typing import Any, List, Mapping, Optional, Tuple

from .errors import InvalidRequestError

__all__ = ["check_text", "lone_surrogate_at"]

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value: Any, where: str) -> Optional[Tuple[str, str]]:
    """(path, text) of the first string in ``value`` (dicts, lists, keys) holding a lone
    surrogate, paths like ``messages[1].content[0].text``; None when all text is valid.

    Iterative, and each container is visited once: deep or cyclic arguments cannot
    recurse without bound here (the JSON encoder refuses them later, with a typed error).
    """
    pending: List[Tuple[str, Any]] = [(where, value)]
    seen = set()
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return path, item
            continue
        if not isinstance(item, (Mapping, list, tuple)) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Mapping):
            children = []
            for key, child in item.items():
                if isinstance(key, str) and _LONE_SURROGATE.search(key):
                    return f"{path} key", key
                children.append((f"{path}.{key}", child))
        else:
            children = [(f"{path}[{i}]", child) for i, child in enumerate(item)]
        pending.extend(reversed(children))  # depth first, in order: the first bad text is named
    return None


def check_text(value: Any, where: str) -> None:
    """Raise :class:`InvalidRequestError` if ``value`` holds a lone surrogate anywhere."""
    if isinstance(value, str):  # the common case, without building any path
        if value.isascii() or not _LONE_SURROGATE.search(value):
            return
    elif not isinstance(value, (Mapping, list, tuple)) or not _any_lone_surrogate(value):
        return
    found = lone_surrogate_at(value, where)
    if found is not None:
        path, text = found
        raise InvalidRequestError(path, text, "contains a lone surrogate (half of a UTF-16 pair), which is "
                                              "not valid Unicode text and cannot be sent")


def _any_lone_surrogate(value: Any) -> bool:
    """Whether any string in ``value`` holds a lone surrogate (paths are built only if so)."""
    pending = [value]
    seen = set()
    search = _LONE_SURROGATE.search
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii() and search(item):  # isascii() is O(1): a flag of the str object
                return True
        elif isinstance(item, (Mapping, list, tuple)) and id(item) not in seen:
            seen.add(id(item))
            if isinstance(item, Mapping):
                pending.extend(item.keys())
                pending.extend(item.values())
            else:
                pending.extend(item)
    return False
