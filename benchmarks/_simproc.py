"""Run a SimulatedGateway in a child process, so its CPU use does not share our GIL.

The parent sends one JSON command per line on the child's stdin and reads one JSON
line back, ``{"ok": result}`` or ``{"error": text}``:

``{"configure": [node_id, {field: value}]}``, ``{"counts": null}``, ``{"reset_counts": null}``,
``{"cache_stats": node_id}``, ``{"quota_stats": node_id}``,
``{"outcomes": [node_id, path or null]}``, ``{"request_count": [node_id, path or null]}``,
``{"max_concurrency_seen": node_id}`` and
``{"request_log": {"node_id": ..., "model": ..., "last": n}}`` (each key optional; the
last ``n`` entries, as dicts of :class:`holysheep_lb.simulator.SimRequest` fields).
Closing stdin stops the gateway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any, Dict, List, Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import dataclasses, json, sys
from holysheep_lb.simulator import SimulatedGateway
spec = json.loads(sys.argv[1])
gw = SimulatedGateway(spec, seed=int(sys.argv[2])).start()
print(json.dumps(gw.client_nodes()), flush=True)


def request_log(args):
    entries = gw.request_log(model=args.get("model"), node_id=args.get("node_id"))
    last = args.get("last")
    if last is not None:
        entries = entries[-int(last):] if last else []
    return [dataclasses.asdict(e) for e in entries]


QUERIES = {
    "counts": lambda _: gw.counts(),
    "cache_stats": gw.cache_stats,
    "quota_stats": gw.quota_stats,
    "outcomes": lambda args: gw.outcomes(args[0], args[1]),
    "request_count": lambda args: gw.request_count(args[0], args[1]),
    "max_concurrency_seen": gw.max_concurrency_seen,
    "request_log": request_log,
}

for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if "configure" in cmd:
            node_id, changes = cmd["configure"]
            gw.configure(node_id, **changes)
            out = {"ok": True}
        elif "reset_counts" in cmd:
            gw.reset_counts()
            out = {"ok": True}
        else:
            names = [name for name in cmd if name in QUERIES]
            if len(names) != 1:
                out = {"error": "unknown command"}
            else:
                out = {"ok": QUERIES[names[0]](cmd[names[0]])}
    except Exception as exc:
        out = {"error": repr(exc)}
    print(json.dumps(out), flush=True)
gw.stop()
"""


class GatewayProcess:
    """A SimulatedGateway in a subprocess; ``client_nodes`` is ready for Client(nodes=...).

    Thread-safe: one command at a time goes over the pipe."""

    def __init__(self, nodes: List[Dict[str, Any]], seed: int = 1) -> None:
        env = dict(os.environ)
        # the child imports this checkout's package, whatever the current directory
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO_ROOT, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(nodes), str(seed)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin = self.proc.stdin
        self._stdout = self.proc.stdout
        line = self._stdout.readline()
        if not line:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise RuntimeError("simulated gateway process failed to start")
        self.client_nodes: List[Dict[str, str]] = json.loads(line)
        self._pipe_lock = threading.Lock()

    def _command(self, cmd: Dict[str, Any]) -> Any:
        with self._pipe_lock:
            self._stdin.write(json.dumps(cmd) + "\n")
            self._stdin.flush()
            line = self._stdout.readline()
        if not line:
            raise RuntimeError(f"simulated gateway process exited (command {next(iter(cmd))!r})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    def configure(self, node_id: str, **changes: Any) -> None:
        self._command({"configure": [node_id, changes]})

    def counts(self) -> Dict[str, int]:
        """Requests per node (every path, health probes included)."""
        return self._command({"counts": None})

    def reset_counts(self) -> None:
        self._command({"reset_counts": None})

    def cache_stats(self, node_id: str) -> Dict[str, int]:
        """The node's prompt cache: ``hits``, ``misses`` and live ``entries``."""
        return self._command({"cache_stats": node_id})

    def quota_stats(self, node_id: str) -> Dict[str, int]:
        """429s the node's quota sent: ``limited_requests`` and ``limited_tokens``."""
        return self._command({"quota_stats": node_id})

    def outcomes(self, node_id: str, path: Optional[str] = None) -> Dict[str, int]:
        return self._command({"outcomes": [node_id, path]})

    def request_count(self, node_id: str, path: Optional[str] = None) -> int:
        return self._command({"request_count": [node_id, path]})

    def max_concurrency_seen(self, node_id: str) -> int:
        return self._command({"max_concurrency_seen": node_id})

    def request_log(self, *, node_id: Optional[str] = None, model: Optional[str] = None,
                    last: Optional[int] = None) -> List[Dict[str, Any]]:
        """The gateway's request log (bounded there), optionally only its ``last`` entries."""
        return self._command({"request_log": {"node_id": node_id, "model": model, "last": last}})

    def close(self) -> None:
        try:
            self._stdin.close()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - a stuck child is killed below
            self.proc.kill()
            self.proc.wait(timeout=10)
        finally:
            self._stdout.close()

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
