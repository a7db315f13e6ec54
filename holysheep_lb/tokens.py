"""The one estimate of a call's tokens before it is sent, for budgets, rate limits and the simulator.

OpenAI's rule of thumb: about 4 characters a token, plus 4 tokens a message for the
role and framing. Good to tens of percent for English text, which is what a budget
reservation or a tokens-per-minute bucket needs; the answer's ``usage`` gives the exact
count afterwards (reading ``usage`` is not this module's business).

An answer may use up to ``max_tokens`` (or ``max_completion_tokens``) tokens for each
of its ``n`` choices: :func:`reserved_output_tokens` is that reservation rule, shared
by the spend ledger (which assumes a default output when no cap is given) and the rate
limits (which assume none).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

__all__ = [
    "CHARS_PER_TOKEN",
    "TOKENS_PER_MESSAGE",
    "content_chars",
    "estimate_prompt_tokens",
    "estimate_input_tokens",
    "requested_output_tokens",
    "reserved_output_tokens",
    "estimate_call_tokens",
]

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def content_chars(content: Any) -> int:
    """Characters of text in a message's ``content``: a string, or a list of parts
    (strings, or ``{"type": "text", "text": ...}``); anything else (images, None) counts 0."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, (list, tuple)):
        total = 0
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif (isinstance(part, dict) or isinstance(part, Mapping)) and isinstance(part.get("text"), str):
                total += len(part["text"])
        return total
    return 0


def _tokens_of_chars(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def estimate_prompt_tokens(messages: Optional[Iterable[Any]]) -> int:
    """Prompt tokens of chat ``messages``: ceil(characters / 4) + 4 per message.

    A message that is not a mapping adds its 4 tokens of framing and no text; ``messages``
    that is not a sequence of messages (a string, a mapping) counts 0.
    """
    if not messages:
        return 0
    if not isinstance(messages, (list, tuple)) and isinstance(messages, (str, bytes, Mapping)):
        return 0
    chars = 0
    count = 0
    for message in messages:
        count += 1
        if isinstance(message, dict) or isinstance(message, Mapping):  # dict first: the ABC check is slow
            chars += content_chars(message.get("content"))
    return _tokens_of_chars(chars) + TOKENS_PER_MESSAGE * count


def estimate_input_tokens(inputs: Any) -> int:
    """Tokens of an embeddings ``input``: a string or a list of strings (others count 0)."""
    if isinstance(inputs, str):
        return _tokens_of_chars(len(inputs))
    if isinstance(inputs, (list, tuple)):
        return _tokens_of_chars(sum(len(item) for item in inputs if isinstance(item, str)))
    return 0


def _count(value: Any) -> Optional[int]:
    """``value`` if it is a positive int (not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def requested_output_tokens(params: Mapping[str, Any]) -> Optional[int]:
    """The cap on one choice's output: ``max_tokens``, else ``max_completion_tokens``; None if neither is set."""
    requested = _count(params.get("max_tokens"))
    return requested if requested is not None else _count(params.get("max_completion_tokens"))


def reserved_output_tokens(params: Mapping[str, Any], *, assumed_output_tokens: int = 0) -> int:
    """Output tokens to hold for a call: its cap (or ``assumed_output_tokens`` without one) × ``n``."""
    per_choice = requested_output_tokens(params)
    if per_choice is None:
        per_choice = assumed_output_tokens
    return per_choice * (_count(params.get("n")) or 1)


def estimate_call_tokens(messages: Optional[Iterable[Any]], params: Mapping[str, Any], *,
                         assumed_output_tokens: int = 0) -> int:
    """Every token a call may use: its prompt (``messages``, or an embeddings ``input`` in
    ``params``) plus :func:`reserved_output_tokens`."""
    return (estimate_prompt_tokens(messages) + estimate_input_tokens(params.get("input"))
            + reserved_output_tokens(params, assumed_output_tokens=assumed_output_tokens))
