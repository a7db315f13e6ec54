"""The HTTP request handler of a simulated node: the fault pipeline and the endpoints.

One request goes through: the node's faults (refuse/reset/hang, a hang under
load), the seeded dice (latency, reset/malformed, 5xx, 429), the quota, the
model's faults that come before an answer, then the endpoint (the chat answer
and its in-answer faults live in :mod:`.chat`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from .chat import ChatAnswers, content_policy_body, context_length_body
from .config import MODELS
from .content import (
    _dumps,
    _error_body,
    _format_retry_after,
    _InvalidRequest,
    _normalise_path,
    _reason,
)
from .faults import ModelDecision
from .plans import (
    ChatPlan,
    embeddings_answer,
    embeddings_tokens,
    parse_json_object,
    plan_chat,
    request_info,
)
from .prompt_cache import usage_fields

if TYPE_CHECKING:
    from .requestlog import _Entry
    from .runtime import _NodeRuntime, _NodeServer

log = logging.getLogger(__name__)

_MAX_BODY_BYTES = 32 * 1024 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)
_CHAT = "/v1/chat/completions"
_EMBEDDINGS = "/v1/embeddings"
_MODEL_PATHS = (_CHAT, _EMBEDDINGS)  # the endpoints that name a model and spend quota
_SERVER_ERRORS = {
    500: ("The server had an error while processing your request.", None),
    502: ("Bad gateway.", "bad_gateway"),
    503: ("The engine is currently overloaded, please try again later.", "overloaded"),
}


class _Handler(ChatAnswers, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "holysheep-sim"
    sys_version = ""
    server: _NodeServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- pipeline -------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        rt = self.server.rt
        path = _normalise_path(self.path)
        self._status = 0
        self._outcome: Optional[str] = None
        self._extra_headers: Tuple[Tuple[str, str], ...] = ()
        self._entry: Optional[_Entry] = None
        self._slot_held = False
        rt.begin(path)
        final = "aborted"
        try:
            final = self._process(rt, method, path)
        except OSError as exc:  # client went away / socket shut down by configure()/stop()
            self.close_connection = True
            log.debug("sim node %s: connection error: %r", rt.cfg.id, exc)
        except Exception:
            self.close_connection = True
            log.exception("sim node %s: unexpected error handling %s %s", rt.cfg.id, method, path)
        finally:
            if self._entry is not None:
                rt.gateway._requests.finish(self._entry, final, self._status)
            rt.end()

    def _process(self, rt: _NodeRuntime, method: str, path: str) -> str:
        try:
            raw = self._read_body()
        except ValueError as exc:
            self.close_connection = True
            self._send(400, _error_body(f"could not read request body: {exc}", "invalid_request_error"))
            return "error_4xx"
        body: Optional[Dict[str, Any]] = None
        if method == "POST" and path in _MODEL_PATHS:
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = None
            body = parsed if isinstance(parsed, dict) else None
        info = request_info(body)
        gateway = rt.gateway
        self._entry = gateway._requests.begin(rt.cfg.id, path, info.model, info.stream, info.prefill)
        decision = gateway._faults.decide(rt.cfg.models, rt.cfg.id, info.model) if body is not None else None
        hang_generation = rt.count_for_hang()
        # capacity is the node's concurrent model work: listing models takes no slot
        slot = path in _MODEL_PATHS
        if gateway._stop_event.is_set() or (slot and not rt.acquire_slot()):
            self._drop()
            return "dropped"
        self._slot_held = slot
        try:
            outcome = self._serve(rt, method, path, raw, body, decision, hang_generation)
        finally:
            self._free_slot(rt)
        rt.outcome(path, outcome)  # only once the answer was written without an OSError
        return outcome

    def _serve(self, rt: _NodeRuntime, method: str, path: str, raw: bytes, body: Optional[Dict[str, Any]],
               decision: Optional[ModelDecision], hang_generation: Optional[int]) -> str:
        """Answer one request; returns its outcome (see :meth:`SimulatedGateway.outcomes`)."""
        cfg = rt.cfg
        fault = cfg.fault
        if fault in ("reset", "refuse"):
            self._reset()
            return "reset"
        if fault == "hang":
            rt.wait_until(lambda: cfg.fault != "hang", cfg.hang_s)
            self._drop()
            return "hang"
        if hang_generation is not None and hang_generation == rt.hang_generation:
            # the node hangs once it has seen hang_after_requests (unless released meanwhile)
            rt.wait_until(lambda: rt.hang_generation != hang_generation, cfg.hang_s)
            self._drop()
            return "hang"
        latency_s, err_roll, err_status, rl_roll, fault_roll = rt.draw()
        plan: Optional[ChatPlan] = None
        plan_error: Optional[_InvalidRequest] = None
        if body is not None and path == _CHAT and method == "POST":
            try:
                plan = plan_chat(body)
            except _InvalidRequest as exc:
                plan_error = exc
        if rt.quota.active:
            refused = self._check_quota(rt, path, body, plan)
            if refused:
                return "rate_limited"
        cache_hit: Optional[bool] = None
        if plan is not None and rt.cache.eligible(cfg, plan.cache_key, plan.cache_prefix_tokens):
            assert plan.cache_key is not None
            cache_hit = rt.cache.contains(plan.cache_key)
            if cache_hit:
                latency_s *= cfg.prompt_cache_latency_factor
        if not rt.sleep(latency_s):
            self._drop()
            return "dropped"
        if fault != "malformed" and fault_roll < cfg.reset_rate:
            self._reset()
            return "reset"
        if fault == "malformed" or fault_roll < cfg.reset_rate + cfg.malformed_rate:
            self._send(200, b'{"choices": [')
            return "malformed"
        if err_roll < cfg.error_rate:
            self._send(
                err_status,
                _error_body(f"simulated upstream error ({err_status})", "server_error", "sim_upstream_error"),
            )
            return "error_5xx"
        if rl_roll < cfg.rate_limit_rate:
            self._send_429("Rate limit reached (simulated)", "rate_limit_error", cfg.retry_after_s)
            return "rate_limited"
        if decision is not None and decision.fault is not None:
            outcome = self._model_fault_before_answer(rt, decision, plan)
            if outcome is not None:
                return outcome
        if path == _CHAT and method == "POST":
            if plan is None:
                self._send(400, _error_body(str(plan_error or _invalid_json(raw)), "invalid_request_error"))
                return "error_4xx"
            key = plan.cache_key

            def cache_commit() -> None:  # when the prompt is accepted, before the answer is written
                if cache_hit is not None and key is not None:
                    rt.cache.record(key, cache_hit)

            released = _released(rt, decision, plan.model)
            self._chat(rt, plan, decision, self._cache_usage(rt, plan, cache_hit), released, cache_commit)
        else:
            self._route(method, path, body, raw)
        if self._outcome is not None:
            return self._outcome
        return "ok" if 200 <= self._status < 300 else "error_4xx"

    def _check_quota(self, rt: _NodeRuntime, path: str, body: Optional[Dict[str, Any]],
                     plan: Optional[ChatPlan]) -> bool:
        """Charge the node's quota; True if it answered 429 (the quota is spent)."""
        charged = path in _MODEL_PATHS
        tokens = plan.total_tokens if plan is not None else embeddings_tokens(body) if path == _EMBEDDINGS else 0
        verdict = rt.quota.admit(tokens, charge=charged)
        self._extra_headers = verdict.headers
        if verdict.allowed:
            return False
        exact_s = verdict.retry_after_s if rt.cfg.quota_retry_after else None
        if exact_s is None:
            self._send_429(verdict.message, verdict.limited_by or "requests", None)
        else:  # Retry-After in whole seconds (rounded up), retry-after-ms exact
            self._send_429(verdict.message, verdict.limited_by or "requests", float(max(1, math.ceil(exact_s - 1e-9))),
                           int(math.ceil(exact_s * 1000 - 1e-6)))
        return True

    def _send_429(self, message: str, err_type: str, retry_after_s: Optional[float],
                  retry_after_ms: Optional[int] = None) -> None:
        headers: Tuple[Tuple[str, str], ...] = ()
        if retry_after_s is not None:
            if retry_after_ms is None:
                retry_after_ms = int(round(float(retry_after_s) * 1000))
            headers = (("Retry-After", _format_retry_after(retry_after_s)), ("retry-after-ms", str(retry_after_ms)))
        self._send(429, _error_body(message, err_type, "rate_limit_exceeded"), headers=headers)

    def _model_fault_before_answer(self, rt: _NodeRuntime, decision: ModelDecision,
                                   plan: Optional[ChatPlan]) -> Optional[str]:
        """Apply a model fault that replaces the answer; None for the in-answer ones."""
        cfg, fault = decision.model, decision.fault
        if fault == "rate_limit":
            name = plan.model if plan is not None else "this model"
            self._send_429(f"Rate limit reached for {name} (simulated).", "rate_limit_error", cfg.retry_after_s)
            return "rate_limited"
        if fault in ("server_error", "flap"):
            status = 503 if fault == "flap" else cfg.fault_status
            message, code = _SERVER_ERRORS.get(status, (f"simulated upstream error ({status})", None))
            self._send(status, _error_body(message, "server_error", code))
            return "error_5xx"
        if fault == "reset":
            self._reset()
            return "reset"
        if fault == "hang":
            model = plan.model if plan is not None else None
            rt.wait_until(_released(rt, decision, model), cfg.fault_duration_s)
            self._drop()
            return "hang"
        if fault == "context_length":
            window = cfg.context_window_tokens or 8192
            prompt = plan.prompt_tokens if plan is not None else 0
            self._send(400, context_length_body(window, max(prompt, window + 1)))
            return "context_length_exceeded"
        if fault == "content_policy":
            self._send(400, content_policy_body())
            return "content_policy_violation"
        return None

    def _cache_usage(self, rt: _NodeRuntime, plan: ChatPlan, hit: Optional[bool]) -> Dict[str, Any]:
        cfg = rt.cfg
        if cfg.prompt_cache_entries <= 0:
            return {}
        cached = plan.cache_prefix_tokens if hit else 0
        written = plan.cache_prefix_tokens if hit is False else 0
        return usage_fields(cfg.prompt_cache_usage, plan.prompt_tokens, cached, written)

    def _route(self, method: str, path: str, body: Optional[Dict[str, Any]], raw: bytes) -> None:
        if path == "/v1/models":
            if method != "GET":
                return self._method_not_allowed(method, path)
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "holysheep-sim"} for m in MODELS]
            self._send(200, _dumps({"object": "list", "data": data}))
        elif path.startswith("/v1/models/"):
            if method != "GET":
                return self._method_not_allowed(method, path)
            model = path[len("/v1/models/") :]
            if model in MODELS:
                self._send(200, _dumps({"id": model, "object": "model", "created": 0, "owned_by": "holysheep-sim"}))
            else:
                self._send(404, _error_body(f"The model '{model}' does not exist", "invalid_request_error",
                                            "model_not_found"))
        elif path in _MODEL_PATHS:  # a chat POST was answered before routing
            if method != "POST":
                return self._method_not_allowed(method, path)
            try:
                answer = embeddings_answer(body if body is not None else parse_json_object(raw))
            except _InvalidRequest as exc:
                self._send(400, _error_body(str(exc), "invalid_request_error"))
                return None
            self._send(200, _dumps(answer))
        else:
            self._send(404, _error_body(f"Unknown request URL: {method} {path}", "invalid_request_error",
                                        "unknown_url"))
        return None

    def _method_not_allowed(self, method: str, path: str) -> None:
        self._send(405, _error_body(f"Method {method} not allowed on {path}", "invalid_request_error"))

    # -- I/O helpers ----------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        n = int(length)  # ValueError -> 400
        if n < 0 or n > _MAX_BODY_BYTES:
            raise ValueError(f"bad Content-Length {n}")
        data = self.rfile.read(n)
        if len(data) < n:
            raise ConnectionError("client closed the connection mid-body")
        return data

    def _read_chunked(self) -> bytes:
        parts: List[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise ConnectionError("client closed the connection mid-body")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > _MAX_BODY_BYTES:
                raise ValueError("request body too large")
            data = self.rfile.read(size)
            if len(data) < size:
                raise ConnectionError("client closed the connection mid-body")
            parts.append(data)
            self.rfile.readline(65537)

    def _head(self, status: int, content_type: str, headers: Sequence[Tuple[str, str]] = ()) -> bytes:
        self._status = status
        lines = [
            f"HTTP/1.1 {status} {_reason(status)}\r\n",
            f"Content-Type: {content_type}\r\n",
            f"x-request-id: req_{os.urandom(12).hex()}\r\n",
            f"x-sim-node: {self.server.rt.cfg.id}\r\n",
        ]
        lines.extend(f"{k}: {v}\r\n" for k, v in self._extra_headers)
        lines.extend(f"{k}: {v}\r\n" for k, v in headers)
        if self.close_connection:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1", "replace")

    def _free_slot(self, rt: _NodeRuntime) -> None:
        if self._slot_held:
            self._slot_held = False
            rt.release_slot()

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Sequence[Tuple[str, str]] = (),
    ) -> None:
        """A whole answer in one write. The capacity slot is given back first: the work
        is done, and a client that reads the answer and sends its next request at once
        must not find the slot still taken (a real server frees it as it answers)."""
        head = self._head(status, content_type, tuple(headers) + (("Content-Length", str(len(body))),))
        self._free_slot(self.server.rt)
        self.wfile.write(head + body)  # one write: no Nagle/delayed-ACK stalls

    def _drop(self) -> None:
        """End the connection without (further) response bytes (FIN)."""
        self.close_connection = True

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0 + close)."""
        self.close_connection = True
        conn = self.connection
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
        try:
            self.rfile.close()  # drop the makefile() reference so close() is real
        except OSError:
            pass
        conn.close()


def _invalid_json(raw: bytes) -> _InvalidRequest:
    """The error a body that is not a JSON object gets."""
    try:
        parse_json_object(raw)
    except _InvalidRequest as exc:
        return exc
    return _InvalidRequest("The request body must be a JSON object.")


def _released(rt: _NodeRuntime, decision: Optional[ModelDecision], model: Optional[str]) -> Callable[[], bool]:
    """A predicate that turns true once the model's setting is configured anew
    (so configure() releases a request held by a model fault)."""
    if decision is None or model is None:
        return lambda: False
    faults, node, held = rt.gateway._faults, rt.cfg, decision.model

    def released() -> bool:
        now = faults.current(node.models, node.id, model)
        return now is None or now.model is not held

    return released
