"""Failover Bench (methodology v0.1) as data and rules: 16 scenarios, their checks, the verdicts.

Pure functions over two views of one scenario, as the benchmark's methodology puts it:
what the caller got (:class:`CallResult`) and what the provider saw (the simulated
gateway's request log, :class:`~holysheep_lb.simulator.SimRequest`). No network, no
clock: ``benchmarks/failure_catalogue.py`` runs the scenarios, and
``tests/test_failure_catalogue_scoring.py`` tests these rules on synthetic logs.

Source: the public repository failoverbench/failoverbench, ``scenarios/catalogue.yaml``
(the revision of its CHANGELOG 0.2.0: S06 is scored against a 100 s budget with a
130 s cap) and the check kinds and verdict rules its ``METHODOLOGY.md`` and runner
describe; re-expressed here as data, not copied. Two differences, both forced by the
simulator or by this project's contract:

* the simulator's canonical answer names its model (``"[fb-ok] Echo: ..."``), so an
  answer is *complete* when it equals the primary's or the fallback's canonical text
  (a continuation after a cut rebuilds the primary's), after whitespace normalisation;
* an error is *clean* only when it is a :class:`~holysheep_lb.errors.HolySheepError`:
  any other exception reaching the caller is a ``fail`` (this library promises typed errors).

Durations marked ``scaled`` follow ``--time-scale`` (see :meth:`Scenario.scaled`).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from holysheep_lb.simulator import SimRequest

CATALOGUE_SOURCE = "failoverbench/failoverbench scenarios/catalogue.yaml (CHANGELOG 0.2.0 revision)"
METHODOLOGY_VERSION = "0.1"
DEFAULT_FALLBACK = "fb-ok"
VERDICTS = ("pass", "partial", "safe", "fail")
CAPABILITIES: Mapping[str, bool] = {"fallback": True, "streaming": True}

REQUIRED, ADVISORY = "required", "advisory"
SUCCESS, ERROR, HANG = "success", "error", "hang"


@dataclass(frozen=True)
class Check:
    """One machine check of a scenario. ``scaled``: ``value`` is a duration that follows --time-scale."""

    id: str
    kind: str
    value: Optional[float] = None
    window_s: Optional[float] = None
    severity: str = REQUIRED
    informational: bool = False
    requires: Optional[str] = None
    scaled: bool = False


@dataclass(frozen=True)
class SequenceSpec:
    """Sequence mode: ``count`` requests, one every ``interval_s``, each capped at ``per_request_max_wall_s``."""

    count: int
    interval_s: float
    per_request_max_wall_s: float


@dataclass(frozen=True)
class Scenario:
    """One catalogue entry. ``timed``: its fault has a duration, so its wall cap follows --time-scale."""

    id: str
    title: str
    model: str
    max_wall_s: float
    checks: Tuple[Check, ...]
    fallback_model: str = DEFAULT_FALLBACK
    ideal: str = SUCCESS
    timed: bool = False
    sequence: Optional[SequenceSpec] = None
    fast_sequence: Optional[SequenceSpec] = None

    @property
    def mode(self) -> str:
        return "sequence" if self.sequence is not None else "single"

    def scaled(self, factor: float, *, fast: bool = False) -> "Scenario":
        """This scenario with its fault-bound durations times ``factor``; ``fast`` picks the
        catalogue's fast sequence. Retry-After (2 s), the no-hammer windows and S11's 8 s
        finalisation bound are not fault durations and stay as they are."""
        seq = self.fast_sequence if fast and self.fast_sequence is not None else self.sequence
        if seq is not None:
            seq = SequenceSpec(seq.count, seq.interval_s * factor, seq.per_request_max_wall_s * factor)
        checks = tuple(replace(c, value=c.value * factor) if c.scaled and c.value is not None else c
                       for c in self.checks)
        wall_s = self.max_wall_s * factor if self.timed else self.max_wall_s
        return replace(self, max_wall_s=wall_s, checks=checks, sequence=seq, fast_sequence=None)


def _c(id: str, kind: str, value: Optional[float] = None, **kw: Any) -> Check:
    return Check(id, kind, value, **kw)


_NO_HANG = _c("no_hang", "no_hang")

#: The catalogue, in order. Titles and thresholds as published; see the module docstring.
CATALOGUE: Tuple[Scenario, ...] = (
    Scenario("S01", "429 with Retry-After", "fb-s01-429-retry-after", 20, (
        _c("retried", "attempts_primary_min", 2, severity=ADVISORY),
        _c("retry_after_honoured", "first_gap_min_s", 1.8, severity=ADVISORY),
        _c("no_hammer", "max_attempts_within", 2, window_s=1.5))),
    Scenario("S02", "429 without Retry-After, persistent", "fb-s02-429-persistent", 40, (
        _c("no_hammer", "max_attempts_within", 4, window_s=3),
        _c("bounded_attempts", "attempts_primary_max", 6), _NO_HANG)),
    Scenario("S03", "500 once, then healthy", "fb-s03-500-then-200", 20, (
        _NO_HANG, _c("same_provider_retry", "attempts_primary_min", 2, severity=ADVISORY))),
    Scenario("S04", "503 persistent", "fb-s04-503-persistent", 40, (
        _c("bounded_attempts", "attempts_primary_max", 6), _NO_HANG)),
    Scenario("S05", "TCP reset before headers", "fb-s05-reset", 20, (_NO_HANG,)),
    Scenario("S06", "No response at all", "fb-s06-no-response", 130, (
        _c("within_budget", "wall_max_s", 100, scaled=True), _NO_HANG,
        _c("silent_route_not_retried", "attempts_primary_max", 1, severity=ADVISORY)), timed=True),
    Scenario("S07", "Slow first token", "fb-s07-slow-ttft", 60, (
        _NO_HANG, _c("ttft_limit", "wall_max_s", 15, severity=ADVISORY, requires="fallback", scaled=True)),
        timed=True),
    Scenario("S08", "Stream cut mid-answer", "fb-s08-stream-cut", 40, (
        _c("no_truncated_success", "no_truncated_success"), _NO_HANG)),
    Scenario("S09", "Stream stalls", "fb-s09-stream-stall", 70, (
        _c("bounded", "wall_max_s", 45, scaled=True), _c("no_truncated_success", "no_truncated_success"),
        _c("alive_after", "alive_after"), _NO_HANG), timed=True),
    Scenario("S10", "Malformed chunk in the stream", "fb-s10-malformed-chunk", 30, (
        _c("alive_after", "alive_after"), _c("no_garbage", "no_truncated_success"), _NO_HANG,
        _c("recovered_in_place", "complete", severity=ADVISORY))),
    Scenario("S11", "Stream ends without [DONE]", "fb-s11-no-done", 30, (
        _c("prompt_finalise", "wall_max_s", 8), _c("usage_reported", "usage_present", severity=ADVISORY))),
    Scenario("S12", "Context length exceeded", "fb-s12-context-length", 20, (
        _c("no_same_model_retry", "attempts_primary_eq", 1), _NO_HANG)),
    Scenario("S13", "Content-filter rejection", "fb-s13-content-filter", 20, (
        _c("no_same_model_retry", "attempts_primary_eq", 1), _NO_HANG,
        _c("fallback_attempted", "fallback_used", severity=ADVISORY, informational=True)), ideal=ERROR),
    Scenario("S14", "Fallback target rejects prefill", "fb-s14-stream-cut", 40, (
        _c("no_prefill_masking", "no_prefill_masking"), _c("no_truncated_success", "no_truncated_success")),
        fallback_model="fb-ok-noprefill"),
    Scenario("S15", "Primary flaps: down, then healthy", "fb-s15-flap", 200, (
        _c("no_hang", "seq_no_hang"),
        _c("served_during_outage", "seq_served_during_outage", requires="fallback"),
        _c("recovered", "seq_recovered_within_s", 30, requires="fallback", scaled=True),
        _c("probe_discipline", "seq_probe_discipline", severity=ADVISORY, informational=True)),
        timed=True, sequence=SequenceSpec(20, 4.0, 30.0), fast_sequence=SequenceSpec(10, 1.2, 10.0)),
    Scenario("S16", "Fail-over accounting", "fb-s16-503-persistent", 40, (
        _c("reports_fallback_model", "reported_model_is_fallback", requires="fallback"),
        _c("usage_present", "usage_present", requires="fallback", severity=ADVISORY),
        _c("bounded_attempts", "attempts_primary_max", 6))),
)


def select(only: Optional[Iterable[str]]) -> List[Scenario]:
    """The catalogue's scenarios named in ``only`` (all when None), in catalogue order."""
    if only is None:
        return list(CATALOGUE)
    wanted = {s.strip().upper() for s in only if s.strip()}
    known = {s.id for s in CATALOGUE}
    unknown = sorted(wanted - known)
    if unknown or not wanted:
        raise ValueError(f"--only: unknown scenario id(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(sorted(known))}")
    return [s for s in CATALOGUE if s.id in wanted]


# -- the two views of one scenario ---------------------------------------------------------------


@dataclass
class CallResult:
    """What a caller got from one call. ``clean``: an error was a typed holysheep_lb exception."""

    outcome: str  # success | error | hang
    elapsed_s: float
    content: str = ""
    error: Optional[str] = None
    clean: bool = True
    reported_model: Optional[str] = None
    usage: Optional[Dict[str, Any]] = None


@dataclass
class SeqItem:
    """One request of a sequence scenario; ``t_sent_s`` from the gateway's reset."""

    index: int
    t_sent_s: float
    result: CallResult
    complete: bool


@dataclass
class Metrics:
    """Everything the checks read, from the caller's result and the gateway's request log."""

    outcome: str
    complete: bool
    clean: bool
    elapsed_s: float
    content_words: int
    error: Optional[str]
    reported_model: Optional[str]
    usage: Optional[Dict[str, Any]]
    fallback_model: str
    attempts_primary: int
    attempts_fallback: int
    primary_times_s: List[float]
    first_gap_s: Optional[float]
    prefill_rejections: int
    wall_log: List[str]
    alive_after: bool = True
    alive_error: Optional[str] = None
    seq_items: List[SeqItem] = field(default_factory=list)
    seq_hangs: int = 0
    seq_requests_during_down: int = 0
    seq_served_during_down: int = 0
    seq_primary_attempts_during_down: int = 0
    seq_recovered_after_s: Optional[float] = None
    down_s: Optional[float] = None


_WS = re.compile(r"\s+")


def normalise(text: Optional[str]) -> str:
    return _WS.sub(" ", (text or "").strip())


def is_complete(content: str, canonical: Sequence[str]) -> bool:
    return normalise(content) in {normalise(c) for c in canonical}


def measure(scenario: Scenario, result: CallResult, log: Sequence[SimRequest], canonical: Sequence[str]) -> Metrics:
    """The metrics of a single-call scenario (and the base of a sequence's)."""
    primary = [e for e in log if e.model == scenario.model]
    fallback = [e for e in log if e.model == scenario.fallback_model]
    times = [e.t_s for e in primary]
    return Metrics(
        outcome=result.outcome,
        complete=is_complete(result.content, canonical),
        clean=result.clean,
        elapsed_s=result.elapsed_s,
        content_words=len(normalise(result.content).split()),
        error=result.error,
        reported_model=result.reported_model,
        usage=result.usage,
        fallback_model=scenario.fallback_model,
        attempts_primary=len(primary),
        attempts_fallback=len(fallback),
        primary_times_s=times,
        first_gap_s=times[1] - times[0] if len(times) >= 2 else None,
        prefill_rejections=sum(1 for e in log if e.outcome == "prefill_rejected"),
        wall_log=[f"{e.t_s:.2f}s {e.model} #{e.attempt} -> {e.outcome} {e.status or '-'}"
                  + (" (prefill)" if e.prefill else "") for e in log if e.model is not None],
    )


def measure_sequence(scenario: Scenario, items: Sequence[SeqItem], log: Sequence[SimRequest],
                     canonical: Sequence[str], *, down_s: float, elapsed_s: float) -> Metrics:
    """The metrics of a sequence scenario: the primary is down for its first ``down_s``."""
    if not items:
        raise ValueError("a sequence scenario needs at least one request")
    m = measure(scenario, items[-1].result, log, canonical)
    outcomes = [it.result.outcome for it in items]
    during = [it for it in items if it.t_sent_s < down_s]
    back = [e.t_s for e in log if e.model == scenario.model and e.status == 200]
    m.outcome = HANG if HANG in outcomes else (SUCCESS if all(o == SUCCESS for o in outcomes) else ERROR)
    m.complete = all(it.complete for it in items)
    m.clean = all(it.result.clean for it in items)
    m.error = next((it.result.error for it in items if it.result.outcome != SUCCESS), None)
    m.elapsed_s = elapsed_s
    m.seq_items = list(items)
    m.seq_hangs = outcomes.count(HANG)
    m.seq_requests_during_down = len(during)
    m.seq_served_during_down = sum(1 for it in during if it.result.outcome == SUCCESS)
    m.seq_primary_attempts_during_down = sum(1 for t in m.primary_times_s if t < down_s)
    m.seq_recovered_after_s = min(back) - down_s if back else None
    m.down_s = down_s
    return m


# -- checks and verdicts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """``status``: pass | fail | na (not applicable) | info (an informational check that failed)."""

    id: str
    kind: str
    status: str
    detail: str
    severity: str
    informational: bool


def _words(m: Metrics) -> str:
    return f"success with {m.content_words} words"


def _attempts(n: int, which: str) -> str:
    return f"{n} {which} attempt(s)"


def _limit(check: Check) -> float:
    if check.value is None:
        raise ValueError(f"check {check.id} ({check.kind}) needs a value")
    return check.value


def _judge(check: Check, m: Metrics, caps: Mapping[str, bool]) -> Tuple[Optional[bool], str]:
    """(ok, detail) of one check; ok None = not applicable."""
    k, oc = check.kind, m.outcome
    if check.requires and not caps.get(check.requires):
        return None, f"n/a: the client declares no {check.requires}"
    if k == "no_hang":
        return oc != HANG, f"ended in {m.elapsed_s:.1f}s ({oc})" if oc != HANG else f"hang: {m.error}"
    if k == "complete":
        ok = oc == SUCCESS and m.complete
        return ok, "complete answer" if ok else ("truncated/altered answer" if oc == SUCCESS else oc)
    if k == "no_truncated_success":
        bad = oc == SUCCESS and not m.complete
        return not bad, _words(m) if bad else ("complete answer" if oc == SUCCESS else f"no success claimed ({oc})")
    primary, fallback = m.attempts_primary, m.attempts_fallback
    counted: Dict[str, Tuple[int, Callable[[float, float], bool], str]] = {
        "attempts_primary_min": (primary, operator.ge, "primary"),
        "attempts_primary_max": (primary, operator.le, "primary"),
        "attempts_primary_eq": (primary, operator.eq, "primary"),
        "attempts_fallback_min": (fallback, operator.ge, "fallback"),
        "attempts_fallback_max": (fallback, operator.le, "fallback"),
    }
    if k in counted:
        n, compare, which = counted[k]
        return compare(n, _limit(check)), _attempts(n, which)
    if k == "first_gap_min_s":
        gap = m.first_gap_s
        return (gap is not None and gap >= _limit(check),
                f"gap {gap:.2f}s" if gap is not None else "no second attempt")
    if k == "max_attempts_within":
        if check.window_s is None:
            raise ValueError(f"check {check.id} (max_attempts_within) needs window_s")
        times = m.primary_times_s
        n = sum(1 for t in times if t - times[0] < check.window_s) if times else 0
        return n <= _limit(check), f"{n} attempt(s) in the first {check.window_s:g}s"
    if k == "wall_max_s":
        return oc != HANG and m.elapsed_s <= _limit(check), f"{m.elapsed_s:.1f}s (limit {_limit(check):g}s)"
    if k == "alive_after":
        return m.alive_after, ("a healthy call succeeded afterwards" if m.alive_after
                               else f"a healthy call failed afterwards: {m.alive_error}")
    if k == "fallback_used":
        return fallback >= 1, _attempts(fallback, "fallback")
    if k == "reported_model_is_fallback":
        if fallback == 0:
            return None, "n/a: the fallback was never used"
        reported = (m.reported_model or "").rsplit("/", 1)[-1].strip().lower()
        return bool(reported) and m.fallback_model.lower() in reported, f"model = {m.reported_model!r}"
    if k == "usage_present":
        return bool(m.usage), f"usage = {m.usage}" if m.usage else "no usage block"
    if k == "no_prefill_masking":
        masked = oc == ERROR and m.prefill_rejections > 0
        return not masked, f"{m.prefill_rejections} prefill rejection(s); final outcome {oc}"
    return _judge_sequence(check, m)


def _judge_sequence(check: Check, m: Metrics) -> Tuple[Optional[bool], str]:
    k = check.kind
    during = m.seq_requests_during_down
    if k == "seq_no_hang":
        return m.seq_hangs == 0, f"{m.seq_hangs} hung request(s) of {len(m.seq_items)}"
    if k == "seq_served_during_outage":
        served = m.seq_served_during_down
        return during > 0 and served == during, f"{served}/{during} answered while the primary was down"
    if k == "seq_recovered_within_s":
        rec = m.seq_recovered_after_s
        return (rec is not None and rec <= _limit(check),
                f"primary answered again {rec:+.1f}s after recovery" if rec is not None
                else "primary never used again after recovery")
    if k == "seq_probe_discipline":
        n = m.seq_primary_attempts_during_down
        return n <= during, f"{n} primary attempt(s) for {during} request(s) during the outage"
    raise ValueError(f"unknown check kind {k!r} (check {check.id})")


def evaluate_check(check: Check, m: Metrics, caps: Mapping[str, bool] = CAPABILITIES) -> CheckResult:
    """Score one check; an informational check that fails is reported as ``info``."""
    ok, detail = _judge(check, m, caps)
    status = "na" if ok is None else "pass" if ok else "info" if check.informational else "fail"
    return CheckResult(check.id, check.kind, status, detail, check.severity, check.informational)


def verdict_for(scenario: Scenario, checks: Sequence[CheckResult], m: Metrics) -> Tuple[str, str]:
    """(verdict, reason): pass = rescued, every check clean; partial = rescued with an advisory
    check failed (or, for an ideal error, answered by routing around it); safe = not rescued
    but a bounded clean error with every required check clean; fail = a hang, a truncated
    answer presented as success, an untyped exception, or a required check failed."""
    oc = m.outcome
    if oc == HANG:
        return "fail", "hang"
    if oc == SUCCESS and not m.complete and scenario.ideal == SUCCESS:
        return "fail", "truncated answer presented as success"
    if oc == ERROR and not m.clean:
        return "fail", f"untyped exception reached the caller: {m.error}"
    failed_required = [c.id for c in checks if c.status == "fail" and c.severity != ADVISORY]
    if failed_required:
        return "fail", "failed: " + ", ".join(failed_required)
    failed_advisory = [c.id for c in checks if c.status == "fail" and c.severity == ADVISORY]
    if scenario.ideal == ERROR:
        if oc == SUCCESS:
            return "partial", "answered by routing around the rejection"
        rescued = True
    else:
        rescued = oc == SUCCESS and m.complete
    if rescued and failed_advisory:
        return "partial", "rescued; advisory: " + ", ".join(failed_advisory)
    if rescued:
        return "pass", "rescued"
    return "safe", f"not rescued; clean error: {(m.error or '')[:120]}"


def score(scenario: Scenario, m: Metrics, caps: Mapping[str, bool] = CAPABILITIES
          ) -> Tuple[str, str, List[CheckResult]]:
    """(verdict, reason, check results) of one measured scenario."""
    checks = [evaluate_check(c, m, caps) for c in scenario.checks]
    verdict, reason = verdict_for(scenario, checks, m)
    return verdict, reason, checks


def summarise(verdicts: Iterable[str]) -> Dict[str, int]:
    counts = {v: 0 for v in VERDICTS}
    for v in verdicts:
        counts[v] += 1
    return counts


# -- --require thresholds ----------------------------------------------------------------------------

_OPS: Dict[str, Callable[[int, int], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt,
}
_CONDITION = re.compile(r"^(?:(?P<config>[A-Za-z0-9_-]+):)?(?P<verdict>[a-z]+)(?P<op>>=|<=|==|!=|>|<)(?P<n>\d+)$")


@dataclass(frozen=True)
class Requirement:
    """``config``'s count of ``verdict`` must satisfy ``op n`` (config None: every configuration)."""

    config: Optional[str]
    verdict: str
    op: str
    n: int

    def __str__(self) -> str:
        return f"{self.config + ':' if self.config else ''}{self.verdict}{self.op}{self.n}"


def parse_requirements(text: str) -> List[Requirement]:
    """``"default:pass>=13,fail==0"``: a ``config:`` prefix applies to the conditions after it."""
    found: List[Requirement] = []
    config: Optional[str] = None
    for part in (p.strip() for p in text.split(",")):
        match = _CONDITION.match(part)
        if match is None or match.group("verdict") not in VERDICTS:
            raise ValueError(f"--require: cannot read {part!r}; expected [config:]VERDICT OP N with VERDICT one "
                             f"of {', '.join(VERDICTS)} and OP one of {' '.join(_OPS)}, e.g. default:pass>=13,fail==0")
        config = match.group("config") or config
        found.append(Requirement(config, match.group("verdict"), match.group("op"), int(match.group("n"))))
    return found


def unmet(requirements: Iterable[Requirement], summaries: Mapping[str, Mapping[str, int]]) -> List[str]:
    """The requirements the totals miss, each with the measured count."""
    missed = []
    for req in requirements:
        if req.config is not None and req.config not in summaries:
            raise ValueError(f"--require: configuration {req.config!r} was not run; ran: {', '.join(summaries)}")
        for name in [req.config] if req.config is not None else list(summaries):
            got = summaries[name][req.verdict]
            if not _OPS[req.op](got, req.n):
                missed.append(f"{name}:{req.verdict}{req.op}{req.n} (measured {got})")
    return missed
