import email.utils

import pytest
import responses
from requests.structures import CaseInsensitiveDict

from holysheep_lb import AllAttemptsFailedError
from holysheep_lb.retry import RetryBudget, RetryPolicy, parse_retry_after, parse_should_retry

NOW = 1_700_000_000.0


def _h(**kw):
    return CaseInsensitiveDict({k.replace("_", "-"): v for k, v in kw.items()})


@pytest.mark.parametrize(
    "headers, expected",
    [
        (_h(retry_after="2"), 2.0),
        (_h(retry_after="0"), 0.0),
        (_h(retry_after="1.5"), 1.5),
        (_h(retry_after=" 7 "), 7.0),
        (_h(retry_after_ms="250"), 0.25),
        (_h(retry_after_ms="250", retry_after="9"), 0.25),   # -ms wins
        (_h(retry_after_ms="junk", retry_after="9"), 9.0),   # garbage -ms falls through
        (_h(retry_after="-5"), None),                        # negative: ignored
        (_h(retry_after="nan"), None),
        (_h(retry_after="inf"), None),
        (_h(retry_after="soon"), None),
        (_h(retry_after=""), None),
        (_h(retry_after="9" * 400), None),                   # absurd length
        (_h(retry_after=email.utils.formatdate(NOW + 30, usegmt=True)), 30.0),
        (_h(retry_after=email.utils.formatdate(NOW - 30, usegmt=True)), 0.0),  # date in the past
        (_h(retry_after="Wed, 99 Foo 2015 07:28:00 GMT"), None),
        (_h(), None),
    ],
)
def test_retry_after_table(headers, expected):
    got = parse_retry_after(headers, now=lambda: NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1.0 if expected >= 1 else 1e-9)


@pytest.mark.parametrize("raw, expected", [("true", True), ("FALSE", False), ("maybe", None), (None, None)])
def test_should_retry_header(raw, expected):
    assert parse_should_retry(_h(x_should_retry=raw) if raw is not None else _h()) is expected


def test_full_jitter_backoff_bounds_and_cap():
    policy = RetryPolicy(max_retries=5, backoff_base_s=0.1, backoff_cap_s=0.5)
    assert policy.backoff_s(1, rand=lambda: 1.0) == pytest.approx(0.1)
    assert policy.backoff_s(2, rand=lambda: 1.0) == pytest.approx(0.2)
    assert policy.backoff_s(3, rand=lambda: 1.0) == pytest.approx(0.4)
    assert policy.backoff_s(4, rand=lambda: 1.0) == pytest.approx(0.5)  # capped
    assert policy.backoff_s(9, rand=lambda: 0.5) == pytest.approx(0.25)
    assert policy.backoff_s(3, rand=lambda: 0.0) == 0.0                 # full jitter reaches 0


# -- retry budget ------------------------------------------------------------------------------


def _spend(budget, calls, retries_per_call=3):
    granted = 0
    for _ in range(calls):
        budget.deposit()
        for _ in range(retries_per_call):
            if not budget.try_withdraw():
                break
            granted += 1
    return granted


def test_budget_grants_exactly_the_ratio_of_calls(clock):
    budget = RetryBudget(0.2, min_per_s=0, clock=clock)
    assert _spend(budget, 100) == 20
    snap = budget.snapshot()
    assert (snap["calls"], snap["retries"], snap["denied"], snap["available"]) == (100, 20, 100, 0)


def test_budget_floor_lets_a_quiet_client_retry(clock):
    budget = RetryBudget(0.2, min_per_s=1.0, ttl_s=10.0, clock=clock)
    assert [budget.try_withdraw() for _ in range(11)] == [True] * 10 + [False]


def test_budget_deposits_and_withdrawals_expire_after_ttl(clock):
    budget = RetryBudget(0.5, min_per_s=0, ttl_s=10.0, clock=clock)
    for _ in range(10):
        budget.deposit()
    assert budget.snapshot()["available"] == 5
    clock.advance(10.0)
    assert budget.snapshot()["available"] == 0
    assert not budget.try_withdraw()
    budget.deposit()
    budget.deposit()
    assert budget.try_withdraw()
    budget.refund()
    assert budget.snapshot()["available"] == 1


def test_budget_with_zero_ratio_pays_only_the_floor(clock):
    budget = RetryBudget(0.0, min_per_s=0.2, ttl_s=10.0, clock=clock)
    assert _spend(budget, 50) == 2


@pytest.mark.parametrize("ratio, expected_requests", [(0.2, 120), (None, 400)])
def test_retry_budget_caps_retries_under_a_failing_cluster(make_client, clock, ratio, expected_requests):
    urls = ["https://a.example/v1", "https://b.example/v1", "https://c.example/v1"]
    with responses.RequestsMock() as rsps:
        for url in urls:
            rsps.post(url + "/chat/completions", status=500)
        client = make_client([{"id": f"n{i}", "base_url": u} for i, u in enumerate(urls)],
                             clock=clock, sleep=clock.sleep, rand=lambda: 0.0, max_retries=3,
                             backoff_base_s=0.0, breaker=None, retry_budget_ratio=ratio,
                             retry_budget_min_per_s=0.0)
        reasons = set()
        for _ in range(100):
            with pytest.raises(AllAttemptsFailedError) as info:
                client.chat_completion([{"role": "user", "content": "hi"}], model="m")
            reasons.add(info.value.reason)
        assert len(rsps.calls) == expected_requests
    budget = client.stats()["retry_budget"]
    if ratio is None:
        assert budget is None and reasons == {"all 4 attempts failed"}
    else:
        assert (budget["calls"], budget["retries"], budget["denied"]) == (100, 20, 100)
        assert reasons == {"retry budget exhausted"}
