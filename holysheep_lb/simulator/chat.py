"""The chat completion answer of a simulated node, plain and streamed, with the
faults that happen inside an answer (a slow first token, a cut or stalled stream,
a malformed event, no ``[DONE]``, an error event, a content filter).

:class:`ChatAnswers` is a mixin of the request handler: it writes through the
handler's ``_head``/``_send``/``_drop``/``_reset`` and its ``wfile``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from .config import SimModel
from .content import _chunk, _dumps
from .faults import ModelDecision
from .plans import ChatPlan

if TYPE_CHECKING:
    from .runtime import _NodeRuntime

_MALFORMED_EVENT = _chunk(b'data: {"choices": [\n\n')
_END_OF_BODY = b"0\r\n\r\n"
_DONE = _chunk(b"data: [DONE]\n\n")
_STREAM_HEADERS = (("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked"))
_IN_STREAM_ERROR = {
    "message": "The server had an error while processing your request (simulated, inside the stream).",
    "type": "server_error",
    "param": None,
    "code": "internal_error",
}
_PREFILL_REJECTED = (
    "This model does not support assistant message prefill. The conversation must end with a user message."
)


@dataclass(frozen=True)
class _Break:
    """Where a stream breaks: after events[index], by ``action`` (reset, drop, stall)."""

    index: int
    action: str
    outcome: str
    stall_s: float = 0.0
    released: Callable[[], bool] = lambda: False


class ChatAnswers:
    """Mixin: writes chat completions.  Sets ``_outcome`` when the answer is not plain ``ok``."""

    _outcome: Optional[str]
    wfile: Any

    if TYPE_CHECKING:  # provided by the handler

        def _head(self, status: int, content_type: str, headers: Sequence[Tuple[str, str]] = ()) -> bytes: ...

        def _send(self, status: int, body: bytes, content_type: str = ...,
                  headers: Sequence[Tuple[str, str]] = ()) -> None: ...

        def _drop(self) -> None: ...

        def _reset(self) -> None: ...

    def _chat(self, rt: _NodeRuntime, plan: ChatPlan, decision: Optional[ModelDecision],
              cache_usage: Dict[str, Any], released: Callable[[], bool],
              accepted: Callable[[], None]) -> None:
        """Answer ``plan``; ``accepted()`` runs once the model takes the prompt (before
        any byte of the answer), so a request that follows sees its cache entry."""
        model_cfg = decision.model if decision is not None else None
        fault = decision.fault if decision is not None else None
        if model_cfg is not None and plan.prefill and not model_cfg.prefill:
            self._send(400, _dumps({"error": {"message": _PREFILL_REJECTED, "type": "invalid_request_error",
                                              "param": "messages", "code": "invalid_prefill"}}))
            self._outcome = "prefill_rejected"
            return
        window = model_cfg.context_window_tokens if model_cfg is not None else None
        if window is not None and plan.prompt_tokens > window:
            self._send(400, context_length_body(window, plan.prompt_tokens))
            self._outcome = "context_length_exceeded"
            return
        accepted()
        pieces = plan.pieces()
        finish = "tool_calls" if plan.tool_call is not None else "length" if plan.truncated else "stop"
        usage = dict(plan.usage(), **cache_usage)
        if fault == "content_filter":
            assert model_cfg is not None
            pieces = [] if plan.tool_call is not None else pieces[: model_cfg.fault_after_chunks]
            finish = "content_filter"
            usage["completion_tokens"] = len("".join(pieces).split())
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            self._outcome = "content_filter"
        cid = "chatcmpl-" + os.urandom(12).hex()
        created = int(time.time())
        if plan.stream:
            tool = plan.tool_call if finish == "tool_calls" else None
            events = _stream_events(cid, created, plan.model, pieces, finish, tool,
                                    usage if plan.include_usage else None)
            self._stream(rt, events, len(pieces), model_cfg, fault, released)
            return
        message: Dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
        if finish == "tool_calls":
            assert plan.tool_call is not None
            call = plan.tool_call
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]}
        result = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": plan.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage,
        }
        self._answer(rt, _dumps(result), model_cfg, fault, released)

    def _answer(self, rt: _NodeRuntime, body: bytes, model_cfg: Optional[SimModel], fault: Optional[str],
                released: Callable[[], bool]) -> None:
        """A non-stream answer, with the non-stream form of an in-answer fault."""
        if fault == "malformed_event":
            self._send(200, b'{"choices": [')
            self._outcome = "malformed_event"
            return
        if fault == "error_event":
            self._send(200, _dumps({"error": _IN_STREAM_ERROR}))
            self._outcome = "error_event"
            return
        if model_cfg is None or fault not in ("slow_first_token", "stream_cut", "stream_stall"):
            self._send(200, body)
            return
        self.wfile.write(self._head(200, "application/json", (("Content-Length", str(len(body))),)))
        if fault == "slow_first_token":
            if not rt.wait_until(released, model_cfg.fault_duration_s):
                self._drop()
                return
            self.wfile.write(body)
            return
        # a cut (or stalled) body: half of what Content-Length promised
        self.wfile.write(body[: len(body) // 2])
        if fault == "stream_stall":
            rt.wait_until(released, model_cfg.fault_duration_s)
        self._outcome = fault
        self._drop()

    def _stream(self, rt: _NodeRuntime, events: List[bytes], n_pieces: int, model_cfg: Optional[SimModel],
                fault: Optional[str], released: Callable[[], bool]) -> None:
        """Write the SSE events; events[0] is the role chunk, events[k] the k-th content chunk."""
        cfg = rt.cfg
        delay_s = max(0.0, float(cfg.chunk_delay_ms)) / 1000.0
        first_delay_s = 0.0
        brk: Optional[_Break] = None
        if cfg.stream_fault is not None:  # the node's own stream fault comes first
            stream_fault = cfg.stream_fault
            brk = _Break(
                min(cfg.stream_fault_after_chunks, n_pieces),
                "reset" if stream_fault == "reset_midstream" else "stall",
                "stream_fault",
                cfg.hang_s,
                lambda: cfg.stream_fault != stream_fault,
            )
        elif model_cfg is not None and fault is not None:
            after = min(model_cfg.fault_after_chunks, n_pieces)
            if fault == "slow_first_token":
                first_delay_s = model_cfg.fault_duration_s
            elif fault == "stream_cut":
                brk = _Break(after, "drop", "stream_cut")
            elif fault == "stream_stall":
                brk = _Break(after, "stall", "stream_stall", model_cfg.fault_duration_s, released)
            elif fault == "malformed_event":
                events.insert(after + 1, _MALFORMED_EVENT)
                self._outcome = "malformed_event"
            elif fault == "no_done":
                events[-1] = _END_OF_BODY
                self._outcome = "no_done"
            elif fault == "error_event":
                del events[after + 1 :]
                events.append(_chunk(b"data: " + _dumps({"error": _IN_STREAM_ERROR}) + b"\n\n") + _END_OF_BODY)
                self._outcome = "error_event"

        head = self._head(200, "text/event-stream", _STREAM_HEADERS)
        if brk is None and delay_s <= 0 and first_delay_s <= 0:
            self.wfile.write(head + b"".join(events))
            return
        self.wfile.write(head)
        if first_delay_s > 0 and not rt.wait_until(released, first_delay_s):
            self._drop()
            return
        for index, data in enumerate(events):
            if index > 0 and delay_s > 0 and not rt.sleep(delay_s):
                self._drop()
                return
            self.wfile.write(data)
            if brk is not None and index == brk.index:
                if delay_s > 0 and not rt.sleep(delay_s):
                    self._drop()
                    return
                self._outcome = brk.outcome
                if brk.action == "reset":
                    self._reset()
                    return
                if brk.action == "stall":
                    rt.wait_until(brk.released, brk.stall_s)
                self._drop()
                return


def _stream_events(cid: str, created: int, model: str, pieces: List[str], finish: str, tool: Any,
                   usage: Optional[Dict[str, Any]]) -> List[bytes]:
    """The framed SSE events of a complete stream; the last one ends the body."""

    def event(choices: List[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None) -> bytes:
        obj: Dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if extra:
            obj.update(extra)
        return _chunk(b"data: " + _dumps(obj) + b"\n\n")

    def choice(delta: Dict[str, Any], finish_reason: Optional[str] = None) -> List[Dict[str, Any]]:
        return [{"index": 0, "delta": delta, "finish_reason": finish_reason}]

    if tool is not None:  # OpenAI's form: the call's id and name first, then argument fragments
        head = {"index": 0, "id": tool.id, "type": "function", "function": {"name": tool.name, "arguments": ""}}
        events = [event(choice({"role": "assistant", "content": None, "tool_calls": [head]}))]
        events.extend(event(choice({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})) for p in pieces)
    else:
        events = [event(choice({"role": "assistant"}))]
        events.extend(event(choice({"content": p})) for p in pieces)
    events.append(event(choice({}, finish)))
    if usage is not None:
        events.append(event([], {"usage": usage}))
    events.append(_DONE + _END_OF_BODY)
    return events


def context_length_body(window_tokens: int, prompt_tokens: int) -> bytes:
    """OpenAI's 400 for a prompt longer than the model's context window."""
    message = (f"This model's maximum context length is {window_tokens} tokens. However, your messages "
               f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.")
    return _dumps({"error": {"message": message, "type": "invalid_request_error", "param": "messages",
                             "code": "context_length_exceeded"}})


def content_policy_body() -> bytes:
    """OpenAI's (and Azure OpenAI's) 400 for a prompt its safety system rejected."""
    return _dumps({"error": {
        "message": ("The response was filtered due to the prompt triggering the content management policy. "
                    "Please modify your prompt and retry."),
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "content_policy_violation",
        "innererror": {"code": "ResponsibleAIPolicyViolation",
                       "content_filter_result": {"violence": {"filtered": True, "severity": "medium"}}},
    }})
