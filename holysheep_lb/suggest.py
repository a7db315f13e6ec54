"""Errors for unknown option names: the closest known name, never the value given.

A misspelt ``api_key`` (``apikey=...``, ``"apiKey"`` in a Django settings dict) carries
the key itself, so an unknown option is reported by its name only. Naming the closest
known option helps more than listing all of them.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Optional

from .errors import REDACTED, ConfigError

__all__ = ["closest_name", "unknown_option"]

# Names people give an API key; any of them most likely meant ``api_key``.
_CREDENTIAL_WORDS = ("key", "token", "secret", "password", "bearer", "auth")
_MAX_LISTED = 8  # a short list of allowed keys is shown when nothing is close


def _fold(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


def closest_name(name: Any, known: Iterable[str]) -> Optional[str]:
    """The known name ``name`` most likely meant (ignoring case, ``_`` and ``-``), or None."""
    if not isinstance(name, str):
        return None
    by_fold = {_fold(k): k for k in sorted(known)}
    folded = _fold(name)
    if folded in by_fold:
        return by_fold[folded]
    close = difflib.get_close_matches(folded, list(by_fold), n=1, cutoff=0.6)
    if close:
        return by_fold[close[0]]
    if "api_key" in by_fold.values() and any(word in folded for word in _CREDENTIAL_WORDS):
        return "api_key"
    return None


def unknown_option(where: Optional[str], name: Any, known: Iterable[str], *, what: str,
                   reference: str = "") -> ConfigError:
    """The ConfigError for an unknown option or key ``name`` (of ``where``, if nested).

    The value given is neither shown nor kept on the error. ``reference`` says where the
    options are documented, for when no known name is close.
    """
    known = sorted(known)
    shown = name if isinstance(name, str) and len(name) <= 64 and name.isprintable() else f"<{type(name).__name__}>"
    field = where or shown  # a nested key is reported on the option that holds it
    best = closest_name(name, known)
    if best is not None:
        hint = f"did you mean `{best}`?"
    elif len(known) <= _MAX_LISTED:
        hint = "allowed: " + ", ".join(f"`{k}`" for k in known)
    else:
        hint = reference or "see the documentation for the options"
    head = f"{where}: unknown {what} `{shown}`" if where else f"{shown}: unknown {what}"
    return ConfigError(field, REDACTED, hint, message=f"{head} (its value is not shown); {hint}")
