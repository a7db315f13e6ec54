"""The HTTP request handler of a simulated node: fault pipeline and endpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from .config import MODELS
from .content import (
    _chunk,
    _dumps,
    _embedding,
    _error_body,
    _format_retry_after,
    _InvalidRequest,
    _normalise_path,
    _prompt_tokens,
    _reason,
    _split_pieces,
    reply_text,
)

if TYPE_CHECKING:
    from .runtime import _NodeRuntime, _NodeServer

log = logging.getLogger(__name__)

_MAX_BODY_BYTES = 32 * 1024 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)


class _Handler(BaseHTTPRequestHandler):
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
        rt.begin(path)
        try:
            self._process(rt, method, path)
        except OSError as exc:  # client went away / socket shut down by configure()/stop()
            self.close_connection = True
            log.debug("sim node %s: connection error: %r", rt.cfg.id, exc)
        except Exception:
            self.close_connection = True
            log.exception("sim node %s: unexpected error handling %s %s", rt.cfg.id, method, path)
        finally:
            rt.end()

    def _process(self, rt: _NodeRuntime, method: str, path: str) -> None:
        try:
            raw = self._read_body()
        except ValueError as exc:
            self.close_connection = True
            self._send(400, _error_body(f"could not read request body: {exc}", "invalid_request_error"))
            return
        if rt.gateway._stop_event.is_set() or not rt.acquire_slot():
            self._drop()
            return
        try:
            outcome = self._serve(rt, method, path, raw)
        finally:
            rt.release_slot()
        rt.outcome(path, outcome)  # only once the answer was written without an OSError

    def _serve(self, rt: _NodeRuntime, method: str, path: str, raw: bytes) -> str:
        """Answer one request; returns its outcome (see :meth:`SimulatedGateway.outcomes`)."""
        cfg = rt.cfg
        fault = cfg.fault
        self._status = 0
        self._stream_broken = False
        if fault in ("reset", "refuse"):
            self._reset()
            return "reset"
        if fault == "hang":
            rt.wait_until(lambda: cfg.fault != "hang", cfg.hang_s)
            self._drop()
            return "hang"
        latency_s, err_roll, err_status, rl_roll, fault_roll = rt.draw()
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
            retry = cfg.retry_after_s
            self._send(
                429,
                _error_body("Rate limit reached (simulated)", "rate_limit_error", "rate_limit_exceeded"),
                headers=(
                    ("Retry-After", _format_retry_after(retry)),
                    ("retry-after-ms", str(int(round(float(retry) * 1000)))),
                ),
            )
            return "rate_limited"
        self._route(rt, method, path, raw)
        if self._stream_broken:
            return "stream_fault"
        return "ok" if 200 <= self._status < 300 else "error_4xx"

    def _route(self, rt: _NodeRuntime, method: str, path: str, raw: bytes) -> None:
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
                self._send(404, _error_body(f"The model '{model}' does not exist", "invalid_request_error", "model_not_found"))
        elif path == "/v1/chat/completions":
            if method != "POST":
                return self._method_not_allowed(method, path)
            try:
                self._chat(rt, raw)
            except _InvalidRequest as exc:
                self._send(400, _error_body(str(exc), "invalid_request_error"))
        elif path == "/v1/embeddings":
            if method != "POST":
                return self._method_not_allowed(method, path)
            try:
                self._embeddings(raw)
            except _InvalidRequest as exc:
                self._send(400, _error_body(str(exc), "invalid_request_error"))
        else:
            self._send(404, _error_body(f"Unknown request URL: {method} {path}", "invalid_request_error", "unknown_url"))

    def _method_not_allowed(self, method: str, path: str) -> None:
        self._send(405, _error_body(f"Method {method} not allowed on {path}", "invalid_request_error"))

    # -- endpoints ------------------------------------------------------------
    @staticmethod
    def _json_object(raw: bytes) -> Dict[str, Any]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            raise _InvalidRequest("We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise _InvalidRequest("The request body must be a JSON object.")
        return body

    def _chat(self, rt: _NodeRuntime, raw: bytes) -> None:
        body = self._json_object(raw)
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
        text = reply_text(model, messages, max_tokens)
        prompt = _prompt_tokens(messages)
        completion = len(text.split())
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        cid = "chatcmpl-" + os.urandom(12).hex()
        created = int(time.time())
        if body.get("stream"):
            opts = body.get("stream_options")
            include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            self._stream(rt, cid, created, model, text, usage if include_usage else None)
            return
        result = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": usage,
        }
        self._send(200, _dumps(result))

    def _stream(
        self,
        rt: _NodeRuntime,
        cid: str,
        created: int,
        model: str,
        text: str,
        usage: Optional[Dict[str, int]],
    ) -> None:
        cfg = rt.cfg
        stream_fault = cfg.stream_fault
        delay_s = max(0.0, float(cfg.chunk_delay_ms)) / 1000.0
        pieces = _split_pieces(text)

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

        events = [event([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])]
        events.extend(event([{"index": 0, "delta": {"content": p}, "finish_reason": None}]) for p in pieces)
        events.append(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if usage is not None:
            events.append(event([], {"usage": usage}))
        events.append(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")

        head = self._head(200, "text/event-stream", (("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked")))
        if stream_fault is None and delay_s <= 0:
            self.wfile.write(head + b"".join(events))
            return
        # events[0] is the role chunk, events[k] the k-th content chunk
        fault_after = min(cfg.stream_fault_after_chunks, len(pieces)) if stream_fault else -1
        self.wfile.write(head)
        for index, data in enumerate(events):
            if index > 0 and delay_s > 0 and not rt.sleep(delay_s):
                self._drop()
                return
            self.wfile.write(data)
            if index == fault_after:
                if delay_s > 0 and not rt.sleep(delay_s):
                    self._drop()
                    return
                self._stream_broken = True
                if stream_fault == "reset_midstream":
                    self._reset()
                else:  # stall_midstream
                    rt.wait_until(lambda: cfg.stream_fault != "stall_midstream", cfg.hang_s)
                    self._drop()
                return

    def _embeddings(self, raw: bytes) -> None:
        body = self._json_object(raw)
        inp = body.get("input")
        if isinstance(inp, str):
            inputs = [inp]
        elif isinstance(inp, list) and inp:
            inputs = [x if isinstance(x, str) else json.dumps(x) for x in inp]
        else:
            raise _InvalidRequest("'input' must be a string or a non-empty array.")
        model = body.get("model")
        model = model if isinstance(model, str) and model else "text-embedding-3-small"
        prompt = sum(max(1, int(math.ceil(len(s) / 4.0))) for s in inputs)
        data = [{"object": "embedding", "index": i, "embedding": _embedding(model, s)} for i, s in enumerate(inputs)]
        self._send(
            200,
            _dumps({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}),
        )

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
        lines.extend(f"{k}: {v}\r\n" for k, v in headers)
        if self.close_connection:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1", "replace")

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: Sequence[Tuple[str, str]] = (),
    ) -> None:
        head = self._head(status, content_type, tuple(headers) + (("Content-Length", str(len(body))),))
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
