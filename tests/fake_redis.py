"""Misbehaving Redis servers on 127.0.0.1, for the shared-state tests.

* :class:`FakeRedisServer` speaks RESP and answers each command with whatever a test
  function returns: garbage, a broken handshake, a closed connection.
* :class:`SlowRedisProxy` stands in front of a real ``redis-server`` and holds every
  answer back for ``delay_s`` before passing it on.

Both stop by themselves after ``lifetime_s``; every socket wait is bounded.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from typing import Any, Callable, Deque, List, Optional

_POLL_S = 0.05  # how often blocked threads look at the stop event


def resp(value: Any) -> bytes:
    """``value`` in RESP: None, int, bytes/str, list, dict (a RESP3 map), or :class:`Err`."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, Err):
        return b"-" + value.message.encode() + b"\r\n"
    if isinstance(value, bool):
        return b":1\r\n" if value else b":0\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, (list, tuple)):
        return b"*%d\r\n" % len(value) + b"".join(resp(v) for v in value)
    if isinstance(value, dict):  # a RESP3 map
        return b"%%%d\r\n" % len(value) + b"".join(resp(k) + resp(v) for k, v in value.items())
    raise TypeError(f"cannot encode {value!r}")


class Err:
    """A RESP error reply."""

    def __init__(self, message: str) -> None:
        self.message = message


def healthy_handshake(args: List[bytes]) -> Optional[bytes]:
    """What redis-server answers to the commands redis-py sends on connecting (None: not one of them)."""
    name = args[0].upper()
    if name == b"PING":
        return b"+PONG\r\n"
    if name in (b"CLIENT", b"SELECT", b"AUTH"):
        return b"+OK\r\n"
    if name == b"HELLO":  # redis-py asks for RESP3 (or RESP2) and checks the server agreed
        proto = int(args[1]) if len(args) > 1 else 2
        info = {b"server": b"redis", b"version": b"7.2.0", b"proto": proto, b"id": 1, b"mode": b"standalone",
                b"role": b"master", b"modules": []}
        return resp(info) if proto == 3 else resp([item for pair in info.items() for item in pair])
    return None


class _Stoppable:
    def __init__(self, lifetime_s: float) -> None:
        self._stop = threading.Event()
        self._lifetime_s = lifetime_s
        self._listener: Optional[socket.socket] = None
        self._threads: List[threading.Thread] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.settimeout(_POLL_S)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop, time.monotonic() + self._lifetime_s)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(5)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self, end: float) -> None:
        assert self._listener is not None
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(_POLL_S)
            self._spawn(self._serve, conn, end)
        self._stop.set()

    def _serve(self, conn: socket.socket, end: float) -> None:
        raise NotImplementedError


class FakeRedisServer(_Stoppable):
    """Answers each command (a list of bytes) with ``answer(args)``: RESP bytes, or None
    to close the connection. ``commands`` keeps the last 10,000 command names."""

    def __init__(self, answer: Callable[[List[bytes]], Optional[bytes]], *, lifetime_s: float = 60.0) -> None:
        super().__init__(lifetime_s)
        self.answer = answer
        self.commands: Deque[str] = collections.deque(maxlen=10_000)

    def _serve(self, conn: socket.socket, end: float) -> None:
        buf = b""
        with conn:
            while not self._stop.is_set() and time.monotonic() < end:
                parsed = _parse_command(buf)
                if parsed is None:
                    try:
                        data = conn.recv(65536)
                    except socket.timeout:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                    continue
                args, buf = parsed
                self.commands.append(args[0].decode(errors="replace").upper())
                reply = self.answer(args)
                if reply is None:
                    return
                try:
                    conn.sendall(reply)
                except OSError:
                    return


def _parse_command(buf: bytes):
    """(args, rest) for the first complete RESP array of bulk strings in ``buf``, else None."""
    if not buf.startswith(b"*"):
        if b"\r\n" not in buf:
            return None
        line, rest = buf.split(b"\r\n", 1)
        return line.split(), rest  # an inline command
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    count, pos, args = int(buf[1:end]), end + 2, []
    for _ in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(buf[pos + 1:end])
        start = end + 2
        if len(buf) < start + size + 2:
            return None
        args.append(buf[start:start + size])
        pos = start + size + 2
    return args, buf[pos:]


class SlowRedisProxy(_Stoppable):
    """Passes commands to the Redis at ``upstream_port`` at once and each of its answers
    back ``delay_s`` later (``delay_s`` may be changed while it runs)."""

    def __init__(self, upstream_port: int, delay_s: float, *, lifetime_s: float = 60.0) -> None:
        super().__init__(lifetime_s)
        self.upstream_port = upstream_port
        self.delay_s = delay_s

    def _serve(self, conn: socket.socket, end: float) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:
            conn.close()
            return
        upstream.settimeout(_POLL_S)
        self._spawn(self._pump, conn, upstream, end, False)
        self._pump(upstream, conn, end, True)

    def _pump(self, src: socket.socket, dst: socket.socket, end: float, delayed: bool) -> None:
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                if delayed and self.delay_s > 0:
                    self._stop.wait(self.delay_s)  # a slow server, not a wait for something
                dst.sendall(data)
        except OSError:
            return
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()
