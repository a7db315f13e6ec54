"""A keep-alive HTTP/1.1 server on 127.0.0.1 that answers slowly, and counts open connections.

``delay_s`` passes before each answer; ``byte_interval_s`` sends the answer (status line
and headers included) one byte at a time. Each connection serves requests until the
client closes it, the server stops, or ``max_connection_s`` passes; every wait is short
and bounded, so the server always stops by itself.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from typing import Dict, List, Optional

_POLL_S = 0.02


def json_answer(body: object, *, status: int = 200, head_padding: int = 0) -> bytes:
    """A keep-alive HTTP/1.1 answer carrying ``body`` as JSON; ``head_padding`` bytes of an
    extra header make the head itself long."""
    data = json.dumps(body).encode()
    head = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"{_padding(head_padding)}Connection: keep-alive\r\n\r\n")
    return head.encode("latin-1") + data


def sse_answer(chunks: List[object], *, head_padding: int = 0) -> bytes:
    """An event stream answer (closes the connection when done)."""
    events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    head = f"HTTP/1.1 200 X\r\nContent-Type: text/event-stream\r\n{_padding(head_padding)}Connection: close\r\n\r\n"
    return head.encode("latin-1") + events


def _padding(size: int) -> str:
    return f"X-Padding: {'p' * size}\r\n" if size else ""


class SlowServer:
    """Answers every request with ``answer`` (bytes) after ``delay_s``, at ``byte_interval_s``
    per byte when set. ``requests`` counts requests per path; ``open_connections`` the
    connections accepted and not yet closed. Use as a context manager."""

    def __init__(self, answer: bytes, *, delay_s: float = 0.0, byte_interval_s: Optional[float] = None,
                 max_connection_s: float = 10.0, tls: Optional[ssl.SSLContext] = None) -> None:
        self.answer = answer
        self._tls = tls
        self.delay_s = delay_s
        self.byte_interval_s = byte_interval_s
        self.max_connection_s = max_connection_s
        self.requests: Dict[str, int] = {}
        self.accepted = 0
        self._open = 0
        self._counts_lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._threads: List[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="slow-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}/v1"

    @property
    def open_connections(self) -> int:
        with self._counts_lock:
            return self._open

    def __enter__(self) -> "SlowServer":
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._sock.close()
        with self._counts_lock:
            threads = list(self._threads)
        for t in threads:
            t.join(5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], _POLL_S)
            if not ready:
                continue
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="slow-conn", daemon=True)
            with self._counts_lock:
                self.accepted += 1
                self._open += 1
                self._threads = [h for h in self._threads if h.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        ends = time.monotonic() + self.max_connection_s
        buf = b""
        try:
            if self._tls is not None:
                conn.settimeout(5.0)
                conn = self._tls.wrap_socket(conn, server_side=True)
            while not self._stop.is_set() and time.monotonic() < ends:
                pending = isinstance(conn, ssl.SSLSocket) and conn.pending()
                ready = pending or select.select([conn], [], [], _POLL_S)[0]
                if not ready:
                    continue
                data = conn.recv(65536)
                if not data:
                    return  # the client closed the connection
                buf += data
                while b"\r\n\r\n" in buf:
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value.strip() or 0)
                    if len(rest) < length:
                        break
                    buf = rest[length:]
                    path = head.split(b" ", 2)[1].decode("latin-1")
                    with self._counts_lock:
                        self.requests[path] = self.requests.get(path, 0) + 1
                    if not self._answer(conn, ends):
                        return
        except (OSError, ValueError):
            pass  # the client went away, or refused the certificate
        finally:
            conn.close()
            with self._counts_lock:
                self._open -= 1

    def _answer(self, conn: socket.socket, ends: float) -> bool:
        if self._stop.wait(self.delay_s):
            return False
        if self.byte_interval_s is None:
            conn.sendall(self.answer)
        else:
            for i in range(len(self.answer)):
                if self._stop.wait(self.byte_interval_s) or time.monotonic() > ends:
                    return False
                conn.sendall(self.answer[i:i + 1])
        return b"Connection: close" not in self.answer.split(b"\r\n\r\n", 1)[0]
