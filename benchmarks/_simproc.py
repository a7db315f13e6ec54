"""Run a SimulatedGateway in a child process, so its CPU use does not share our GIL.

The parent sends one JSON command per line on the child's stdin and reads one JSON
line back: ``{"configure": [node_id, {field: value}]}``, ``{"counts": null}``,
``{"reset_counts": null}``. Closing stdin stops the gateway.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any, Dict, List

_CHILD = r"""
import json, sys
from holysheep_lb.simulator import SimulatedGateway
spec = json.loads(sys.argv[1])
gw = SimulatedGateway(spec, seed=int(sys.argv[2])).start()
print(json.dumps(gw.client_nodes()), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if "configure" in cmd:
            node_id, changes = cmd["configure"]
            gw.configure(node_id, **changes)
            out = {"ok": True}
        elif "counts" in cmd:
            out = {"ok": gw.counts()}
        elif "reset_counts" in cmd:
            gw.reset_counts()
            out = {"ok": True}
        else:
            out = {"error": "unknown command"}
    except Exception as exc:
        out = {"error": repr(exc)}
    print(json.dumps(out), flush=True)
gw.stop()
"""


class GatewayProcess:
    """A SimulatedGateway in a subprocess; ``client_nodes`` is ready for Client(nodes=...)."""

    def __init__(self, nodes: List[Dict[str, Any]], seed: int = 1) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(nodes), str(seed)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise RuntimeError("simulated gateway process failed to start")
        self.client_nodes = json.loads(line)
        self._lock = threading.Lock()

    def _command(self, cmd: Dict[str, Any]) -> Any:
        with self._lock:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    def configure(self, node_id: str, **changes: Any) -> None:
        self._command({"configure": [node_id, changes]})

    def counts(self) -> Dict[str, int]:
        return self._command({"counts": None})

    def reset_counts(self) -> None:
        self._command({"reset_counts": None})

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            self.proc.kill()

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
