"""The call pipeline's stages, each against a fake next stage: no HTTP, a fake clock (the hedge
stage's copies run on threads: events decide which one is slow)."""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Tuple

import pytest

from holysheep_lb import AllAttemptsFailedError, APITimeoutError, BadRequestError, InternalServerError
from holysheep_lb.call.attempts import AttemptStage, Direct, NodeAttempt
from holysheep_lb.call.build import Parts, build_parts
from holysheep_lb.call.chain import ChainStage, request_parts
from holysheep_lb.call.context import CallContext
from holysheep_lb.call.costs import CostsStage
from holysheep_lb.call.hedge import HedgeStage
from holysheep_lb.config import ClientConfig, parse_nodes
from holysheep_lb.hedging import Hedger
from holysheep_lb.nodes import NodeState
from holysheep_lb.observe import CallObserver, ObserverSet, CallInfo
from holysheep_lb.policy.retry import RetryPolicy
from holysheep_lb.response import Response
from holysheep_lb.retry import RetryBudget

from .conftest import API_KEY, FakeClock, wait_until

NODES = [{"id": n, "base_url": f"https://{n}.example/v1"} for n in "abc"]
MSGS = [{"role": "user", "content": "hi"}]


class Recorder(CallObserver):
    def __init__(self) -> None:
        self.events: List[tuple] = []

    def attempt_ended(self, call, attempt):
        self.events.append(("attempt", attempt.node_id, attempt.outcome, attempt.next_step))

    def decided(self, call, decision):
        self.events.append(("decided", decision.kind, dict(decision.detail)))


def _parts(clock: FakeClock, **options: Any) -> Parts:
    options.setdefault("health_check_interval_s", None)
    cfg = ClientConfig(nodes=parse_nodes(NODES), api_key=API_KEY, **options)
    return build_parts(cfg, policy=RetryPolicy(3, 0.1, 1.0, 60.0), clock=clock, rand=lambda: 0.5,
                       wall_clock=lambda: 1.8e9, owner=object())


def _ctx(clock: FakeClock, observer: Optional[CallObserver] = None, **fields: Any) -> CallContext:
    ctx = CallContext("chat", "POST", "/chat/completions", clock() + 30.0, clock, lambda: 0.5, **fields)
    if observer is not None:
        ctx.observers = ObserverSet([observer])
        ctx.info = CallInfo("chat", ctx.model)
        ctx.undecided = {}
    return ctx


class FakeAttempt:
    """The stage after the loop: answers or fails per node id, releasing like the real one."""

    def __init__(self, parts: Parts, outcomes: Dict[str, Any]) -> None:
        self.parts = parts
        self.outcomes = outcomes
        self.seen: List[str] = []

    def run(self, ctx, node, timeout):
        self.seen.append(node.id)
        outcome = self.outcomes[node.id]
        if isinstance(outcome, Exception):
            self.parts.selector.release_failure(node, "status_5xx", 1.0, started=ctx.picked[node.id])
            raise outcome
        return node, outcome, 1.0


class FakeSender:
    streams = False

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    def send(self, ctx, node, timeout):  # pragma: no cover - the fake attempt never sends
        raise AssertionError("not called")

    def wait_s(self, ctx, model, read_s):
        return read_s

    def finish(self, ctx, node, result, latency_ms, permit):
        self.parts.selector.release_success(node, latency_ms, started=ctx.picked[node.id])
        return (node.id, result)


def _loop(parts: Parts, nxt: Any, sleeps: List[float]) -> AttemptStage:
    return AttemptStage(selector=parts.selector, breakers=parts.breakers, policy=parts.policy, next=nxt,
                        sender=FakeSender(parts), timeouts=(1.0, 5.0), sleep=sleeps.append)


def test_the_attempt_loop_fails_over_after_the_policys_backoff(clock):
    parts = _parts(clock, strategy="round_robin")
    fake = FakeAttempt(parts, {"a": InternalServerError("down", status_code=503), "b": "answer", "c": "answer"})
    sleeps: List[float] = []
    node_id, result = _loop(parts, fake, sleeps).run(_ctx(clock, model="m"))
    assert result == "answer" and fake.seen == ["a", node_id] and node_id != "a"
    assert sleeps == [0.05]  # backoff_s(1) = 0.1 * 0.5
    assert all(n.in_flight == 0 for n in parts.selector.nodes)


def test_the_attempt_loop_raises_a_final_error_at_once_with_the_attempts(clock):
    parts = _parts(clock)
    fake = FakeAttempt(parts, {n: BadRequestError("bad", status_code=400) for n in "abc"})
    ctx = _ctx(clock, model="m")
    with pytest.raises(BadRequestError) as info:
        _loop(parts, fake, []).run(ctx)
    assert len(fake.seen) == 1 and info.value.attempts == tuple(ctx.attempts)


def test_the_attempt_loop_stops_when_the_policy_says_so(clock):
    parts = _parts(clock)
    fake = FakeAttempt(parts, {n: InternalServerError("down", status_code=503) for n in "abc"})
    sleeps: List[float] = []
    with pytest.raises(AllAttemptsFailedError, match="all 0 attempts failed") as info:
        _loop(parts, fake, sleeps).run(_ctx(clock, model="m"))  # the fake records no Attempt
    assert len(fake.seen) == 4 and len(sleeps) == 3  # max_retries=3
    assert isinstance(info.value.last_error, InternalServerError)


class FakeSend:
    streams = False

    def __init__(self, parts: Parts, fail: Dict[str, Exception]) -> None:
        self.parts = parts
        self.fail = fail

    def send(self, ctx, node, timeout):
        if node.id in self.fail:
            raise self.fail[node.id]
        return type("Result", (), {"status_code": 200})()

    def wait_s(self, ctx, model, read_s):  # pragma: no cover - NodeAttempt does not ask
        return read_s

    def finish(self, ctx, node, result, latency_ms, permit):  # pragma: no cover
        raise AssertionError("not called")


def test_a_node_attempt_records_classifies_and_releases(clock):
    parts = _parts(clock)
    rec = Recorder()
    attempt = NodeAttempt(selector=parts.selector, breakers=parts.breakers, policy=parts.policy,
                          sender=FakeSend(parts, {"a": InternalServerError("down", status_code=502)}))
    ctx = _ctx(clock, rec, model="m")
    a, b = parts.selector.nodes[0], parts.selector.nodes[1]
    for node in (a, b):
        parts.selector.pick(exclude=[n.id for n in parts.selector.nodes if n is not node], started=clock())
        ctx.picked[node.id] = clock()
    with pytest.raises(InternalServerError) as info:
        attempt.run(ctx, a, (1.0, 1.0))
    attempt.run(ctx, b, (1.0, 1.0))
    assert [(x.node_id, x.kind, x.status_code) for x in ctx.attempts] == [("a", "status_5xx", 502), ("b", None, 200)]
    assert rec.events == [("attempt", "b", "ok", None)]  # a failure waits for the policy's decision ...
    ctx.attempt_decided(info.value, "retry")  # ... which the attempt loop reports with it
    assert rec.events == [("attempt", "b", "ok", None), ("attempt", "a", "status_5xx", "retry")]
    assert a.in_flight == 0 and a.failures["status_5xx"] == 1 and b.in_flight == 1  # the caller owns b's slot


@pytest.mark.parametrize("max_retries,steps", [
    (3, [("attempt", "a", "status_5xx", "retry"), ("attempt", "b", "ok", None)]),
    (0, [("attempt", "a", "status_5xx", "stop")]),
])
def test_the_loop_reports_a_failed_attempt_with_the_policys_decision(clock, max_retries, steps):
    parts = _parts(clock, strategy="round_robin")
    rec = Recorder()
    attempt = NodeAttempt(selector=parts.selector, breakers=parts.breakers, policy=parts.policy,
                          sender=FakeSend(parts, {"a": InternalServerError("down", status_code=502)}))
    loop = AttemptStage(selector=parts.selector, breakers=parts.breakers,
                        policy=RetryPolicy(max_retries, 0.1, 1.0, 60.0), next=Direct(attempt),
                        sender=FakeSender(parts), timeouts=(1.0, 5.0), sleep=lambda s: None)
    ctx = _ctx(clock, rec, model="m")
    if max_retries:
        assert loop.run(ctx)[0] == "b"
    else:
        with pytest.raises(AllAttemptsFailedError):
            loop.run(ctx)
    assert rec.events == steps and ctx.undecided == {}  # nothing left untold


class GatedSend(FakeSend):
    """FakeSend whose sends wait for their node's gate first."""

    def __init__(self, parts: Parts, fail: Dict[str, Exception], gates: Dict[str, threading.Event]) -> None:
        super().__init__(parts, fail)
        self.gates = gates
        self.started: List[str] = []

    def send(self, ctx, node, timeout):
        self.started.append(node.id)
        assert self.gates[node.id].wait(3.0)
        return super().send(ctx, node, timeout)


def test_a_hedged_copy_that_failed_while_the_other_answered_is_reported_with_no_next_step(clock):
    parts = _parts(clock, strategy="round_robin", hedge_delay_s=0.01, hedge_max_ratio=1.0)
    assert parts.hedger is not None
    parts.hedger.deposit()
    rec = Recorder()
    gates = {"a": threading.Event(), "b": threading.Event()}
    send = GatedSend(parts, {"a": InternalServerError("down", status_code=502)}, gates)
    attempt = NodeAttempt(selector=parts.selector, breakers=parts.breakers, policy=parts.policy, sender=send)
    hedge = HedgeStage(hedger=parts.hedger, selector=parts.selector, breakers=parts.breakers, ledger=parts.ledger,
                       next=attempt)
    ctx = _ctx(clock, rec, model="m")
    out: List[Any] = []
    caller = threading.Thread(target=lambda: out.append(_loop(parts, hedge, []).run(ctx)))
    caller.start()
    for _ in range(1500):  # bounded: until both copies are sending
        if send.started == ["a", "b"]:
            break
        threading.Event().wait(0.002)
    gates["a"].set()  # the primary fails while the hedge is still running: the call goes on with it
    for _ in range(1500):
        if parts.selector.by_id["a"].in_flight == 0:
            break
        threading.Event().wait(0.002)
    gates["b"].set()
    caller.join(3.0)
    assert out and out[0][0] == "b"
    attempts = sorted(e for e in rec.events if e[0] == "attempt")
    assert attempts == [("attempt", "a", "status_5xx", None), ("attempt", "b", "ok", None)]  # the policy was not asked
    assert ctx.undecided == {}


class FakeLoop:
    """The attempt loop of each model: fails the models in ``broken``."""

    def __init__(self, broken: List[str]) -> None:
        self.broken = broken
        self.models: List[Optional[str]] = []

    def run(self, ctx: CallContext) -> Any:
        self.models.append(ctx.model)
        if ctx.model in self.broken:
            from holysheep_lb import Attempt
            raise AllAttemptsFailedError("all 1 attempts failed", [Attempt("a", 1.0, 503, "x", "status_5xx")])
        return Response({"model": ctx.model, "choices": []}, model=ctx.model)


def test_the_chain_stage_falls_back_to_the_next_model_with_its_own_body(clock):
    parts = _parts(clock, fallbacks={"m1": ["m2"]})
    loop = FakeLoop(["m1"])
    rec = Recorder()
    stage = ChainStage(chain=parts.chain, next=loop, tally=parts.tally,  # type: ignore[arg-type]
                       retry_budget=None, hedger=None)
    payload = {"model": "m1", "messages": MSGS}
    body, headers = request_parts("POST", payload, "key-1")
    resp = stage.run(_ctx(clock, rec, model="m1", payload=payload, body=body, headers=headers))
    assert loop.models == ["m1", "m2"] and resp.fallback and resp.extra["requested_model"] == "m1"
    assert rec.events == [("decided", "fallback", {"from": "m1", "to": "m2"})]
    assert parts.tally.snapshot()["successes"] == 1


def test_the_chain_stage_does_not_fall_back_on_a_callers_error(clock):
    parts = _parts(clock, fallbacks={"m1": ["m2"]})

    class Rejecting(FakeLoop):
        def run(self, ctx):
            self.models.append(ctx.model)
            raise BadRequestError("bad", status_code=400)

    loop = Rejecting([])
    stage = ChainStage(chain=parts.chain, next=loop, tally=parts.tally,  # type: ignore[arg-type]
                       retry_budget=None, hedger=None)
    payload = {"model": "m1", "messages": MSGS}
    body, headers = request_parts("POST", payload, None)
    with pytest.raises(BadRequestError):
        stage.run(_ctx(clock, model="m1", payload=payload, body=body, headers=headers))
    assert loop.models == ["m1"] and parts.tally.snapshot()["failures"] == {"BadRequestError": 1}


def test_the_costs_stage_answers_an_identical_call_from_the_cache(clock):
    parts = _parts(clock, cache={"ttl_s": 60}, prices={"m": (1.0, 2.0)})
    sent: List[CallContext] = []

    class Next:
        def run(self, ctx):
            sent.append(ctx)
            resp = Response({"model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}},
                            model="m")
            ctx.costs.answered(ctx.costs.reserve("m"), resp, lambda tokens: None)
            return resp

    rec = Recorder()
    stage = CostsStage(ledger=parts.ledger, cache=parts.cache, cache_scope="s", default_region=None,
                       is_available=lambda m: True, tally=parts.tally, next=Next())  # type: ignore[arg-type]
    params = {"temperature": 0}
    first = stage.run(_ctx(clock, model="m", messages=MSGS, params=params))
    second = stage.run(_ctx(clock, rec, model="m", messages=MSGS, params=params))
    assert len(sent) == 1 and sent[0].payload == {"model": "m", "messages": MSGS, "temperature": 0}
    assert not first.cached and second.cached and second.extra["cost"]["cost_usd"] == 0.0
    assert rec.events == [("decided", "cache_hit", {"model": "m"})]


def test_for_model_copies_the_call_and_starts_the_models_progress_afresh():
    import dataclasses as dc

    from holysheep_lb.call.context import CallContext

    ctx = CallContext("chat", "POST", "/chat/completions", 10.0, lambda: 0.0, lambda: 0.5, model="a",
                      region="eu", exclude=frozenset({"n9"}), extra_headers={"X-T": "1"}, affinity_key=7)
    ctx.attempts.append("old")
    ctx.tried.append("n1")
    ctx.picked["n1"] = 1.0
    ctx.retries, ctx.trial, ctx.next_model = 2, True, "b"
    ctx.silent.add("n1")
    new = ctx.for_model("b", b"{}", {"H": "v"})
    expected = dc.replace(ctx, model="b", body=b"{}", headers={"H": "v", "X-T": "1"}, attempts=[],
                          tried=["n9"], picked={}, hedges=set(), permits={}, retries=0, silent=set(),
                          trial=False, next_model=None, untried=new.untried)
    for f in dc.fields(CallContext):  # every field, so a new one cannot be forgotten
        assert getattr(new, f.name) == getattr(expected, f.name), f.name
    assert new.attempts is not ctx.attempts and ctx.attempts == ["old"] and ctx.tried == ["n1"]
    assert new.untried() is False


# -- HedgeStage: the copies run on the hedger's threads; gates (events) decide who is slow --------

WAIT_S = 5.0  # bound of every wait below; none is reached when the code is right


class Answer:
    """What a JSON attempt hands back: the answer's data (with its usage) and quota headers."""

    quota_headers = None

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.data = {"model": "m", "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 500}}


class GatedAttempt:
    """The NodeAttempt each copy runs: the primary on node "a", the hedge on another; each
    answers (or raises the exception planned) once its gate opens (None: at once),
    releasing its node on failure like the real one."""

    def __init__(self, parts: Parts, plan: Dict[str, Any]) -> None:
        self.parts = parts
        self.plan = plan  # "primary" / "hedge" -> (outcome: "answer" or an exception, gate or None)
        self.started: List[str] = []
        self.threads: List[threading.Thread] = []
        self.began = {"primary": threading.Event(), "hedge": threading.Event()}
        self._lock = threading.Lock()

    def hedged_on(self) -> str:
        return next(n for n in self.started if n != "a")

    def run(self, ctx, node, timeout):
        role = "primary" if node.id == "a" else "hedge"
        with self._lock:
            self.started.append(node.id)
            self.threads.append(threading.current_thread())
        self.began[role].set()
        outcome, gate = self.plan[role]
        if gate is not None:
            assert gate.wait(WAIT_S), f"the {role}'s gate never opened"
        if isinstance(outcome, Exception):
            self.parts.selector.release_failure(node, "status_5xx", 1.0, started=ctx.picked[node.id])
            raise outcome
        return Answer(node.id), 7.0


class Releases:
    """Records the selector's release_success and release_cancelled calls (and makes them)."""

    def __init__(self, selector: Any) -> None:
        self.success: List[Tuple[str, float]] = []
        self.cancelled: List[str] = []
        success, cancelled = selector.release_success, selector.release_cancelled

        def release_success(node, latency_ms, **kw):
            self.success.append((node.id, latency_ms))
            success(node, latency_ms, **kw)

        def release_cancelled(node, **kw):
            self.cancelled.append(node.id)
            cancelled(node, **kw)

        selector.release_success, selector.release_cancelled = release_success, release_cancelled


def _hedge_stage(clock: FakeClock, plan: Dict[str, Any], *, delay_s: float, budget: Any = None,
                 deposits: int = 1, **options: Any):
    parts = _parts(clock, strategy="round_robin", prices={"m": (1.0, 2.0)}, **options)
    hedger = Hedger(delay_s=delay_s, selector=parts.selector, max_ratio=1.0, retry_budget=budget, clock=clock)
    for _ in range(deposits):  # what the chain stage does once per call
        hedger.deposit()
    fake = GatedAttempt(parts, plan)
    stage = HedgeStage(hedger=hedger, selector=parts.selector, breakers=parts.breakers, ledger=parts.ledger,
                       next=fake)  # type: ignore[arg-type]
    return parts, hedger, fake, stage


def _first_attempt(parts: Parts, ctx: CallContext) -> NodeState:
    """Node "a", picked as the attempt loop picks the first attempt's node."""
    picked_at = ctx.clock()
    node = parts.selector.pick(exclude=["b", "c"], started=picked_at)
    ctx.picked[node.id] = picked_at
    ctx.tried.append(node.id)
    assert node.id == "a"
    return node


def _in_flight(parts: Parts) -> Dict[str, int]:
    return {n.id: n.in_flight for n in parts.selector.nodes}


def _spent(parts: Parts) -> Dict[str, Any]:
    totals = parts.ledger.report()["totals"]
    return {k: totals[k] for k in ("input_tokens", "output_tokens", "cost_usd")}


def test_the_hedge_stage_sends_no_hedge_when_the_first_copy_answers_before_the_delay(clock):
    parts, hedger, fake, stage = _hedge_stage(clock, {"primary": ("answer", None)}, delay_s=WAIT_S)
    rec = Recorder()
    ctx = _ctx(clock, rec, model="m")
    node, result, latency_ms = stage.run(ctx, _first_attempt(parts, ctx), (1.0, 5.0))
    assert node.id == "a" and result.node_id == "a" and latency_ms == 7.0
    assert fake.started == ["a"] and ctx.tried == ["a"] and ctx.hedges == set() and rec.events == []
    assert hedger.stats()["sent"] == 0
    assert _in_flight(parts) == {"a": 1, "b": 0, "c": 0}  # the caller owns the answering node's slot


@pytest.mark.parametrize("winner", ["hedge", "primary"])
def test_a_slow_copy_is_hedged_on_another_node_and_the_loser_is_released_and_billed(clock, winner):
    loser = "primary" if winner == "hedge" else "hedge"
    gates = {"primary": threading.Event(), "hedge": threading.Event()}
    parts, hedger, fake, stage = _hedge_stage(
        clock, {"primary": ("answer", gates["primary"]), "hedge": ("answer", gates["hedge"])}, delay_s=0.0)
    releases = Releases(parts.selector)
    rec = Recorder()
    ctx = _ctx(clock, rec, model="m")
    first = _first_attempt(parts, ctx)

    def open_winners_gate() -> None:  # once both copies run: the winner answers, the loser still waits
        assert fake.began["primary"].wait(WAIT_S) and fake.began["hedge"].wait(WAIT_S)
        gates[winner].set()

    opener = threading.Thread(target=open_winners_gate, daemon=True)
    opener.start()
    node, result, _ = stage.run(ctx, first, (1.0, 5.0))
    opener.join(WAIT_S)
    other = fake.hedged_on()
    assert sorted(fake.started) == sorted(["a", other]) and ctx.tried == ["a", other] and ctx.hedges == {other}
    assert rec.events == [("decided", "hedge", {"node_id": other, "model": "m"})]
    assert node.id == result.node_id == ("a" if winner == "primary" else other)
    stats = hedger.stats()
    assert stats["sent"] == 1 and stats["won"] == (1 if winner == "hedge" else 0)
    loser_id = "a" if loser == "primary" else other
    assert _in_flight(parts)[loser_id] == 1 and releases.success == []  # the loser still runs
    assert _spent(parts)["cost_usd"] == 0.0

    gates[loser].set()  # the loser answers: nobody reads it, but its node and its bill are recorded
    assert wait_until(lambda: releases.success, WAIT_S)
    assert releases.success == [(loser_id, 7.0)] and releases.cancelled == []
    assert _in_flight(parts) == {n: int(n == node.id) for n in "abc"}
    # the gateway billed the dropped answer: 1000 * $1 + 500 * $2 per 1M tokens
    assert _spent(parts) == {"input_tokens": 1000, "output_tokens": 500, "cost_usd": pytest.approx(0.002)}
    assert wait_until(lambda: hedger.stats()["threads_busy"] == 0, WAIT_S)


def test_the_hedge_cap_leaves_a_call_unhedged(clock):
    parts, hedger, fake, stage = _hedge_stage(clock, {"primary": ("answer", None)}, delay_s=0.0, deposits=0)
    ctx = _ctx(clock, model="m")
    node, _, _ = stage.run(ctx, _first_attempt(parts, ctx), (1.0, 5.0))
    assert node.id == "a" and fake.started == ["a"] and ctx.hedges == set()
    assert fake.threads == [threading.current_thread()]  # no room for a hedge: run here, on no thread of its own
    assert hedger.stats()["sent"] == 0


def test_an_empty_retry_budget_leaves_a_call_unhedged(clock):
    budget = RetryBudget(0.1, min_per_s=0.0, clock=clock)  # no deposit: nothing to withdraw
    parts, hedger, fake, stage = _hedge_stage(clock, {"primary": ("answer", None)}, delay_s=0.0, budget=budget)
    ctx = _ctx(clock, model="m")
    node, _, _ = stage.run(ctx, _first_attempt(parts, ctx), (1.0, 5.0))
    assert node.id == "a" and fake.started == ["a"] and ctx.hedges == set()
    assert fake.threads == [threading.current_thread()]
    assert hedger.stats()["sent"] == 0


def test_a_retry_budget_spent_by_the_time_the_copy_is_slow_denies_the_hedge(clock):
    gate = threading.Event()

    class SpentMeanwhile:
        """Had a retry when the attempt began; another call took it before the hedge."""

        refunds = 0

        def can_withdraw(self) -> bool:
            return True

        def try_withdraw(self) -> bool:
            gate.set()  # asked at hedge time, on the caller's thread: the primary may answer now
            return False

        def refund(self) -> None:  # pragma: no cover - nothing was withdrawn
            self.refunds += 1

    budget = SpentMeanwhile()
    parts, hedger, fake, stage = _hedge_stage(clock, {"primary": ("answer", gate)}, delay_s=0.0, budget=budget)
    ctx = _ctx(clock, model="m")
    node, _, _ = stage.run(ctx, _first_attempt(parts, ctx), (1.0, 5.0))
    assert node.id == "a" and fake.started == ["a"] and ctx.tried == ["a"] and ctx.hedges == set()
    stats = hedger.stats()
    assert stats["sent"] == 0 and stats["denied"] == 1 and budget.refunds == 0
    assert hedger._cap.can_withdraw()  # the hedge cap's token was given back
    assert _in_flight(parts) == {"a": 1, "b": 0, "c": 0}


@pytest.mark.parametrize("last", ["primary", "hedge"])
def test_when_both_copies_fail_the_caller_gets_the_last_ones_typed_error(clock, last):
    first_to_fail = "hedge" if last == "primary" else "primary"
    errors = {"primary": InternalServerError("a is down", status_code=503, node_id="a"),
              "hedge": APITimeoutError("the hedge timed out", request_sent=True)}
    gates = {"primary": threading.Event(), "hedge": threading.Event()}
    parts, hedger, fake, stage = _hedge_stage(
        clock, {role: (errors[role], gates[role]) for role in gates}, delay_s=0.0)
    ctx = _ctx(clock, model="m")
    first = _first_attempt(parts, ctx)
    raised: List[BaseException] = []

    def caller() -> None:
        try:
            stage.run(ctx, first, (1.0, 5.0))
        except BaseException as exc:  # noqa: BLE001 - checked below
            raised.append(exc)

    calling = threading.Thread(target=caller, daemon=True)
    calling.start()
    assert fake.began["primary"].wait(WAIT_S) and fake.began["hedge"].wait(WAIT_S)
    gates[first_to_fail].set()
    assert wait_until(lambda: hedger.stats()["threads_busy"] == 1, WAIT_S)  # that copy has ended
    gates[last].set()
    calling.join(WAIT_S)
    assert not calling.is_alive()
    assert len(raised) == 1 and raised[0] is errors[last]
    assert isinstance(raised[0], (InternalServerError, APITimeoutError))
    assert ctx.tried == ["a", fake.hedged_on()] and sorted(fake.started) == sorted(ctx.tried)
    assert _in_flight(parts) == {"a": 0, "b": 0, "c": 0}  # each failed copy freed its node
    assert hedger.stats()["sent"] == 1 and hedger.stats()["won"] == 0


def test_a_node_throttled_as_the_hedge_picks_it_is_given_back_and_no_hedge_sent(clock):
    parts, hedger, fake, stage = _hedge_stage(clock, {}, delay_s=0.0)
    releases = Releases(parts.selector)
    ctx = _ctx(clock, model="m")
    _first_attempt(parts, ctx)
    pick = parts.selector.pick

    def pick_then_throttled(**kw):  # another call's 429 lands between the pick and the check
        node = pick(**kw)
        node.throttled_until = clock() + 60.0
        return node

    parts.selector.pick = pick_then_throttled
    assert stage.pick_other(ctx) is None
    assert len(releases.cancelled) == 1 and releases.cancelled[0] != "a"  # picked, then handed back
    assert ctx.tried == ["a"] and ctx.hedges == set()
    assert _in_flight(parts) == {"a": 1, "b": 0, "c": 0}


def test_a_hedge_that_was_never_sent_is_released_as_cancelled_and_not_billed(clock):
    parts, hedger, fake, stage = _hedge_stage(clock, {}, delay_s=0.0)
    releases = Releases(parts.selector)
    ctx = _ctx(clock, model="m")
    _first_attempt(parts, ctx)
    other = stage.pick_other(ctx)
    assert other is not None and other.id != "a" and ctx.hedges == {other.id}
    assert _in_flight(parts)[other.id] == 1
    stage.release_unused(ctx, other, None, None)
    assert releases.cancelled == [other.id] and releases.success == []
    assert _in_flight(parts)[other.id] == 0 and _spent(parts)["cost_usd"] == 0.0


def test_a_hedge_goes_to_a_node_the_call_has_not_tried(clock):
    parts, hedger, fake, stage = _hedge_stage(clock, {}, delay_s=0.0)
    ctx = _ctx(clock, model="m")
    ctx.tried.append("b")  # an earlier attempt of this call failed on b
    first = _first_attempt(parts, ctx)  # round robin would pick b next
    other = stage.pick_other(ctx)
    assert other is not None and other.id == "c" and ctx.tried == ["b", "a", "c"] and ctx.hedges == {"c"}
    stage.release_unused(ctx, other, None, None)
    parts.selector.release_cancelled(first, started=ctx.picked["a"])
    assert _in_flight(parts) == {"a": 0, "b": 0, "c": 0}
