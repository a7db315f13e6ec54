"""policy/retry.py: RetryPolicy.decide, the one retry decision, on a fake clock."""

from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any, List, Optional

import pytest

from holysheep_lb import APIConnectionError, BadRequestError, CircuitOpenError, ConfigError, InternalServerError
from holysheep_lb.policy.classify import classify, throttled
from holysheep_lb.policy.retry import (
    NEXT_MODEL,
    RETRY,
    RETRY_BUDGET_EXHAUSTED,
    STOP,
    WAIT,
    RetryBudget,
    RetryDecision,
    RetryPolicy,
)
from holysheep_lb.errors import AllAttemptsFailedError, Attempt


@dataclass
class Ctx:
    """A RetryContext: the call's state as the policy sees it."""

    now_s: float = 100.0
    deadline: float = 110.0
    retries: int = 0
    attempts: List[Any] = field(default_factory=lambda: [object()])
    retry_budget: Optional[RetryBudget] = None
    is_closed: bool = False
    more_nodes: bool = True
    rand_value: float = 0.5
    silent: bool = False
    trial: bool = False

    def now(self) -> float:
        return self.now_s

    def random(self) -> float:
        return self.rand_value

    def closed(self) -> bool:
        return self.is_closed

    def nodes_left(self) -> bool:
        return self.more_nodes

    def went_silent(self) -> bool:
        return self.silent


POLICY = RetryPolicy(max_retries=2, backoff_base_s=0.1, backoff_cap_s=1.0, retry_after_cap_s=30.0)
DOWN = classify(InternalServerError("down", status_code=503))


def test_a_retryable_failure_is_retried_after_jittered_backoff():
    assert POLICY.decide(DOWN, Ctx(retries=0)) == RetryDecision(RETRY, 0.05, "retrying on another node")
    assert POLICY.decide(DOWN, Ctx(retries=1)).wait_s == pytest.approx(0.1)  # 0.2 * 0.5


def test_a_final_failure_stops_at_once():
    decision = POLICY.decide(classify(BadRequestError("bad", status_code=400)), Ctx())
    assert (decision.action, decision.reason) == (STOP, "final")


def test_retries_stop_when_the_count_is_spent():
    decision = POLICY.decide(DOWN, Ctx(retries=2, attempts=[1, 2, 3]))
    assert (decision.action, decision.reason) == (STOP, "all 3 attempts failed")


def test_a_backoff_that_would_pass_the_deadline_stops():
    decision = POLICY.decide(DOWN, Ctx(now_s=109.99))
    assert (decision.action, decision.reason) == (STOP, "deadline exceeded")


def test_a_closed_client_makes_no_new_attempt():
    assert POLICY.decide(DOWN, Ctx(is_closed=True)).reason == "the client was closed"


def test_the_retry_budget_is_inside_the_decision():
    now = [0.0]
    budget = RetryBudget(0.0, min_per_s=0.1, ttl_s=10.0, clock=lambda: now[0])  # one retry in reserve
    assert POLICY.decide(DOWN, Ctx(retry_budget=budget)).action == RETRY
    decision = POLICY.decide(DOWN, Ctx(retry_budget=budget))
    assert (decision.action, decision.reason) == (STOP, RETRY_BUDGET_EXHAUSTED)
    assert budget.retries == 1 and budget.denied == 1


def test_a_throttled_cluster_is_waited_for_only_within_the_cap_and_the_deadline():
    assert POLICY.decide(throttled(4.0), Ctx()) == RetryDecision(WAIT, 4.0, "every node is throttled")
    assert POLICY.decide(throttled(31.0), Ctx(deadline=1e9)).reason == "every node is throttled for at least 31.0 s"
    assert POLICY.decide(throttled(10.0), Ctx()).action == STOP  # 100 + 10 reaches the deadline


def test_retry_after_is_capped_when_a_node_is_benched():
    from holysheep_lb import RateLimitError
    assert POLICY.throttle_s(classify(RateLimitError("x", status_code=429, retry_after_s=99999999.0))) == 30.0
    assert POLICY.throttle_s(classify(RateLimitError("x", status_code=429, retry_after_s=2.0))) == 2.0
    assert POLICY.throttle_s(DOWN) is None


def test_a_node_breaker_refusal_moves_on_while_another_node_may_be_used():
    refused = classify(CircuitOpenError("node:a", 5.0))
    assert POLICY.decide(refused, Ctx()).action == RETRY
    decision = POLICY.decide(refused, Ctx(more_nodes=False))
    assert decision.action == STOP and decision.reason.startswith("circuit breaker node:a is open")


def test_a_model_that_failed_by_system_failures_moves_to_the_next_model():
    broken = AllAttemptsFailedError("all 1 attempts failed", [Attempt("a", 1.0, 503, "x", "status_5xx")])
    assert POLICY.decide(classify(broken), None, scope="model").action == NEXT_MODEL
    assert POLICY.decide(classify(BadRequestError("b", status_code=400)), None, scope="model").action == STOP
    assert POLICY.decide(classify(APIConnectionError("x")), None, scope="model").action == NEXT_MODEL


def test_the_policy_is_an_immutable_validated_value():
    with pytest.raises(FrozenInstanceError):
        POLICY.max_retries = 5  # type: ignore[misc]
    with pytest.raises(ConfigError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ConfigError, match="backoff_cap_s"):
        RetryPolicy(backoff_cap_s=float("nan"))


def test_a_users_policy_is_obeyed_by_the_client(rsps, make_client):
    class NoRetries(RetryPolicy):
        def decide(self, outcome, ctx, *, scope="attempt"):
            if scope == "attempt" and outcome.kind == "status_5xx":
                return RetryDecision(STOP, reason="my policy says no")
            return super().decide(outcome, ctx, scope=scope)

    for node in "ab":
        rsps.post(f"https://{node}.example/v1/chat/completions", status=503, json={"error": {"message": "down"}})
    client = make_client([{"id": "a", "base_url": "https://a.example/v1"},
                          {"id": "b", "base_url": "https://b.example/v1"}], retry=NoRetries(), prices={"m": (1, 1)})
    with pytest.raises(AllAttemptsFailedError, match="my policy says no") as info:
        client.chat_completion([{"role": "user", "content": "hi"}], model="m")
    assert len(info.value.attempts) == 1  # the default policy would have tried the other node


def test_the_retry_option_must_be_a_retry_policy(make_client):
    with pytest.raises(ConfigError, match="retry"):
        make_client([{"id": "a", "base_url": "https://a.example/v1"}], retry=3)
