"""What a request will be answered with, worked out once when it arrives.

A plan is a pure function of the request body: the quota, the prompt cache and
the answer itself all read the same token counts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .content import (
    _content_text,
    _dumps,
    _embedding,
    _InvalidRequest,
    _split_pieces,
    completion_text,
)
from ..tokens import estimate_prompt_tokens

_TOOL_ARGUMENT_PIECE_CHARS = 8  # streamed tool-call arguments arrive in fragments this long
_TOOL_SNIPPET_CHARS = 60


@dataclass(frozen=True)
class ToolCall:
    """The single function call a request with ``tools`` is answered with."""

    id: str
    name: str
    arguments: str  # a JSON object, serialised, as OpenAI sends it


@dataclass(frozen=True)
class ChatPlan:
    """The answer to one chat request, before any fault is applied."""

    model: str
    stream: bool
    include_usage: bool
    prefill: bool  # the last message is an assistant message to continue
    text: str  # the answer's content (the remainder of the canonical text after a prefill)
    tool_call: Optional[ToolCall]
    prompt_tokens: int
    completion_tokens: int
    cache_key: Optional[str]  # the prompt-cache key of the prefix, None when there is no prefix
    cache_prefix_tokens: int
    truncated: bool = False  # max_tokens cut the answer: its finish_reason is "length"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def pieces(self) -> List[str]:
        """The content chunks of the stream (tool-call argument fragments for a tool call)."""
        if self.tool_call is not None:
            args = self.tool_call.arguments
            step = _TOOL_ARGUMENT_PIECE_CHARS
            return [args[i : i + step] for i in range(0, len(args), step)]
        return _split_pieces(self.text)

    def usage(self) -> Dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class RequestInfo:
    """What the request log and the model faults need to know about a request."""

    model: Optional[str]
    stream: bool
    prefill: bool


def request_info(body: Optional[Mapping[str, Any]]) -> RequestInfo:
    """Best effort: a body that is not a JSON object gives an empty info."""
    if not isinstance(body, Mapping):
        return RequestInfo(None, False, False)
    model = body.get("model")
    messages = body.get("messages")
    prefill = (
        isinstance(messages, list)
        and bool(messages)
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") == "assistant"
    )
    return RequestInfo(model if isinstance(model, str) and model else None, bool(body.get("stream")), prefill)


def parse_json_object(raw: bytes) -> Dict[str, Any]:
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        raise _InvalidRequest("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise _InvalidRequest("The request body must be a JSON object.")
    return body


def plan_chat(body: Mapping[str, Any]) -> ChatPlan:
    """The plan of a ``/v1/chat/completions`` body; :class:`_InvalidRequest` if it is not valid."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _InvalidRequest("'messages' must be a non-empty array.")
    if not all(isinstance(m, dict) for m in messages):
        raise _InvalidRequest("Each message must be an object.")
    model = body.get("model")
    model = model if isinstance(model, str) and model else "unknown"
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise _InvalidRequest("'max_tokens' must be a positive integer.")
    tools = _tools(body.get("tools"))
    tool = _chosen_tool(tools, body.get("tool_choice"), messages)
    prompt = estimate_prompt_tokens(messages) + _tool_tokens(tools)
    if tool is not None:
        call = ToolCall(_tool_call_id(model, messages, tools), tool["name"], _tool_arguments(tool, messages))
        truncated = False
        text = ""
        completion = max(1, math.ceil((len(call.name) + len(call.arguments)) / 4.0))
    else:
        call = None
        text = completion_text(model, messages, max_tokens)
        completion = len(text.split())
        truncated = max_tokens is not None and text != completion_text(model, messages)
    opts = body.get("stream_options")
    cache_key, prefix_tokens = _cache_prefix(model, messages, tools)
    return ChatPlan(
        model=model,
        stream=bool(body.get("stream")),
        include_usage=isinstance(opts, dict) and bool(opts.get("include_usage")),
        prefill=messages[-1].get("role") == "assistant",
        text=text,
        tool_call=call,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cache_key=cache_key,
        cache_prefix_tokens=prefix_tokens,
        truncated=truncated,
    )


# -- tools --------------------------------------------------------------------------


def _tools(tools: Any) -> List[Dict[str, Any]]:
    """The ``function`` objects of ``tools`` (validated as OpenAI does)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _InvalidRequest("'tools' must be an array.")
    functions = []
    for index, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise _InvalidRequest(f"'tools[{index}]' must be an object with type 'function' and a 'function' object.")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _InvalidRequest(f"'tools[{index}].function.name' must be a non-empty string.")
        functions.append(fn)
    return functions


def _chosen_tool(
    tools: List[Dict[str, Any]], choice: Any, messages: Sequence[Mapping[str, Any]]
) -> Optional[Dict[str, Any]]:
    """The tool to call, or None for a text answer.

    ``"auto"`` (the default) calls the first tool unless the last message is a
    tool result, so an agent loop ends; ``"required"`` always calls the first
    tool; ``{"type": "function", "function": {"name": ...}}`` calls that one."""
    if not tools or choice == "none":
        return None
    if choice is None or choice == "auto":
        return None if messages[-1].get("role") == "tool" else tools[0]
    if choice == "required":
        return tools[0]
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise _InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or a function object.")
    for fn in tools:
        if fn["name"] == name:
            return fn
    raise _InvalidRequest(f"'tool_choice' names the function {name!r}, which is not in 'tools'.")


def _tool_arguments(fn: Mapping[str, Any], messages: Sequence[Mapping[str, Any]]) -> str:
    """Arguments that fit the tool's JSON schema, derived from the last user message."""
    snippet = ""
    for msg in reversed(messages):
        if msg.get("role") == "user":
            snippet = _content_text(msg.get("content"))[:_TOOL_SNIPPET_CHARS]
            break
    params = fn.get("parameters")
    props = params.get("properties") if isinstance(params, dict) else None
    args: Dict[str, Any] = {}
    for name, schema in (props.items() if isinstance(props, dict) else ()):
        schema = schema if isinstance(schema, dict) else {}
        kind = schema.get("type")
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            args[name] = schema["enum"][0]
        elif kind == "string":
            args[name] = snippet
        elif kind == "integer":
            args[name] = len(snippet.split())
        elif kind == "number":
            args[name] = float(len(snippet.split()))
        elif kind == "boolean":
            args[name] = True
        elif kind == "array":
            args[name] = []
        elif kind == "object":
            args[name] = {}
        else:
            args[name] = None
    return json.dumps(args, separators=(",", ":"), ensure_ascii=False)


def _tool_call_id(model: str, messages: Sequence[Mapping[str, Any]], tools: List[Dict[str, Any]]) -> str:
    # deterministic, like the rest of the answer: a failed-over request gets the same id
    digest = hashlib.sha256(_dumps({"m": model, "msgs": messages, "tools": tools})).hexdigest()
    return "call_" + digest[:24]


def _tool_tokens(tools: List[Dict[str, Any]]) -> int:
    return math.ceil(len(_dumps(tools)) / 4.0) if tools else 0


# -- prompt cache -------------------------------------------------------------------


def _cache_prefix(
    model: str, messages: Sequence[Mapping[str, Any]], tools: List[Dict[str, Any]]
) -> "tuple[Optional[str], int]":
    """(key, tokens) of the cacheable prefix: the tools and the messages before the
    last user message (before the last message when there is no user message)."""
    last_user = None
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            last_user = index
            break
    prefix = list(messages[:last_user] if last_user is not None else messages[:-1])
    if not prefix and not tools:
        return None, 0
    key = hashlib.sha256(
        json.dumps({"model": model, "tools": tools, "prefix": prefix}, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()
    return key, estimate_prompt_tokens(prefix) + _tool_tokens(tools)


# -- embeddings ---------------------------------------------------------------------


def embeddings_answer(body: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``/v1/embeddings`` answer (OpenAI's shape; ``encoding_format="base64"``
    gives little-endian float32 vectors in base64, as openai-python requests by default)."""
    inp = body.get("input")
    if isinstance(inp, str):
        inputs = [inp]
    elif isinstance(inp, list) and inp:
        inputs = [x if isinstance(x, str) else json.dumps(x) for x in inp]
    else:
        raise _InvalidRequest("'input' must be a string or a non-empty array.")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _InvalidRequest("'encoding_format' must be 'float' or 'base64'.")
    model = body.get("model")
    model = model if isinstance(model, str) and model else "text-embedding-3-small"
    prompt = sum(max(1, math.ceil(len(s) / 4.0)) for s in inputs)
    data = []
    for index, text in enumerate(inputs):
        vector: Any = _embedding(model, text)
        if encoding == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


def embeddings_tokens(body: Optional[Mapping[str, Any]]) -> int:
    """Tokens an embeddings request costs (0 when the body is not valid)."""
    if not isinstance(body, Mapping):
        return 0
    inp = body.get("input")
    inputs = [inp] if isinstance(inp, str) else inp if isinstance(inp, list) else []
    return sum(max(1, math.ceil(len(x if isinstance(x, str) else json.dumps(x)) / 4.0)) for x in inputs)
