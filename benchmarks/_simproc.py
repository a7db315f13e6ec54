"""Run a SimulatedGateway in a child process, so its CPU use does not share our GIL."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Dict, List

_CHILD = r"""
import json, sys
from holysheep_lb.simulator import SimulatedGateway
spec = json.loads(sys.argv[1])
gw = SimulatedGateway(spec, seed=1).start()
print(json.dumps(gw.client_nodes()), flush=True)
sys.stdin.read()          # parent closes stdin to stop us
gw.stop()
"""


class GatewayProcess:
    def __init__(self, nodes: List[Dict[str, Any]]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(nodes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise RuntimeError("simulated gateway process failed to start")
        self.client_nodes = json.loads(line)

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
