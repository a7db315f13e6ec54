"""The Failover Bench scorecard's instrument: its checks and verdicts on synthetic request logs."""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pytest

from holysheep_lb import APITimeoutError
from holysheep_lb.simulator import SimRequest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    """Import a benchmarks/ module without leaving benchmarks/ on sys.path."""
    saved = list(sys.path)
    try:
        sys.path.insert(0, str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


fs = _load("_failure_scoring")
fc = _load("failure_catalogue")

SCENARIOS = {s.id: s for s in fs.CATALOGUE}
PRIMARY_TEXT = "[fb-s03-500-then-200] Echo: Explain in exactly sixty words"
FALLBACK_TEXT = "[fb-ok] Echo: Explain in exactly sixty words"


def req(t_s: float, model: Optional[str], *, outcome: str = "ok", status: int = 200, prefill: bool = False,
        attempt: int = 1) -> SimRequest:
    return SimRequest(t_s, "fb", "/v1/chat/completions", model, True, prefill, attempt, outcome, status, t_s + 0.1)


def result(outcome: str = "success", content: str = PRIMARY_TEXT, *, elapsed_s: float = 1.0,
           clean: bool = True, error: Optional[str] = None, model: Optional[str] = None,
           usage: Optional[Dict[str, Any]] = None) -> Any:
    if outcome != "success" and error is None:
        error = "APIConnectionError: boom"
    return fs.CallResult(outcome, elapsed_s, content=content, error=error, clean=clean, reported_model=model,
                         usage=usage)


def metrics(scenario_id: str, res: Any, log: Sequence[SimRequest]) -> Any:
    sc = SCENARIOS[scenario_id]
    return fs.measure(sc, res, log, (f"[{sc.model}] Echo: Explain in exactly sixty words", FALLBACK_TEXT))


def check(kind: str, value: Optional[float] = None, **kw: Any) -> Any:
    return fs.Check("c", kind, value, **kw)


def judged(c: Any, m: Any, caps: Optional[Dict[str, bool]] = None) -> Any:
    return fs.evaluate_check(c, m, fs.CAPABILITIES if caps is None else caps)


# -- the catalogue ------------------------------------------------------------------------------------


def test_the_catalogue_has_sixteen_scenarios_in_order_with_the_published_fallbacks() -> None:
    assert [s.id for s in fs.CATALOGUE] == [f"S{i:02d}" for i in range(1, 17)]
    assert SCENARIOS["S14"].fallback_model == "fb-ok-noprefill"
    assert {s.fallback_model for s in fs.CATALOGUE if s.id != "S14"} == {"fb-ok"}
    assert [s.id for s in fs.CATALOGUE if s.ideal == "error"] == ["S13"]
    assert [s.id for s in fs.CATALOGUE if s.mode == "sequence"] == ["S15"]


def test_every_check_of_the_catalogue_is_a_known_kind() -> None:
    m = metrics("S03", result(), [req(0.0, "fb-s03-500-then-200")])
    for sc in fs.CATALOGUE:
        for c in sc.checks:
            assert judged(c, m).status in ("pass", "fail", "na", "info")


def test_an_unknown_check_kind_is_an_error_naming_it() -> None:
    m = metrics("S03", result(), [])
    with pytest.raises(ValueError, match="unknown check kind 'attempts_sideways'"):
        judged(check("attempts_sideways"), m)


def test_time_scale_shortens_fault_bound_durations_only() -> None:
    s06 = SCENARIOS["S06"].scaled(0.1)
    assert s06.max_wall_s == pytest.approx(13.0)
    assert {c.id: c.value for c in s06.checks}["within_budget"] == pytest.approx(10.0)
    s01 = SCENARIOS["S01"].scaled(0.1)  # Retry-After stays 2 s, so its gap and window stay too
    assert s01.max_wall_s == 20
    assert {c.id: (c.value, c.window_s) for c in s01.checks}["no_hammer"] == (2, 1.5)
    assert {c.id: c.value for c in s01.checks}["retry_after_honoured"] == 1.8
    assert {c.id: c.value for c in SCENARIOS["S11"].scaled(0.1).checks}["prompt_finalise"] == 8
    s15 = SCENARIOS["S15"].scaled(0.5)
    assert s15.sequence == fs.SequenceSpec(20, 2.0, 15.0)
    assert {c.id: c.value for c in s15.checks}["recovered"] == 15.0
    assert SCENARIOS["S15"].scaled(1.0, fast=True).sequence == fs.SequenceSpec(10, 1.2, 10.0)


def test_select_takes_ids_in_any_case_and_names_unknown_ones() -> None:
    assert [s.id for s in fs.select(["s10", " S03"])] == ["S03", "S10"]
    with pytest.raises(ValueError, match="unknown scenario id.*S99"):
        fs.select(["S03", "S99"])


# -- measuring ----------------------------------------------------------------------------------------


def test_measure_counts_attempts_per_model_and_the_first_gap_and_ignores_probes() -> None:
    log = [req(0.0, "fb-s01-429-retry-after", outcome="rate_limited", status=429),
           SimRequest(0.5, "fb", "/v1/models", None, False, False, 0, "ok", 200, 0.5),
           req(2.05, "fb-s01-429-retry-after", attempt=2), req(3.0, "fb-ok")]
    m = metrics("S01", result(), log)
    assert (m.attempts_primary, m.attempts_fallback) == (2, 1)
    assert m.first_gap_s == pytest.approx(2.05)
    assert m.primary_times_s == [0.0, 2.05]
    assert m.wall_log[0] == "0.00s fb-s01-429-retry-after #1 -> rate_limited 429"
    assert len(m.wall_log) == 3


def test_an_answer_is_complete_when_it_is_the_primarys_or_the_fallbacks_text_whatever_the_spacing() -> None:
    spaced = "  [fb-s03-500-then-200] Echo:\nExplain in  exactly sixty words "
    assert metrics("S03", result(content=spaced), []).complete
    assert metrics("S03", result(content=FALLBACK_TEXT), []).complete
    assert not metrics("S03", result(content="[fb-s03-500-then-200] Echo: Explain in"), []).complete
    doubled = "[fb-s03-500-then-200] Echo: Explain" + FALLBACK_TEXT  # a cut start, then a restart
    assert not metrics("S03", result(content=doubled), []).complete


# -- verdict rules ----------------------------------------------------------------------------------


def verdict(scenario_id: str, res: Any, log: Sequence[SimRequest], **extra: Any) -> Any:
    m = metrics(scenario_id, res, log)
    for name, value in extra.items():
        setattr(m, name, value)
    return fs.score(SCENARIOS[scenario_id], m)


def test_pass_when_rescued_and_every_check_is_clean() -> None:
    log = [req(0.0, "fb-s03-500-then-200", outcome="error_5xx", status=500), req(0.4, "fb-s03-500-then-200")]
    v, reason, checks = verdict("S03", result(), log)
    assert (v, reason) == ("pass", "rescued")
    assert [c.status for c in checks] == ["pass", "pass"]


def test_partial_when_rescued_but_an_advisory_check_failed() -> None:
    log = [req(0.0, "fb-s03-500-then-200", outcome="error_5xx", status=500), req(0.1, "fb-ok")]
    v, reason, checks = verdict("S03", result(content=FALLBACK_TEXT), log)
    assert (v, reason) == ("partial", "rescued; advisory: same_provider_retry")
    assert checks[1].detail == "1 primary attempt(s)"


def test_safe_when_not_rescued_but_a_bounded_typed_error_and_required_checks_clean() -> None:
    log = [req(t, "fb-s04-503-persistent", outcome="error_5xx", status=503) for t in (0.0, 0.5, 1.5)]
    v, reason, _ = verdict("S04", result("error", "", error="AllAttemptsFailedError: all 3 attempts failed"), log)
    assert v == "safe"
    assert reason == "not rescued; clean error: AllAttemptsFailedError: all 3 attempts failed"


def test_fail_when_a_required_check_failed_even_if_rescued() -> None:
    log = [req(0.1 * i, "fb-s04-503-persistent", outcome="error_5xx", status=503) for i in range(7)]
    v, reason, checks = verdict("S04", result(content=FALLBACK_TEXT), log + [req(1.0, "fb-ok")])
    assert (v, reason) == ("fail", "failed: bounded_attempts")
    assert checks[0].detail == "7 primary attempt(s)"


def test_fail_on_a_hang_whatever_the_checks_say() -> None:
    v, reason, checks = verdict("S05", result("hang", "", elapsed_s=20.0, error="no result within 20s"), [])
    assert (v, reason) == ("fail", "hang")
    assert checks[0].status == "fail" and checks[0].detail == "hang: no result within 20s"


def test_fail_on_a_truncated_answer_presented_as_success() -> None:
    cut = "[fb-s08-stream-cut] Echo: Explain in"
    v, reason, checks = verdict("S08", result(content=cut), [req(0.0, "fb-s08-stream-cut", outcome="stream_cut")])
    assert (v, reason) == ("fail", "truncated answer presented as success")
    assert checks[0].status == "fail" and checks[0].detail == "success with 4 words"


def test_fail_when_an_untyped_exception_reaches_the_caller() -> None:
    v, reason, _ = verdict("S05", result("error", "", clean=False, error="KeyError: 'choices'"), [])
    assert v == "fail" and reason == "untyped exception reached the caller: KeyError: 'choices'"


def test_an_ideal_error_scenario_passes_on_a_clean_error_and_is_partial_when_answered_anyway() -> None:
    rejected = [req(0.0, "fb-s13-content-filter", outcome="content_policy_violation", status=400)]
    v, _, checks = verdict("S13", result("error", "", error="BadRequestError: HTTP 400"), rejected)
    assert v == "pass"
    assert {c.id: c.status for c in checks}["fallback_attempted"] == "info"  # informational: verdict unchanged
    v, reason, checks = verdict("S13", result(content=FALLBACK_TEXT), rejected + [req(0.1, "fb-ok")])
    assert (v, reason) == ("partial", "answered by routing around the rejection")
    assert {c.id: c.status for c in checks}["fallback_attempted"] == "pass"


def test_summarise_counts_every_verdict() -> None:
    assert fs.summarise(["pass", "safe", "pass", "fail"]) == {"pass": 2, "partial": 0, "safe": 1, "fail": 1}


# -- each check kind --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,value,primary,expected", [
    ("attempts_primary_min", 2, 1, "fail"), ("attempts_primary_min", 2, 2, "pass"),
    ("attempts_primary_max", 6, 6, "pass"), ("attempts_primary_max", 6, 7, "fail"),
    ("attempts_primary_eq", 1, 1, "pass"), ("attempts_primary_eq", 1, 2, "fail"),
])
def test_primary_attempt_counts(kind: str, value: int, primary: int, expected: str) -> None:
    m = metrics("S04", result(), [req(float(i), "fb-s04-503-persistent") for i in range(primary)])
    assert judged(check(kind, value), m).status == expected


@pytest.mark.parametrize("kind,value,fallback,expected", [
    ("attempts_fallback_min", 1, 0, "fail"), ("attempts_fallback_min", 1, 1, "pass"),
    ("attempts_fallback_max", 1, 1, "pass"), ("attempts_fallback_max", 1, 2, "fail"),
    ("fallback_used", None, 0, "fail"), ("fallback_used", None, 1, "pass"),
])
def test_fallback_attempt_counts(kind: str, value: Optional[int], fallback: int, expected: str) -> None:
    m = metrics("S04", result(), [req(float(i), "fb-ok") for i in range(fallback)])
    assert judged(check(kind, value), m).status == expected


def test_first_gap_needs_a_second_attempt_at_least_the_value_later() -> None:
    gap = check("first_gap_min_s", 1.8)
    slow = metrics("S01", result(), [req(0.0, "fb-s01-429-retry-after"), req(2.0, "fb-s01-429-retry-after")])
    fast = metrics("S01", result(), [req(0.0, "fb-s01-429-retry-after"), req(0.6, "fb-s01-429-retry-after")])
    once = metrics("S01", result(), [req(0.0, "fb-s01-429-retry-after")])
    assert (judged(gap, slow).status, judged(gap, slow).detail) == ("pass", "gap 2.00s")
    assert (judged(gap, fast).status, judged(gap, fast).detail) == ("fail", "gap 0.60s")
    assert (judged(gap, once).status, judged(gap, once).detail) == ("fail", "no second attempt")


def test_max_attempts_within_counts_from_the_first_attempt() -> None:
    within = check("max_attempts_within", 2, window_s=1.5)
    times = [5.0, 5.4, 6.49, 6.5]  # the window starts at the first attempt, not at 0
    m = metrics("S01", result(), [req(t, "fb-s01-429-retry-after") for t in times])
    assert (judged(within, m).status, judged(within, m).detail) == ("fail", "3 attempt(s) in the first 1.5s")
    m = metrics("S01", result(), [req(t, "fb-s01-429-retry-after") for t in (5.0, 7.0)])
    assert judged(within, m).status == "pass"
    assert judged(within, metrics("S01", result(), [])).status == "pass"


def test_wall_max_is_inclusive_and_a_hang_never_meets_it() -> None:
    limit = check("wall_max_s", 8)
    assert judged(limit, metrics("S11", result(elapsed_s=8.0), [])).status == "pass"
    assert judged(limit, metrics("S11", result(elapsed_s=8.01), [])).status == "fail"
    assert judged(limit, metrics("S11", result("hang", "", elapsed_s=1.0), [])).status == "fail"


def test_no_hang_complete_and_no_truncated_success() -> None:
    ok, cut, err = result(content=FALLBACK_TEXT), result(content="[fb-s10-malformed-chunk] Echo:"), result("error", "")
    for res, no_hang, complete, not_truncated in ((ok, "pass", "pass", "pass"), (cut, "pass", "fail", "fail"),
                                                  (err, "pass", "fail", "pass"),
                                                  (result("hang", ""), "fail", "fail", "pass")):
        m = metrics("S10", res, [])
        assert [judged(check(k), m).status for k in ("no_hang", "complete", "no_truncated_success")] == \
            [no_hang, complete, not_truncated]


def test_alive_after_reads_the_healthy_call_made_afterwards() -> None:
    m = metrics("S09", result(), [])
    assert judged(check("alive_after"), m).status == "pass"
    m.alive_after, m.alive_error = False, "APITimeoutError: read timed out"
    c = judged(check("alive_after"), m)
    assert (c.status, c.detail) == ("fail", "a healthy call failed afterwards: APITimeoutError: read timed out")


def test_reported_model_is_fallback_is_na_until_the_fallback_was_used() -> None:
    c = check("reported_model_is_fallback")
    assert judged(c, metrics("S16", result(model="fb-ok"), [])).status == "na"
    used = [req(0.0, "fb-s16-503-persistent", outcome="error_5xx", status=503), req(0.1, "fb-ok")]
    assert judged(c, metrics("S16", result(model="fake/FB-OK"), used)).status == "pass"
    wrong = judged(c, metrics("S16", result(model="fb-s16-503-persistent"), used))
    assert (wrong.status, wrong.detail) == ("fail", "model = 'fb-s16-503-persistent'")
    assert judged(c, metrics("S16", result(model=None), used)).status == "fail"


def test_usage_present() -> None:
    assert judged(check("usage_present"), metrics("S11", result(usage={"total_tokens": 9}), [])).status == "pass"
    assert judged(check("usage_present"), metrics("S11", result(usage=None), [])).status == "fail"


def test_no_prefill_masking_fails_only_an_error_after_a_rejected_prefill() -> None:
    c = check("no_prefill_masking")
    rejected = [req(0.0, "fb-s14-stream-cut", outcome="stream_cut"),
                req(0.3, "fb-ok-noprefill", outcome="prefill_rejected", status=400, prefill=True)]
    assert judged(c, metrics("S14", result("error", ""), rejected)).status == "fail"
    assert judged(c, metrics("S14", result("error", ""), rejected[:1])).status == "pass"
    assert judged(c, metrics("S14", result(content=FALLBACK_TEXT), rejected)).status == "pass"


def test_a_check_that_requires_a_capability_is_na_without_it() -> None:
    c = check("fallback_used", requires="fallback")
    m = metrics("S13", result(), [])
    assert judged(c, m, {"fallback": False}).status == "na"
    assert judged(c, m, {"fallback": True}).status == "fail"


# -- sequence mode ----------------------------------------------------------------------------------


def flap_run(*, served: bool = True, back_at_s: Optional[float] = 64.0, probes_per_request: int = 1,
             hung: int = 0) -> Any:
    """S15 at full scale: 20 requests 4 s apart, the primary down for the first 60 s."""
    sc = SCENARIOS["S15"]
    texts = (f"[{sc.model}] Echo: Explain in exactly sixty words", FALLBACK_TEXT)
    items, log = [], []
    for i in range(20):
        t = 4.0 * i
        down = t < 60.0
        log += [req(t + 0.01 * k, sc.model, outcome="error_5xx", status=503) for k in range(probes_per_request)
                if down]
        if not down and back_at_s is not None and t >= back_at_s:
            log.append(req(t, sc.model))
            res = result(content=texts[0])
        elif served:
            log.append(req(t + 0.05, "fb-ok"))
            res = result(content=FALLBACK_TEXT)
        else:
            res = result("error", "")
        if i < hung:
            res = result("hang", "", elapsed_s=30.0)
        items.append(fs.SeqItem(i, t, res, fs.is_complete(res.content, texts)))
    m = fs.measure_sequence(sc, items, log, texts, down_s=60.0, elapsed_s=77.0)
    return fs.score(sc, m), m


def statuses(checks: List[Any]) -> Dict[str, str]:
    return {c.id: c.status for c in checks}


def test_a_breaker_that_serves_from_the_fallback_and_returns_to_the_primary_passes() -> None:
    (v, _, checks), m = flap_run()
    assert v == "pass"
    assert statuses(checks) == {"no_hang": "pass", "served_during_outage": "pass", "recovered": "pass",
                                "probe_discipline": "pass"}
    assert (m.seq_requests_during_down, m.seq_served_during_down) == (15, 15)
    assert m.seq_recovered_after_s == pytest.approx(4.0)


def test_never_returning_to_the_primary_fails_recovered() -> None:
    (v, reason, checks), _ = flap_run(back_at_s=None)
    assert (v, reason) == ("fail", "failed: recovered")
    assert [c.detail for c in checks if c.id == "recovered"] == ["primary never used again after recovery"]


def test_returning_later_than_the_value_fails_recovered() -> None:
    (v, _, checks), m = flap_run(back_at_s=92.0)  # no request that late: never
    assert statuses(checks)["recovered"] == "fail" and v == "fail"
    assert m.seq_recovered_after_s is None


def test_requests_failing_during_the_outage_fail_served_during_outage() -> None:
    (v, _, checks), m = flap_run(served=False)
    assert statuses(checks)["served_during_outage"] == "fail"
    assert m.outcome == "error" and v == "fail"


def test_retrying_the_down_primary_is_informational_and_a_hung_request_fails() -> None:
    (v, _, checks), _ = flap_run(probes_per_request=3)
    assert statuses(checks)["probe_discipline"] == "info" and v == "pass"
    (v, reason, checks), m = flap_run(hung=1)
    assert (v, reason) == ("fail", "hang")
    assert statuses(checks)["no_hang"] == "fail" and m.seq_hangs == 1


# -- thresholds ------------------------------------------------------------------------------------


def test_require_thresholds_apply_to_the_named_configuration_onwards() -> None:
    reqs = fs.parse_requirements("default:pass>=13,fail==0,tuned:safe<2")
    assert [str(r) for r in reqs] == ["default:pass>=13", "default:fail==0", "tuned:safe<2"]
    summaries = {"default": {"pass": 13, "partial": 0, "safe": 2, "fail": 1},
                 "tuned": {"pass": 14, "partial": 0, "safe": 2, "fail": 0}}
    assert fs.unmet(reqs, summaries) == ["default:fail==0 (measured 1)", "tuned:safe<2 (measured 2)"]
    assert fs.unmet(fs.parse_requirements("fail<=1"), summaries) == []  # no prefix: every configuration


@pytest.mark.parametrize("text", ["default:passes>=3", "pass=>3", "default:pass>=", ""])
def test_an_unreadable_requirement_is_an_error_quoting_it(text: str) -> None:
    with pytest.raises(ValueError, match="--require: cannot read"):
        fs.parse_requirements(text)


def test_a_requirement_on_a_configuration_not_run_is_an_error() -> None:
    with pytest.raises(ValueError, match="configuration 'tuned' was not run"):
        fs.unmet(fs.parse_requirements("tuned:fail==0"), {"default": fs.summarise([])})


# -- the harness's own parts ----------------------------------------------------------------------------


def test_time_scale_scales_every_duration_option_and_the_breaker_but_not_backoff_or_the_retry_budget() -> None:
    assert fc.scaled_options(fc.DEFAULT_OPTIONS, 1.0) == {"read_timeout_s": 30.0, "max_retries": 2}
    scaled = fc.scaled_options({**fc.DEFAULT_OPTIONS, "health_check_interval_s": None}, 0.1)
    assert scaled["read_timeout_s"] == pytest.approx(3.0)
    assert scaled["deadline_s"] == pytest.approx(12.0)
    assert scaled["stream_first_chunk_timeout_s"] == pytest.approx(3.0)
    assert scaled["breaker"]["reset_timeout_s"] == pytest.approx(3.0)
    assert scaled["health_check_interval_s"] is None
    assert scaled["max_retries"] == 2
    assert not {"backoff_base_s", "backoff_cap_s", "retry_after_cap_s", "retry_budget_ttl_s"} & set(scaled)
    assert fc.scaled_options({"breaker": None}, 0.1)["breaker"] is None  # off stays off


def test_the_tuned_row_says_when_it_equals_the_default() -> None:
    default, tuned = fc.configurations(["default", "tuned"], None)
    if not fc.TUNED_PRESET:
        assert tuned.options == default.options
        assert "identical to the default" in tuned.note
    tuned, = fc.configurations(["tuned"], '{"read_timeout_s": 10}')
    assert tuned.options == {"read_timeout_s": 10, "max_retries": 2}


@pytest.mark.parametrize("names,text,message", [
    (["tuned"], "{", "--tuned: not valid JSON"),
    (["tuned"], "[1]", "must be a JSON object"),
    (["tuned"], '{"fallbacks": {}}', "fallbacks cannot be set"),
    (["fast"], None, "unknown configuration.*fast"),
])
def test_bad_configurations_are_harness_errors_naming_the_problem(names: List[str], text: Optional[str],
                                                                  message: str) -> None:
    with pytest.raises(fc.HarnessError, match=message):
        fc.configurations(names, text)


def test_an_option_the_client_refuses_is_a_harness_error_naming_it() -> None:
    bad = fc.Configuration("tuned", {"read_timeout_s": -1}, "")
    with pytest.raises(fc.HarnessError, match="read_timeout_s"):
        fc.validate(bad, 1.0)


def test_a_call_past_its_wall_cap_is_a_hang_and_its_thread_is_left_behind() -> None:
    release = threading.Event()
    abandoned = fc.Abandoned()

    def stuck() -> Any:
        release.wait(10.0)
        return result()

    got = fc.guarded(stuck, 0.05, abandoned)
    assert got.outcome == "hang" and got.error == "no result within 0.05s"
    assert len(abandoned.threads) == 1
    release.set()
    assert abandoned.join(5.0) == 0


class FakeStream:
    def __init__(self, chunks: List[Dict[str, Any]], error: Optional[Exception] = None) -> None:
        self._chunks, self._error, self.closed = chunks, error, False

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        yield from self._chunks
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self.closed = True


class FakeClient:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def chat_completion(self, messages: Any, model: str, stream: bool = False) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def delta(text: str, **extra: Any) -> Dict[str, Any]:
    return {"model": "fb-ok", "choices": [{"index": 0, "delta": {"content": text}}], **extra}


def test_a_stream_is_read_as_a_caller_reads_it() -> None:
    stream = FakeStream([delta("[fb-ok] "), delta("Echo"), {"model": "fb-ok", "choices": [], "usage": {"n": 1}}])
    got = fc.stream_call(FakeClient(stream), "fb-ok")
    assert (got.outcome, got.content, got.reported_model, got.usage) == ("success", "[fb-ok] Echo", "fb-ok", {"n": 1})
    assert stream.closed


def test_a_broken_stream_keeps_its_partial_text_and_a_typed_error_is_clean() -> None:
    stream = FakeStream([delta("[fb-ok] ")], APITimeoutError("stalled", node_id="fb"))
    got = fc.stream_call(FakeClient(stream), "fb-ok")
    assert (got.outcome, got.content, got.clean) == ("error", "[fb-ok] ", True)
    assert got.error.startswith("APITimeoutError: stalled")
    assert stream.closed


def test_an_untyped_exception_from_the_client_is_caught_and_marked_unclean() -> None:
    got = fc.stream_call(FakeClient(KeyError("choices")), "fb-ok")
    assert (got.outcome, got.clean, got.error) == ("error", False, "KeyError: 'choices'")
