"""Small helpers for talking to the simulated gateway with plain requests."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple, Union

import requests

TIMEOUT = (2.0, 5.0)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "one two three four five six seven eight"},
]

Event = Union[str, Dict[str, Any]]


def chat_url(gateway, node: str = "a") -> str:
    return gateway.base_url(node) + "/chat/completions"


def body(model: str, stream: bool = False, messages=None, **extra: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {"model": model, "messages": list(messages or MESSAGES), **extra}
    if stream:
        out["stream"] = True
    return out


def read_stream(resp: requests.Response) -> Tuple[List[bytes], Optional[Exception]]:
    """The ``data:`` payloads of an SSE response, and the error that ended it (None if it ended cleanly)."""
    payloads = []
    try:
        for line in resp.iter_lines():
            if line.startswith(b"data: "):
                payloads.append(line[len(b"data: ") :])
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError) as exc:
        return payloads, exc
    return payloads, None


def parse(payloads: List[bytes]) -> List[Event]:
    """Payloads as JSON objects; ``[DONE]`` as a string."""
    return [p.decode() if p == b"[DONE]" else json.loads(p) for p in payloads]


def content_of(events: List[Event]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )
