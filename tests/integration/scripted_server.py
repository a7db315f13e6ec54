"""A raw TCP server on 127.0.0.1 that answers every HTTP request with scripted bytes.

Used where the simulated gateway is too well-behaved: fuzzed responses (any status
line, headers, framing and body), redirects, bodies without Content-Length, TLS. Each
connection gets one answer and is then closed; every wait is bounded.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from typing import Callable, Dict, List, Optional, Union

Script = Union[bytes, Callable[["Request"], bytes]]

_HEAD_LIMIT = 256 * 1024
_IO_TIMEOUT_S = 5.0


class Request:
    """What the server received: method, path, headers (lower-case names), body."""

    def __init__(self, method: str, path: str, headers: Dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body


class ScriptedServer:
    """Answers each request with ``script`` (bytes, or a function of the Request).

    ``requests`` keeps every request received (bounded by what a test sends);
    ``sent_bytes`` counts what was written. Use as a context manager.
    """

    def __init__(self, script: Script = b"", *, tls: Optional[ssl.SSLContext] = None) -> None:
        self.script: Script = script
        self.requests: List[Request] = []
        self.sent_bytes = 0
        self._tls = tls
        self._server_lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._handlers: List[threading.Thread] = []
        self._thread = threading.Thread(target=self._accept_loop, name="scripted-server", daemon=True)

    @property
    def base_url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(_IO_TIMEOUT_S)
        self._sock.close()
        with self._server_lock:
            handlers = list(self._handlers)
        for t in handlers:
            t.join(_IO_TIMEOUT_S)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.05)
            if not ready:
                continue
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="scripted-conn", daemon=True)
            with self._server_lock:
                self._handlers = [h for h in self._handlers if h.is_alive()]
                self._handlers.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(_IO_TIMEOUT_S)
        try:
            if self._tls is not None:
                conn = self._tls.wrap_socket(conn, server_side=True)
            request = _read_request(conn)
            if request is None:
                return
            with self._server_lock:
                self.requests.append(request)
            script = self.script
            data = script(request) if callable(script) else script
            self._send(conn, data)
        except (OSError, ssl.SSLError, ValueError):
            pass  # the client went away, or refused our certificate
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _send(self, conn: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._stop.is_set():
            n = conn.send(view[:65536])
            with self._server_lock:
                self.sent_bytes += n
            view = view[n:]
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _read_request(conn: socket.socket) -> Optional[Request]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > _HEAD_LIMIT:
            raise ValueError("request head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Request(method, path, headers, rest[:length])


def http_response(status: int = 200, body: bytes = b"", *, headers: Optional[Dict[str, str]] = None,
                  content_length: bool = True) -> bytes:
    """A well-formed HTTP/1.1 answer that closes the connection."""
    lines = [f"HTTP/1.1 {status} X"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
