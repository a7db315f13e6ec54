"""Deterministic content of the simulated gateway's answers, and wire helpers."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from http import HTTPStatus
from typing import Any, List, Mapping, Optional, Sequence

_Z99 = 2.3263478740408408  # standard normal quantile for p = 0.99
_LATENCY_CAP_FACTOR = 10.0  # lognormal samples are capped at 10 x p99
_EMBED_DIM = 8
_SPLIT_RE = re.compile(r"\s*\S+\s*")


def sample_latency_ms(rng: random.Random, median_ms: float, p99_ms: Optional[float]) -> float:
    """One latency sample in ms: lognormal with the given median and p99 when
    ``p99_ms > median_ms > 0`` (capped at 10 x p99), else the constant median."""
    median = max(0.0, float(median_ms))
    if p99_ms is not None and median > 0.0 and p99_ms > median:
        mu = math.log(median)
        sigma = (math.log(p99_ms) - mu) / _Z99
        return min(rng.lognormvariate(mu, sigma), p99_ms * _LATENCY_CAP_FACTOR)
    return median


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return " ".join(parts)
    return str(content)


def reply_text(model: str, messages: Sequence[Mapping[str, Any]], max_tokens: Optional[int] = None) -> str:
    """The canonical assistant text for a chat request.

    ``"[<model>] Echo: <first 200 chars of the last user message>"``; with
    ``max_tokens`` the whitespace-separated words are truncated to that many.
    A trailing assistant message (a prefill) is ignored: the canonical text is a
    function of the conversation without it (see :func:`completion_text`)."""
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    chosen: Any = None
    for msg in reversed(messages):
        if msg.get("role") == "user":
            chosen = msg
            break
    if chosen is None and messages:
        chosen = messages[-1]
    snippet = _content_text(chosen.get("content") if chosen is not None else None)[:200]
    text = f"[{model}] Echo: {snippet}"
    if max_tokens is not None:
        words = text.split()
        if len(words) > max_tokens:
            text = " ".join(words[:max_tokens])
    return text


def completion_text(model: str, messages: Sequence[Mapping[str, Any]], max_tokens: Optional[int] = None) -> str:
    """The text a chat request is answered with.

    Without a prefill, :func:`reply_text`.  When the last message is an assistant
    prefill that is a prefix of the canonical text, the rest of the canonical
    text, so that ``prefill + answer == reply_text(model, messages)``: a client
    that cuts a stream and continues it elsewhere can rebuild the full answer.
    The leading ``[<model>] `` tag is not compared, so a continuation on another
    model completes the first model's text.  A prefill that matches nothing gets
    the full canonical text.  ``max_tokens`` truncates the answer's words."""
    if not messages or messages[-1].get("role") != "assistant":
        return reply_text(model, messages, max_tokens)
    canonical = reply_text(model, messages)
    prefill = _content_text(messages[-1].get("content"))
    body, prefill_body = _untagged(canonical), _untagged(prefill)
    if canonical.startswith(prefill):
        rest = canonical[len(prefill) :]
    elif (prefill_body or prefill_body != prefill) and body.startswith(prefill_body):
        rest = body[len(prefill_body) :]
    else:
        rest = canonical
    if max_tokens is not None:
        pieces = _split_pieces(rest)
        if len(pieces) > max_tokens:
            rest = "".join(pieces[:max_tokens]).rstrip()
    return rest


def _untagged(text: str) -> str:
    """``text`` without a leading ``[<model>] `` tag."""
    if text.startswith("["):
        end = text.find("] ")
        if end > 0:
            return text[end + 2 :]
    return text


def _split_pieces(text: str) -> List[str]:
    pieces = _SPLIT_RE.findall(text)
    if "".join(pieces) != text:  # only possible for whitespace-only text
        pieces = [text] if text else []
    return pieces


def _embedding(model: str, text: str) -> List[float]:
    digest = hashlib.sha256(f"{model}\x00{text}".encode("utf-8")).digest()
    raw = [
        int.from_bytes(digest[i * 4 : i * 4 + 4], "big") / 2147483647.5 - 1.0 for i in range(_EMBED_DIM)
    ]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 6) for v in raw]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _error_body(message: str, err_type: str, code: Optional[str] = None) -> bytes:
    return _dumps({"error": {"message": message, "type": err_type, "param": None, "code": code}})


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _format_retry_after(seconds: float) -> str:
    seconds = float(seconds)
    return str(int(seconds)) if seconds.is_integer() else f"{seconds:g}"


def _normalise_path(path: str) -> str:
    path = path.split("?", 1)[0]
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/") or "/"
    return path


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _InvalidRequest(Exception):
    pass
