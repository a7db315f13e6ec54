"""Model faults: which :class:`SimModel` applies to a request, and whether its fault fires.

A model is configured on every node (gateway-wide) or on one node; the node's
own setting wins.  Each setting is *armed* when the gateway starts, when
counters are reset and when it is configured: from then on its fault window
opens after ``fault_start_s`` (and, for ``"flap"``, closes ``fault_duration_s``
later) and the first ``fault_attempts`` requests inside the window get the
fault.  Attempts are counted where the setting lives: over all nodes for a
gateway-wide setting, on its node for a node's setting.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

from .config import SimModel

_Scope = Optional[str]  # None: every node; else a node id


@dataclass(frozen=True)
class ModelDecision:
    """The model setting of one request and the fault it gets (None: none)."""

    model: SimModel
    scope: _Scope
    fault: Optional[str]


class _Arm:
    __slots__ = ("armed_at", "attempts")

    def __init__(self, armed_at: float) -> None:
        self.armed_at = armed_at
        self.attempts = 0


def fault_window_open(cfg: SimModel, elapsed_s: float) -> bool:
    """Whether ``cfg``'s fault window is open ``elapsed_s`` after it was armed."""
    if elapsed_s < cfg.fault_start_s:
        return False
    return cfg.fault != "flap" or elapsed_s < cfg.fault_start_s + cfg.fault_duration_s


class ModelFaults:
    """Gateway-wide model settings and the arming state of every setting.  Thread-safe."""

    def __init__(self, models: Mapping[str, SimModel], clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.models: Dict[str, SimModel] = dict(models)  # replaced, never mutated in place
        self._arms: Dict[Tuple[_Scope, str], _Arm] = {}
        self._epoch = clock()

    def current(self, node_models: Mapping[str, SimModel], node_id: str, model: str) -> Optional[ModelDecision]:
        """The setting that applies to ``model`` on a node (no fault decided)."""
        cfg = node_models.get(model)
        if cfg is not None:
            return ModelDecision(cfg, node_id, None)
        cfg = self.models.get(model)
        return None if cfg is None else ModelDecision(cfg, None, None)

    def decide(self, node_models: Mapping[str, SimModel], node_id: str,
               model: Optional[str]) -> Optional[ModelDecision]:
        """Count one request for ``model`` arriving at a node and decide its fault."""
        if model is None:
            return None
        found = self.current(node_models, node_id, model)
        if found is None:
            return None
        cfg = found.model
        if cfg.fault is None:
            return found
        now = self._clock()
        with self._lock:
            arm = self._arms.get((found.scope, model))
            if arm is None:
                arm = self._arms[(found.scope, model)] = _Arm(self._epoch)
            if not fault_window_open(cfg, now - arm.armed_at):
                return found
            arm.attempts += 1
            fires = cfg.fault_attempts is None or arm.attempts <= cfg.fault_attempts
        return ModelDecision(cfg, found.scope, cfg.fault if fires else None)

    def set_model(self, scope: _Scope, model: str, cfg: SimModel) -> None:
        """Re-arm one setting (its value is stored by the caller for a node scope)."""
        with self._lock:
            if scope is None:
                self.models = {**self.models, model: cfg}
            self._arms[(scope, model)] = _Arm(self._clock())

    def rearm_node(self, node_id: str, models: Iterable[str]) -> None:
        """Re-arm every setting of one node (its ``models`` were replaced)."""
        now = self._clock()
        with self._lock:
            for key in [k for k in self._arms if k[0] == node_id]:
                del self._arms[key]
            self._arms.update({(node_id, m): _Arm(now) for m in models})

    def reset(self) -> None:
        """Re-arm everything from now (gateway start, reset_counts)."""
        with self._lock:
            self._arms = {}
            self._epoch = self._clock()
