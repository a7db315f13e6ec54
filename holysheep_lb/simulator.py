"""A simulated, OpenAI-compatible, multi-node gateway for demos, tests and benchmarks.

:class:`SimulatedGateway` runs one small HTTP/1.1 server per :class:`SimNode` on
``127.0.0.1`` (ephemeral ports).  Every node serves ``/v1/models``,
``/v1/chat/completions`` (incl. SSE streaming) and ``/v1/embeddings`` and can be
reconfigured at runtime (latency, error/429 rates, capacity, fault injection)
through :meth:`SimulatedGateway.configure`.

Responses are deterministic functions of the request (not of the node), so a
request that is retried or failed over to another node produces the same text.

Only the standard library is used.  Nothing is printed and no logging handlers
are installed; diagnostics go to ``logging.getLogger(__name__)`` at DEBUG level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

log = logging.getLogger(__name__)

__all__ = [
    "MODELS",
    "FAULTS",
    "STREAM_FAULTS",
    "SimNode",
    "SimulatedGateway",
    "reply_text",
    "sample_latency_ms",
]

#: Model ids listed by ``GET /v1/models`` (chat accepts any model name).
MODELS: Tuple[str, ...] = (
    "deepseek-v3.2",
    "gemini-2.5-flash",
    "gpt-4.1",
    "claude-sonnet-4.5",
    "text-embedding-3-small",
)
#: Allowed values of :attr:`SimNode.fault`.
FAULTS: Tuple[Optional[str], ...] = (None, "refuse", "hang", "reset", "malformed")
#: Allowed values of :attr:`SimNode.stream_fault`.
STREAM_FAULTS: Tuple[Optional[str], ...] = (None, "reset_midstream", "stall_midstream")

_ERROR_STATUSES = (500, 502, 503)
_Z99 = 2.3263478740408408  # standard normal quantile for p = 0.99
_LATENCY_CAP_FACTOR = 10.0  # lognormal samples are capped at 10 x p99
_POLL_INTERVAL_S = 0.05  # accept-loop poll interval (bounds configure()/stop())
_MAX_WAIT_SLICE_S = 0.5  # condition waits re-check their predicate at least this often
_MAX_BODY_BYTES = 32 * 1024 * 1024
_EMBED_DIM = 8
_SPLIT_RE = re.compile(r"\s*\S+\s*")
_LINGER_RST = struct.pack("ii", 1, 0)


# --------------------------------------------------------------------------- config


@dataclass
class SimNode:
    """Configuration of one simulated node.  All fields (except ``id``) may be
    changed at runtime with :meth:`SimulatedGateway.configure`.

    ``reset_rate`` and ``malformed_rate`` are the probabilities of the ``"reset"``
    and ``"malformed"`` faults per request (one roll decides both, reset first);
    they are drawn from a random stream of their own, so setting them leaves the
    latency/5xx/429 sequence of a seeded gateway unchanged."""

    id: str
    region: str = "local"
    latency_ms: float = 0.0
    p99_latency_ms: Optional[float] = None
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    reset_rate: float = 0.0
    malformed_rate: float = 0.0
    retry_after_s: float = 1.0
    capacity: Optional[int] = None
    fault: Optional[str] = None
    stream_fault: Optional[str] = None
    stream_fault_after_chunks: int = 2
    hang_s: float = 30.0
    chunk_delay_ms: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            _validate_field(f.name, getattr(self, f.name))


_FIELD_NAMES = tuple(f.name for f in fields(SimNode))


def _validate_field(name: str, value: Any) -> None:
    if name == "id":
        if not isinstance(value, str) or not value:
            raise ValueError("SimNode.id must be a non-empty string")
    elif name == "region":
        if not isinstance(value, str):
            raise ValueError("SimNode.region must be a string")
    elif name == "fault":
        if value not in FAULTS:
            raise ValueError(f"SimNode.fault must be one of {FAULTS!r}, got {value!r}")
    elif name == "stream_fault":
        if value not in STREAM_FAULTS:
            raise ValueError(f"SimNode.stream_fault must be one of {STREAM_FAULTS!r}, got {value!r}")
    elif name == "capacity":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"SimNode.capacity must be None or an int >= 0, got {value!r}")
    elif name == "stream_fault_after_chunks":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"SimNode.stream_fault_after_chunks must be an int >= 0, got {value!r}")
    elif name == "p99_latency_ms":
        if value is not None and not _is_number(value):
            raise ValueError(f"SimNode.p99_latency_ms must be None or a number, got {value!r}")
    elif name in ("latency_ms", "retry_after_s", "hang_s", "chunk_delay_ms"):
        if not _is_number(value) or value < 0:
            raise ValueError(f"SimNode.{name} must be a number >= 0, got {value!r}")
    elif name in ("error_rate", "rate_limit_rate", "reset_rate", "malformed_rate"):
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"SimNode.{name} must be a number in [0, 1], got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_node(spec: Union[SimNode, Mapping[str, Any]]) -> SimNode:
    if isinstance(spec, SimNode):
        return spec
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(_FIELD_NAMES))
        if unknown:
            raise ValueError(f"unknown SimNode field(s): {', '.join(unknown)}")
        return SimNode(**dict(spec))
    raise TypeError(f"node spec must be a SimNode or a dict, got {type(spec).__name__}")


# ------------------------------------------------------------- deterministic content


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
    """The assistant text the simulator returns for a chat request.

    ``"[<model>] Echo: <first 200 chars of the last user message>"``; with
    ``max_tokens`` the whitespace-separated words are truncated to that many."""
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


def _prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    chars = sum(len(_content_text(m.get("content"))) for m in messages)
    return int(math.ceil(chars / 4.0)) + 4 * len(messages)


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


# --------------------------------------------------------------------- node runtime


class _NodeRuntime:
    """Mutable runtime state of one node (sockets, counters, waits)."""

    def __init__(self, gateway: "SimulatedGateway", cfg: SimNode, rng: random.Random,
                 fault_rng: random.Random) -> None:
        self.gateway = gateway
        self.cfg = cfg
        self.rng = rng
        self.fault_rng = fault_rng
        self.rng_lock = threading.Lock()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.port: Optional[int] = None
        self.sock: Optional[socket.socket] = None  # bound; listening iff server is not None
        self.server: Optional[_NodeServer] = None
        self.thread: Optional[threading.Thread] = None
        self.conns: set = set()
        self.total = 0
        self.by_path: Dict[str, int] = {}
        self.outcomes: Dict[Tuple[str, str], int] = {}  # (path, outcome) -> count
        self.in_flight = 0
        self.in_service = 0
        self.max_seen = 0

    # -- counters -------------------------------------------------------------
    def begin(self, path: str) -> None:
        with self.lock:
            self.total += 1
            self.by_path[path] = self.by_path.get(path, 0) + 1
            self.in_flight += 1

    def outcome(self, path: str, what: str) -> None:
        with self.lock:
            key = (path, what)
            self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def end(self) -> None:
        with self.cond:
            self.in_flight -= 1
            if self.gateway._stop_event.is_set():
                self.cond.notify_all()

    def acquire_slot(self) -> bool:
        """Take a capacity slot; False if the gateway stops while queued."""
        stop = self.gateway._stop_event
        with self.cond:
            while True:
                if stop.is_set():
                    return False
                cap = self.cfg.capacity
                if cap is None or self.in_service < cap:
                    break
                self.cond.wait(_MAX_WAIT_SLICE_S)
            self.in_service += 1
            if self.in_service > self.max_seen:
                self.max_seen = self.in_service
            return True

    def release_slot(self) -> None:
        with self.cond:
            self.in_service -= 1
            if self.cfg.capacity is not None:
                self.cond.notify_all()

    # -- waits ----------------------------------------------------------------
    def wait_until(self, released: Callable[[], bool], timeout_s: float) -> None:
        """Block until ``released()``, the gateway stops or ``timeout_s`` passes."""
        stop = self.gateway._stop_event
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        with self.cond:
            while not (stop.is_set() or released()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.cond.wait(min(remaining, _MAX_WAIT_SLICE_S))

    def sleep(self, seconds: float) -> bool:
        """Sleep, interruptible by stop(); True if the full time elapsed."""
        stop = self.gateway._stop_event
        if seconds <= 0:
            return not stop.is_set()
        return not stop.wait(seconds)

    def draw(self) -> Tuple[float, float, int, float, float]:
        """(latency_s, error roll, error status, 429 roll, fault roll) - always the
        same draws (the fault roll from its own stream)."""
        cfg = self.cfg
        with self.rng_lock:
            latency_ms = sample_latency_ms(self.rng, cfg.latency_ms, cfg.p99_latency_ms)
            err_roll = self.rng.random()
            err_status = _ERROR_STATUSES[self.rng.randrange(len(_ERROR_STATUSES))]
            rl_roll = self.rng.random()
            fault_roll = self.fault_rng.random()
        return latency_ms / 1000.0, err_roll, err_status, rl_roll, fault_roll

    # -- sockets (called under the gateway admin lock) --------------------------
    def reserve(self, port: int) -> None:
        host = self.gateway.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.port = sock.getsockname()[1]

    def listen(self) -> None:
        assert self.sock is not None and self.server is None
        server = _NodeServer(self, self.sock)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name=f"holysheep-sim-{self.cfg.id}",
            daemon=True,
        )
        thread.start()
        self.server, self.thread = server, thread
        log.debug("sim node %s listening on %s:%s", self.cfg.id, self.gateway.host, self.port)

    def unlisten(self, rebind: bool) -> None:
        """Stop accepting, close the listening socket (pending connections are
        refused/reset), then either re-reserve the same port (bound, not
        listening -> ECONNREFUSED) or release it; finally close all established
        connections of this node."""
        server, thread = self.server, self.thread
        self.server = self.thread = None
        if server is not None:
            server.shutdown()  # returns within ~_POLL_INTERVAL_S
            server.server_close()  # closes self.sock
            if thread is not None:
                thread.join(1.0)
        elif self.sock is not None:
            self.sock.close()
        self.sock = None
        if rebind and self.port is not None:
            self.reserve(self.port)
        self.close_conns()
        log.debug("sim node %s stopped listening (rebind=%s)", self.cfg.id, rebind)

    def track(self, conn: socket.socket) -> None:
        with self.lock:
            self.conns.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self.lock:
            self.conns.discard(conn)

    def close_conns(self) -> None:
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv
            except OSError:
                pass


# --------------------------------------------------------------------- HTTP server


class _NodeServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # never join handler threads (some may hang)
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, rt: _NodeRuntime, sock: socket.socket) -> None:
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()  # replace the unbound socket TCPServer created
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.rt = rt
        try:
            self.server_activate()
        except BaseException:
            self.socket = socket.socket(sock.family)  # don't let a later close hit the reserved socket
            self.socket.close()
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        self.rt.track(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.rt.untrack(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("sim node %s: error while handling %s", self.rt.cfg.id, client_address, exc_info=True)


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


# ------------------------------------------------------------------------ gateway


class SimulatedGateway:
    """Several simulated OpenAI-compatible nodes, one HTTP server (port) each.

    Usage::

        with SimulatedGateway([SimNode("a", region="us"), {"id": "b", "latency_ms": 20}], seed=1) as gw:
            client = Client(nodes=gw.client_nodes())
            gw.configure("a", fault="refuse")
    """

    def __init__(
        self,
        nodes: Sequence[Union[SimNode, Mapping[str, Any]]],
        *,
        seed: Optional[int] = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.seed = seed
        self.nodes: List[SimNode] = [_as_node(n) for n in nodes]
        if not self.nodes:
            raise ValueError("SimulatedGateway needs at least one node")
        self._rts: Dict[str, _NodeRuntime] = {}
        for index, node in enumerate(self.nodes):
            if node.id in self._rts:
                raise ValueError(f"duplicate node id {node.id!r}")
            rng = random.Random() if seed is None else random.Random(f"holysheep-sim:{seed}:{index}:{node.id}")
            fault_rng = random.Random() if seed is None else random.Random(f"holysheep-sim-faults:{seed}:{index}:{node.id}")
            self._rts[node.id] = _NodeRuntime(self, node, rng, fault_rng)
        self._admin = threading.RLock()
        self._stop_event = threading.Event()
        self._started = False
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "SimulatedGateway":
        """Bind every node to an ephemeral port and start serving (nodes with
        ``fault="refuse"`` keep their port reserved but refuse connections)."""
        with self._admin:
            if self._stopped:
                raise RuntimeError("SimulatedGateway was stopped; create a new one")
            if self._started:
                return self
            try:
                for rt in self._rts.values():
                    rt.reserve(0)
                    if rt.cfg.fault != "refuse":
                        rt.listen()
            except BaseException:
                self._started = True
                self.stop(timeout_s=1.0)
                raise
            self._started = True
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop all nodes: release hanging/stalled/queued handlers, close the
        listening sockets and all client connections.  Bounded and idempotent."""
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        with self._admin:
            if self._stopped:
                return
            self._stopped = True
            self._stop_event.set()
            if not self._started:
                return
            for rt in self._rts.values():
                with rt.cond:
                    rt.cond.notify_all()
            for rt in self._rts.values():
                try:
                    rt.unlisten(rebind=False)
                except Exception:  # pragma: no cover - best effort
                    log.debug("sim node %s: error while stopping", rt.cfg.id, exc_info=True)
            for rt in self._rts.values():
                with rt.cond:
                    while rt.in_flight > 0:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        rt.cond.wait(min(remaining, _POLL_INTERVAL_S))
                rt.close_conns()
            leftover = {rt.cfg.id: rt.in_flight for rt in self._rts.values() if rt.in_flight}
            if leftover:
                log.debug("SimulatedGateway.stop(): requests still finishing: %s", leftover)

    def __enter__(self) -> "SimulatedGateway":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._started and not self._stopped

    # -- addressing -----------------------------------------------------------
    def _rt(self, node_id: str) -> _NodeRuntime:
        try:
            return self._rts[node_id]
        except KeyError:
            raise KeyError(f"unknown node id {node_id!r}") from None

    def port(self, node_id: str) -> int:
        rt = self._rt(node_id)
        if rt.port is None:
            raise RuntimeError("SimulatedGateway is not started")
        return rt.port

    def base_url(self, node_id: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port(node_id)}/v1"

    def client_nodes(self) -> List[Dict[str, str]]:
        return [{"id": n.id, "region": n.region, "base_url": self.base_url(n.id)} for n in self.nodes]

    # -- runtime configuration ----------------------------------------------
    def configure(self, node_id: str, **changes: Any) -> None:
        """Change SimNode fields of a running (or not yet started) node.

        ``fault="refuse"`` closes the listening socket and all established
        connections (the port stays reserved, so new connections get
        ECONNREFUSED); setting it back re-listens on the same port.  Clearing
        ``fault="hang"`` / ``stream_fault="stall_midstream"`` releases requests
        currently blocked by them."""
        rt = self._rt(node_id)
        unknown = sorted(k for k in changes if k not in _FIELD_NAMES)
        if unknown:
            raise ValueError(f"unknown SimNode field(s): {', '.join(unknown)}")
        if "id" in changes and changes["id"] != rt.cfg.id:
            raise ValueError("SimNode field 'id' cannot be changed")
        for name, value in changes.items():
            _validate_field(name, value)
        with self._admin:
            with rt.cond:
                for name, value in changes.items():
                    setattr(rt.cfg, name, value)
                rt.cond.notify_all()
            if self._started and not self._stopped:
                if rt.cfg.fault == "refuse" and rt.server is not None:
                    rt.unlisten(rebind=True)
                elif rt.cfg.fault != "refuse" and rt.server is None:
                    if rt.sock is None:
                        rt.reserve(rt.port or 0)
                    rt.listen()
        log.debug("sim node %s configured: %r", node_id, changes)

    # -- statistics -----------------------------------------------------------
    def request_count(self, node_id: str, path: Optional[str] = None) -> int:
        rt = self._rt(node_id)
        with rt.lock:
            if path is None:
                return rt.total
            return rt.by_path.get(_normalise_path(path), 0)

    def counts(self) -> Dict[str, int]:
        result = {}
        for node_id, rt in self._rts.items():
            with rt.lock:
                result[node_id] = rt.total
        return result

    def outcomes(self, node_id: str, path: Optional[str] = None) -> Dict[str, int]:
        """How the node's answers ended, by outcome: ``ok`` (2xx), ``error_4xx``,
        ``error_5xx``, ``rate_limited``, ``malformed``, ``reset``, ``hang`` (held, then
        dropped), ``stream_fault`` or ``dropped`` (the gateway stopped); only answers
        written without a socket error count.  ``path`` (e.g. ``"/v1/models"``)
        restricts it to one endpoint."""
        rt = self._rt(node_id)
        with rt.lock:
            items = list(rt.outcomes.items())
        path = None if path is None else _normalise_path(path)
        result: Dict[str, int] = {}
        for (p, what), n in items:
            if path is None or p == path:
                result[what] = result.get(what, 0) + n
        return result

    def reset_counts(self) -> None:
        """Zero the request and outcome counters and max_concurrency_seen of every node."""
        for rt in self._rts.values():
            with rt.lock:
                rt.total = 0
                rt.by_path = {}
                rt.outcomes = {}
                rt.max_seen = rt.in_service

    def in_flight(self, node_id: str) -> int:
        """Requests received by the node and not yet finished (incl. queued)."""
        rt = self._rt(node_id)
        with rt.lock:
            return rt.in_flight

    def max_concurrency_seen(self, node_id: str) -> int:
        """Max number of requests concurrently in service (holding a capacity
        slot) since start / the last reset_counts()."""
        rt = self._rt(node_id)
        with rt.lock:
            return rt.max_seen

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._stopped else "new")
        return f"<SimulatedGateway {state} nodes={[n.id for n in self.nodes]}>"
