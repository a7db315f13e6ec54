"""A throwaway ``redis-server`` on 127.0.0.1 at a free port, for the tests and benchmarks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from typing import Optional

import redis

INSTALL_HINT = ("redis-server is not installed; install it to run the Redis tests "
                "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server --port N --save '' --appendonly no``; :meth:`start` waits for PING.

    :meth:`kill` stops it hard (as a crash would), :meth:`start` again brings it back on
    the same port, empty. Use as a context manager or call :meth:`stop`.
    """

    def __init__(self, binary: Optional[str] = None, port: Optional[int] = None) -> None:
        self.binary = binary or shutil.which("redis-server")
        if self.binary is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        pause = threading.Event()
        try:
            while True:
                try:
                    if probe.ping():
                        return self
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING on port {self.port} "
                                       f"within {timeout_s:g} s")
                pause.wait(0.02)
        finally:
            probe.close()

    def kill(self) -> None:
        """Stop at once (SIGKILL) and wait for the process to end."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
