"""Runtime state of one node: load, latency, counters, ejection, throttling, health.

A ``NodeState`` is not locked by itself: every read and write happens under the
selector's lock (``Selector._state_lock``), which guards all routing state at once so
that a pick sees one consistent picture. Methods here are O(1) bookkeeping.

Availability rules (each with its reason, shown by ``Client.nodes()``):

* **throttled**: a 429 arrived with Retry-After; the node is skipped until then. A 429
  never counts as a failure and never ejects.
* **ejected**: ``eject_after_failures`` consecutive failures (connect error, timeout,
  5xx, invalid response) eject the node for ``base × times_ejected`` seconds, capped and
  jittered. When that expires the node is *half-open*: one trial request is let
  through; success re-admits it, failure ejects it again for longer.
* **down**: the health checker saw ``unhealthy_threshold`` failed probes in a row; it
  comes back after ``healthy_threshold`` good ones.
* **hung**: its oldest unanswered request has waited longer than ``HangPolicy``'s
  threshold (``factor`` × its usual latency, at least ``floor_s``) and it has answered
  nothing for as long. It gets no new request while any of its requests is still
  unanswered; once they have all ended (timed out) it gets one trial at a time, and
  its first answer (a success, an HTTP error, a first chunk or a good probe) clears it.
* **quota**: its ``x-ratelimit-*`` headers say it is (nearly) out of requests or tokens
  (``quota.py``); it counts as throttled until the estimate climbs back.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Dict, List, Mapping, Optional

from . import forksafe
from .concurrency import ConcurrencyLimit
from .config import Node
from .hangs import DEFAULT_HANG_POLICY, HangPolicy
from .quota import NodeQuota
from .stats import FAILURE_KINDS, SYSTEM_FAILURE_KINDS, LatencyHistogram
from .transport import Transport

__all__ = ["NodeState", "EjectionPolicy", "HangPolicy"]

# Failure kinds that count towards ejection (429 and other 4xx do not).
_EJECTING_KINDS = SYSTEM_FAILURE_KINDS
# The failure penalty doubles the estimate; without a ceiling ~1000 fast failures (an
# outage under load) overflow it to inf, then NaN, and routing breaks for good.
_FAILURE_PENALTY_CAP_MS = 600_000.0


class EjectionPolicy:
    """Passive ejection settings (Envoy outlier detection defaults: 5 failures, 30 s, 300 s)."""

    __slots__ = ("after_failures", "base_s", "max_s", "jitter", "slow_start_s")

    def __init__(self, after_failures: int = 5, base_s: float = 30.0, max_s: float = 300.0,
                 jitter: float = 0.1, slow_start_s: float = 0.0) -> None:
        self.after_failures = after_failures
        self.base_s = base_s
        self.max_s = max_s
        self.jitter = jitter
        self.slow_start_s = slow_start_s

    def duration_s(self, times_ejected: int, rand: float) -> float:
        """base × times ejected, capped, then ±jitter so ejected nodes do not return in step."""
        span = min(self.max_s, self.base_s * times_ejected)
        return span * (1.0 + self.jitter * (2.0 * rand - 1.0))


class NodeState:
    """Everything the client knows about one node right now. Guarded by the selector lock."""

    def __init__(self, node: Node, transport: Transport, *, tau_s: float = 10.0,
                 cold_latency_ms: float = 1000.0) -> None:
        self.node = node
        self.id = node.id
        self.region = node.region
        self.weight = float(node.weight)
        self.transport = transport
        # load and latency
        self.in_flight = 0
        self.awaiting = 0                 # attempts sent and not yet answered
        self.awaiting_started_sum = 0.0   # sum of their start times (for their mean age)
        self._awaiting_starts: List[float] = []  # their start times, sorted: [0] is the oldest
        # start time -> in flight when sent (that one included), one per attempt sent then
        self._sent_load: Dict[float, List[int]] = {}
        self.last_answer_at: Optional[float] = None  # last success, HTTP answer, first chunk or good probe
        self.hung_since: Optional[float] = None
        self.hung_cut_at: Optional[float] = None  # when its stuck calls were last cut
        self.hung_rescued = 0  # calls cut free of it
        self._usual_latency_ms: Optional[float] = None  # for the hang threshold, refreshed now and then
        self.concurrency = ConcurrencyLimit()
        self.quota = NodeQuota()
        self.quota_until = 0.0        # out of quota (x-ratelimit-*) until then
        self.retry_after_until = 0.0  # a 429's Retry-After until then
        self.tau_s = tau_s
        self.cold_latency_ms = cold_latency_ms
        self.ewma_ms: Optional[float] = None      # peak-EWMA of real request latency
        self.ewma_at = 0.0
        self.mean_ms: Optional[float] = None      # plain EWMA of the same samples: typical latency
        self.probe_ewma_ms: Optional[float] = None  # EWMA of health-probe latency
        self.last_sample_at: Optional[float] = None
        # counters
        self.attempts = 0
        self.successes = 0
        self.failures: Dict[str, int] = dict.fromkeys(FAILURE_KINDS, 0)
        self.retries = 0
        self.latency = LatencyHistogram()
        # ejection and throttling
        self.consecutive_failures = 0
        self.times_ejected = 0
        self.ejected_until: Optional[float] = None  # None: not ejected
        self.trial_in_flight = False                # half-open trial request running
        self.trial_started: Optional[float] = None  # its pick time: identifies its outcome
        self.readmitted_at: Optional[float] = None
        self.throttled_until = 0.0
        # active health
        self.down = False
        self.probe_failures_in_row = 0
        self.probe_successes_in_row = 0
        self.probes = 0
        self.probe_errors = 0
        self.last_probe_at: Optional[float] = None
        self.last_probe_ok: Optional[bool] = None
        self.last_probe_error: Optional[str] = None
        forksafe.register(self)

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """The parent's calls and trial request do not exist in a child: nothing is in flight
        (nor waits, so nothing hangs). What the node taught (latency, concurrency limit,
        quota readings) holds in the child too."""
        self.in_flight = 0
        self.awaiting = 0
        self.awaiting_started_sum = 0.0
        self.forget_waiting()
        self.end_trial()

    def __repr__(self) -> str:
        return f"<NodeState {self.id} region={self.region} in_flight={self.in_flight}>"

    # -- availability --------------------------------------------------------------

    def unusable_reason(self, now: float) -> Optional[str]:
        """Why this node must not get a normal request now, or None if it may."""
        if self.down:
            return "down"
        if self.ejected_until is not None:
            if now < self.ejected_until:
                return "ejected"
            if self.trial_in_flight:
                return "half-open trial in flight"
        if now < self.throttled_until:
            return "throttled" if now < self.retry_after_until else "quota"
        if self.hung_since is not None and self.awaiting:
            return "hung"
        return None

    # -- hangs -----------------------------------------------------------------------------

    def oldest_unanswered_s(self, now: float) -> Optional[float]:
        return (now - self._awaiting_starts[0]) if self._awaiting_starts else None

    def hang_threshold_s(self, policy: HangPolicy) -> float:
        usual_ms = self._usual_latency_ms
        if usual_ms is None or self.successes < policy.min_samples:
            usual_ms = self.mean_ms if self.mean_ms is not None and self.successes >= policy.min_samples \
                else self.cold_latency_ms
        return max(policy.floor_s, policy.factor * usual_ms / 1000.0)

    def check_hung(self, now: float, policy: HangPolicy) -> bool:
        """Whether the node is hung now (sets ``hung_since`` when it becomes so). O(1)."""
        if self.hung_since is not None:
            return True
        if not self._awaiting_starts:
            return False
        threshold_s = self.hang_threshold_s(policy)
        waiting = self._awaiting_starts  # sorted: the min_waiting-th oldest decides
        if len(waiting) < policy.min_waiting or now - waiting[policy.min_waiting - 1] <= threshold_s:
            return False
        if self.last_answer_at is not None and now - self.last_answer_at <= threshold_s:
            return False
        self.hung_since = now
        return True

    def due_for_cut(self, now: float, policy: HangPolicy) -> bool:
        """Hung, with unanswered requests past the threshold not yet cut (marks them cut)."""
        if not policy.rescue or self.hung_since is None or not self._awaiting_starts:
            return False
        oldest = self._awaiting_starts[0]
        if self.hung_cut_at is not None:
            if oldest < self.hung_cut_at:
                return False  # cut already: their attempts are failing over
            if now - oldest <= self.hang_threshold_s(policy):
                return False  # a trial sent since the last cut has not waited long enough yet
        self.hung_cut_at = now
        return True

    def forget_waiting(self) -> None:
        """After a fork: the parent's requests do not exist in this process."""
        self._awaiting_starts.clear()
        self._sent_load.clear()
        self.hung_since = self.hung_cut_at = None

    def mark_answered(self, now: float) -> None:
        self.last_answer_at = now
        self.hung_since = None

    # -- quotas ----------------------------------------------------------------------------

    def observe_quota(self, headers: Optional[Mapping[str, str]], now: float) -> None:
        """Read a response's x-ratelimit-* headers; the node counts as throttled while
        (nearly) out of quota."""
        if headers:
            self.quota.observe(headers, now, pending=self.awaiting)
            self._update_quota_until(now)

    def _update_quota_until(self, now: float) -> None:
        self.quota_until = self.quota.blocked_until(now)
        self.throttled_until = max(self.retry_after_until, self.quota_until)

    def is_half_open(self, now: float) -> bool:
        return self.ejected_until is not None and now >= self.ejected_until

    def effective_weight(self, now: float, slow_start_s: float) -> float:
        """Weight ramped from 10% to 100% over slow_start_s after re-admission (Envoy)."""
        if slow_start_s <= 0 or self.readmitted_at is None:
            return self.weight
        elapsed = now - self.readmitted_at
        if elapsed >= slow_start_s:
            self.readmitted_at = None
            return self.weight
        return self.weight * (0.1 + 0.9 * max(0.0, elapsed) / slow_start_s)

    # -- latency -----------------------------------------------------------------------

    def latency_estimate_ms(self, now: float) -> float:
        """Peak-EWMA of real latency, decayed towards 0 with time since the last sample.

        The decay lets a node that was slow win a request again after a while (the
        exploration that notices recovery). A node with no request sample yet starts
        from its probe latency if any, else from a pessimistic cold guess.
        """
        return self._with_waiting(self._decayed(self.ewma_ms, now), now)

    def typical_latency_ms(self, now: float, decayed: bool = True) -> float:
        """Plain EWMA of real latency (decayed the same way): robust to single outliers.

        The peak-EWMA jumps on every slow sample, which is right for weighing load but
        too twitchy to decide which nodes are "about as fast as the best": client-side
        jitter alone would push nodes of equal speed in and out of that set.
        ``decayed=False``: what the samples said, before time without samples lowered it
        (the same as decayed for a node with no sample yet).
        """
        if not decayed and self.mean_ms is not None:
            return self._with_waiting(self.mean_ms, now)
        return self._with_waiting(self._decayed(self.mean_ms, now), now)

    def _decayed(self, value: Optional[float], now: float) -> float:
        if value is None:
            return max(self.probe_ewma_ms, 1.0) if self.probe_ewma_ms is not None else self.cold_latency_ms
        idle = now - self.ewma_at
        return value if idle <= 0 else value * math.exp(-idle / self.tau_s)

    def _with_waiting(self, estimate: float, now: float) -> float:
        if self.awaiting:
            # Requests still unanswered are evidence too: a node that hangs has no new
            # samples until its first timeout, but the mean age of its waiting requests
            # grows at once, and they will take at least that long.
            waited_ms = (now - self.awaiting_started_sum / self.awaiting) * 1000.0
            if waited_ms > estimate:
                return waited_ms
        return estimate

    def start_waiting(self, started: float) -> None:
        """An attempt was sent at ``started`` (after ``in_flight`` counted it)."""
        loads = self._sent_load.get(started)
        if loads is None:
            self._sent_load[started] = [self.in_flight]
        else:  # attempts sent at the same clock reading (a coarse clock): one each
            loads.append(self.in_flight)
        self.awaiting += 1
        self.awaiting_started_sum += started
        starts = self._awaiting_starts
        if not starts or started >= starts[-1]:
            starts.append(started)  # the usual case: picks come in time order
        else:
            bisect.insort(starts, started)

    def sent(self) -> None:
        """A request is about to be sent (after a pick): it spends quota. The next pick's
        ``refresh_quota`` accounts for it (this pick's wait, if any, must not)."""
        if self.quota.readings:
            self.quota.on_send()

    def refresh_quota(self, now: float) -> None:
        if self.quota.readings:
            self._update_quota_until(now)

    def stop_waiting(self, started: float) -> Optional[int]:
        """The attempt sent at ``started`` was answered or ended; returns how many requests
        the node had in flight when it was sent (that one included), if known: the load
        a request meets is the one it queues behind, not the one found when it returns
        (a slow answer collects requests while it runs, which would read as queueing)."""
        loads = self._sent_load.get(started)
        sent_load = None
        if loads:
            sent_load = loads.pop(0)  # the first sent then: the first a FIFO server answers
            if not loads:
                del self._sent_load[started]
        starts = self._awaiting_starts
        i = bisect.bisect_left(starts, started)
        if i < len(starts) and starts[i] == started:
            del starts[i]
        self.awaiting -= 1
        if self.awaiting <= 0:
            self.awaiting = 0
            self.awaiting_started_sum = 0.0  # exact reset: no float drift accumulates
            starts.clear()
            self._sent_load.clear()
        else:
            self.awaiting_started_sum -= started
        return sent_load

    def observe_latency(self, latency_ms: float, now: float) -> None:
        """Peak-EWMA update: a slower sample replaces the estimate at once; faster ones decay in.

        The plain EWMA moves by the same time-based weight, but by at least 2% per
        sample, so that at high request rates it still averages about 50 samples.

        Both start from what the samples said, not from the estimate decayed for time
        without samples: that decay is read-time optimism (a node that was slow gets
        tried again), and folding it into the average would bias a sparsely sampled
        node low (by nearly half at one sample per 2 s), pulling a slower region into
        the band of the fastest nodes.
        """
        self.last_sample_at = now
        if self.ewma_ms is None or self.mean_ms is None:
            self.ewma_ms = self.mean_ms = latency_ms
        else:
            peak, mean = self.ewma_ms, self.mean_ms
            w = math.exp(-max(0.0, now - self.ewma_at) / self.tau_s)
            self.ewma_ms = latency_ms if latency_ms > peak else peak * w + latency_ms * (1.0 - w)
            alpha = max(0.02, 1.0 - w)
            self.mean_ms = mean + alpha * (latency_ms - mean)
        self.ewma_at = now

    def observe_probe(self, latency_ms: float) -> None:
        if self.probe_ewma_ms is None:
            self.probe_ewma_ms = latency_ms
        else:
            self.probe_ewma_ms = 0.7 * self.probe_ewma_ms + 0.3 * latency_ms

    # -- outcomes ----------------------------------------------------------------------

    def record_success(self, latency_ms: float, now: float, is_trial: bool = False,
                       in_flight: Optional[int] = None) -> bool:
        """Count a success; returns True if it re-admitted an ejected node.

        Only the half-open trial re-admits: a slow request sent before the node was
        ejected says nothing about how it is now. ``in_flight``: the node's requests in
        flight when it answered, this one included (teaches its concurrency limit).
        """
        self.successes += 1
        self.latency.record(latency_ms)
        self.observe_latency(latency_ms, now)
        self.mark_answered(now)
        if in_flight is not None:
            self.concurrency.observe(in_flight, latency_ms, now)
        if self.successes % DEFAULT_HANG_POLICY.refresh_every == 0 or self._usual_latency_ms is None:
            p99 = self.latency.percentile(99) if self.successes % DEFAULT_HANG_POLICY.refresh_every == 0 else None
            usual = self.mean_ms or latency_ms
            self._usual_latency_ms = max(usual, 0.5 * p99) if p99 is not None else usual
        self.consecutive_failures = 0
        if is_trial and self.ejected_until is not None:
            self.readmit(now)
            return True
        return False

    def readmit(self, now: float) -> None:
        self.ejected_until = None
        self.trial_in_flight = False
        self.trial_started = None
        self.readmitted_at = now

    def end_trial(self) -> None:
        self.trial_in_flight = False
        self.trial_started = None

    def record_failure(self, kind: str, latency_ms: float, now: float,
                       policy: EjectionPolicy, rand: float,
                       retry_after_s: Optional[float] = None, is_trial: bool = False) -> Optional[float]:
        """Count a failure; returns the ejection duration if this failure ejected the node."""
        self.failures[kind] = self.failures.get(kind, 0) + 1
        if kind.startswith("status_") or kind == "invalid_response":
            self.mark_answered(now)  # an answer, if not a good one: the node does not hang
        if kind == "status_429":
            # Throttled, not broken: the node answered. Skip it until Retry-After
            # (1 s when it did not say), and leave its failure streak alone.
            wait_s = retry_after_s if retry_after_s is not None else 1.0
            self.retry_after_until = max(self.retry_after_until, now + wait_s)
            self.throttled_until = max(self.throttled_until, self.retry_after_until)
            if is_trial:
                self.end_trial()
            return None
        if kind not in _EJECTING_KINDS:
            if is_trial:
                self.end_trial()
            return None
        # A failure is a latency sample too: at least twice the estimate, so a node
        # that fails fast does not look attractive to the adaptive strategy.
        penalty_ms = min(2.0 * self.latency_estimate_ms(now), _FAILURE_PENALTY_CAP_MS)
        self.observe_latency(max(latency_ms, penalty_ms, 250.0), now)
        if self.ejected_until is not None and not is_trial:
            return None  # a request from before the ejection: the node is already out
        self.consecutive_failures += 1
        if is_trial or self.consecutive_failures >= policy.after_failures:
            self.times_ejected += 1
            span = policy.duration_s(self.times_ejected, rand)
            self.ejected_until = now + span
            self.end_trial()
            self.consecutive_failures = 0
            return span
        return None

    def record_probe(self, ok: bool, latency_ms: Optional[float], now: float,
                     unhealthy_threshold: int, healthy_threshold: int,
                     error: Optional[str] = None) -> Optional[str]:
        """Count a probe; returns "down" or "up" when it changed the node's health."""
        self.probes += 1
        self.last_probe_at = now
        self.last_probe_ok = ok
        self.last_probe_error = error
        if ok:
            self.mark_answered(now)
            if latency_ms is not None:
                self.observe_probe(latency_ms)
            self.probe_failures_in_row = 0
            self.probe_successes_in_row += 1
            if self.down and self.probe_successes_in_row >= healthy_threshold:
                self.down = False
                return "up"
        else:
            self.probe_errors += 1
            self.probe_successes_in_row = 0
            self.probe_failures_in_row += 1
            if not self.down and self.probe_failures_in_row >= unhealthy_threshold:
                self.down = True
                return "down"
        return None

    # -- reporting -----------------------------------------------------------------------

    def snapshot(self, now: float) -> Dict[str, Any]:
        reason = self.unusable_reason(now)
        return {
            "id": self.id,
            "region": self.region,
            "base_url": self.node.base_url,
            "weight": self.weight,
            "usable": reason is None,
            "reason": reason,
            "in_flight": self.in_flight,
            "awaiting": self.awaiting,
            "latency_estimate_ms": round(self.latency_estimate_ms(now), 3),
            "typical_latency_ms": round(self.typical_latency_ms(now), 3),
            "probe_latency_ms": None if self.probe_ewma_ms is None else round(self.probe_ewma_ms, 3),
            "consecutive_failures": self.consecutive_failures,
            "times_ejected": self.times_ejected,
            "ejected_for_s": None if self.ejected_until is None else max(0.0, self.ejected_until - now),
            "throttled_for_s": max(0.0, self.throttled_until - now),
            "hung": self.hung_since is not None,
            "hung_for_s": None if self.hung_since is None else max(0.0, now - self.hung_since),
            "oldest_unanswered_s": self.oldest_unanswered_s(now),
            "hung_calls_rescued": self.hung_rescued,
            "concurrency_limit": self.concurrency.snapshot()["limit"],
            "quota": self.quota.snapshot(now),
            "down": self.down,
            "probes": self.probes,
            "probe_failures": self.probe_errors,
            "last_probe_ago_s": None if self.last_probe_at is None else max(0.0, now - self.last_probe_at),
            "last_probe_ok": self.last_probe_ok,
            "last_probe_error": self.last_probe_error,
        }

    def stats(self) -> Dict[str, Any]:
        """Counters, with the latency histogram copied (summarised by the caller, unlocked)."""
        done = self.successes + sum(self.failures.values())
        return {
            "requests": self.attempts,
            "successes": self.successes,
            "failures": dict(self.failures),
            "retries": self.retries,
            "in_flight": self.in_flight,
            "success_rate": (self.successes / done) if done else None,
            "hung": self.hung_since is not None,
            "concurrency_limit": self.concurrency.snapshot()["limit"],
            "quota_garbage_headers": self.quota.garbage,
            "latency": self.latency.copy(),
        }
