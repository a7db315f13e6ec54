"""The one reader of an answer's ``usage``: prompt, completion and prompt-cache tokens.

Gateways report the provider's prompt cache in three forms, all read here:

==========================  ====================================================================
form                        fields
==========================  ====================================================================
OpenAI (and most gateways)  ``prompt_tokens_details.cached_tokens`` (part of ``prompt_tokens``)
DeepSeek                    ``prompt_cache_hit_tokens`` / ``prompt_cache_miss_tokens``
                            (hit + miss = ``prompt_tokens``)
Anthropic style             ``cache_read_input_tokens`` / ``cache_creation_input_tokens``
==========================  ====================================================================

Anthropic's own API counts ``input_tokens`` *without* the cache reads and writes; an
OpenAI-compatible gateway relaying Claude counts them *inside* ``prompt_tokens``. So the
cache fields are added to ``input_tokens`` but taken as part of ``prompt_tokens``, unless
they exceed it (then they cannot be a part of it and are added too).

A usage that is missing or malformed never breaks a call: what cannot be read is priced
as uncached input (never cheaper than billed at the full rate) and named in
:attr:`TokenUsage.problems`, which the spend ledger counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple

__all__ = ["TokenUsage", "read_usage", "total_tokens"]

_NO_USAGE = ("usage",)
# The usage most answers carry; read_usage takes a shortcut for it (same result).
_PLAIN_KEYS = frozenset(("prompt_tokens", "completion_tokens", "total_tokens"))


@dataclass(frozen=True)
class TokenUsage:
    """Token counts from one answer's ``usage``.

    ``input_tokens`` counts every prompt token, cached ones included;
    ``cached_tokens`` were read from the provider's prompt cache and
    ``cache_write_tokens`` written to it (both part of ``input_tokens``).
    ``known`` is False when no prompt token count could be read (the ledger then
    counts its estimate). ``problems`` names the fields that were missing or unreadable.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    known: bool = False
    problems: Tuple[str, ...] = ()

    @property
    def uncached_input_tokens(self) -> int:
        """Input tokens billed at the plain input rate."""
        return self.input_tokens - self.cached_tokens - self.cache_write_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def _count(value: Any) -> Optional[int]:
    """A token count: an int >= 0 (an integral float is accepted), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and math.isfinite(value) and value >= 0 and value.is_integer():
        return int(value)
    return None


class _Fields:
    """Reads counts out of a usage mapping, remembering which present fields were bad."""

    def __init__(self, usage: Mapping[str, Any]) -> None:
        self.usage = usage
        self.problems: List[str] = []

    def get(self, name: str, within: Optional[str] = None) -> Optional[int]:
        source: Any = self.usage
        path = name
        if within is not None:
            source = self.usage.get(within)
            path = f"{within}.{name}"
            if source is None:
                return None
            if not isinstance(source, Mapping):
                self.problems.append(within)
                return None
        value = source.get(name)
        if value is None:
            return None
        count = _count(value)
        if count is None:
            self.problems.append(path)
        return count


def read_usage(usage: Any) -> TokenUsage:
    """Read ``usage`` (the answer's ``usage`` object) in any of the forms gateways send.

    Never raises. Without a readable prompt count the result has ``known=False``.
    """
    if usage is None:
        return TokenUsage(problems=_NO_USAGE)
    if type(usage) is dict and usage.keys() <= _PLAIN_KEYS:  # the plain form: no cache fields
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if type(prompt) is int and type(completion) is int and prompt >= 0 and completion >= 0:
            return TokenUsage(prompt, completion, 0, 0, True)
    if not isinstance(usage, Mapping):
        return TokenUsage(problems=_NO_USAGE)
    f = _Fields(usage)
    prompt = f.get("prompt_tokens")
    native_input = f.get("input_tokens") if prompt is None else None
    completion = f.get("completion_tokens")
    if completion is None:
        completion = f.get("output_tokens")
    hit, miss = f.get("prompt_cache_hit_tokens"), f.get("prompt_cache_miss_tokens")
    read, write = f.get("cache_read_input_tokens"), f.get("cache_creation_input_tokens")
    details_cached = f.get("cached_tokens", within="prompt_tokens_details")
    if native_input is not None and details_cached is None:  # OpenAI Responses API form
        details_cached = f.get("cached_tokens", within="input_tokens_details")
    if prompt is None and native_input is None and hit is not None and miss is not None:
        prompt = hit + miss  # DeepSeek without prompt_tokens

    cached = next((c for c in (details_cached, hit, read) if c is not None), 0)
    written = write or 0
    if native_input is not None:
        # Anthropic's own form: input_tokens leaves out what was read from or written to
        # the cache (its Responses-API namesake includes its cached tokens)
        extra = (read or 0) + written
        prompt = native_input + extra if extra else native_input
    elif prompt is not None and (read is not None or write is not None) and (read or 0) + written > prompt:
        prompt += (read or 0) + written  # cannot be part of prompt_tokens: counted beside it
    if prompt is None:
        f.problems.append("prompt_tokens")
        return TokenUsage(problems=tuple(f.problems))
    if cached + written > prompt:
        f.problems.append("cached tokens above prompt_tokens")
        cached = written = 0
    if completion is None:
        if "completion_tokens" not in usage and "output_tokens" not in usage:
            completion = 0  # embeddings, or a prompt-only usage
        else:
            f.problems.append("completion_tokens")
            return TokenUsage(problems=tuple(f.problems))
    return TokenUsage(prompt, completion, cached, written, True, tuple(f.problems))


def total_tokens(usage: Any) -> Optional[int]:
    """Tokens an answer says it used (``total_tokens``, else input + output), or None.

    What the token rate limits are corrected with.
    """
    if isinstance(usage, Mapping):
        total = _count(usage.get("total_tokens"))
        if total is not None:
            return total
    reading = read_usage(usage)
    return reading.total_tokens if reading.known else None
