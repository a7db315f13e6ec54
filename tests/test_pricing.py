"""Prices, exact cost arithmetic, the spend ledger, budgets and the cost report."""

from __future__ import annotations

import json
import logging
import math
import threading
from decimal import Decimal

import pytest

from holysheep_lb import budgets, prices, pricing
from holysheep_lb import Budget, BudgetCap, BudgetExceededError, ConfigError, InvalidRequestError, PriceTable
from holysheep_lb.pricing import (
    DEFAULT_PRICES,
    OTHER_MODELS,
    PRICES_TAKEN_ON,
    InMemorySpendStore,
    ModelPrice,
    Reservation,
    SpendLedger,
    estimate_prompt_tokens,
)

from .conftest import chat_body

DAY = 1795651200.0  # 2026-11-26T00:00:00Z
A = "https://a.example/v1"


class WallClock:
    def __init__(self, now: float = DAY + 3600) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def msgs(chars: int):
    return [{"role": "user", "content": "x" * chars}]


def usage(prompt: int, completion: int):
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def ledger(budget=None, prices=None, wall=None) -> SpendLedger:
    return SpendLedger(PriceTable(prices), budget=budget, wall_clock=wall or WallClock())


# -- prices ---------------------------------------------------------------------------------

def test_default_prices_input_and_output_per_million():
    assert PRICES_TAKEN_ON == "2026-11-26"
    assert {m: (p.input_usd_per_mtok, p.output_usd_per_mtok) for m, p in DEFAULT_PRICES.items()} == {
        "deepseek-v3.2": (0.28, 0.42),
        "gemini-2.5-flash": (0.30, 2.50),
        "gpt-4.1": (2.00, 8.00),
        "claude-sonnet-4.5": (3.00, 15.00),
    }


@pytest.mark.parametrize("model, tokens_in, tokens_out, expected", [
    ("gpt-4.1", 1234, 567, "0.007004"),            # 1234*2.00/1e6 + 567*8.00/1e6
    ("deepseek-v3.2", 1000, 1000, "0.0007"),       # input is NOT priced at the output price
    ("gemini-2.5-flash", 1_000_000, 0, "0.3"),
    ("claude-sonnet-4.5", 1_000_000, 1_000_000, "18"),
    ("claude-sonnet-4.5", 0, 1, "0.000015"),
    ("gpt-4.1", 0, 0, "0"),
])
def test_cost_arithmetic_is_exact(model, tokens_in, tokens_out, expected):
    table = PriceTable()
    assert table.exact_cost_usd(model, tokens_in, tokens_out) == Decimal(expected)
    assert table.cost_usd(model, tokens_in, tokens_out) == float(expected)


def test_ten_thousand_small_costs_sum_exactly():
    led = ledger()
    for _ in range(10_000):
        led.settle(led.admit("deepseek-v3.2", msgs(4), {"max_tokens": 1}), usage(3, 1))
    # 10_000 * (3*0.28 + 1*0.42) / 1e6 = 0.0126 exactly, no float drift
    assert led.report()["totals"]["cost_usd"] == 0.0126


def test_prices_and_caps_are_parsed_to_decimal_once_not_per_call(monkeypatch):
    table = PriceTable({"custom": (0.15, 0.6)})
    budget = Budget(daily_usd=5, monthly_usd=100, per_model={"gpt-4.1": {"daily_usd": 1}})
    parsed = []
    real = Decimal

    def counting(value="0", *args):
        if isinstance(value, str):
            parsed.append(value)
        return real(value, *args)

    for module in (prices, budgets):
        monkeypatch.setattr(module, "Decimal", counting)
    assert table.exact_cost_usd("gpt-4.1", 1000, 100) == real("0.0028")
    assert table.exact_cost_usd("custom", 1000, 1000) == real("0.00075")
    assert [(lim.model, lim.period, lim.cap_usd) for lim in budget.limits_for("gpt-4.1")] == [
        (None, "day", 5), (None, "month", 100), ("gpt-4.1", "day", 1)]
    assert parsed == []


def test_overrides_merge_with_defaults_and_can_replace_them():
    table = PriceTable({"gpt-4.1": {"input": 1.5, "output": 6}, "my-model": (0.1, 0.2)})
    assert table.price("gpt-4.1") == ModelPrice(1.5, 6.0)
    assert table.price("my-model") == ModelPrice(0.1, 0.2)
    assert table.price("deepseek-v3.2") == DEFAULT_PRICES["deepseek-v3.2"]
    only = PriceTable({"my-model": ModelPrice(1, 2)}, include_defaults=False)
    assert only.models() == ["my-model"]


def test_prices_from_json_file(tmp_path, make_client):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"gpt-4.1": {"input": 1.0, "output": 4.0}}))
    assert PriceTable.from_json(path).cost_usd("gpt-4.1", 1000, 1000) == 0.005
    client = make_client(prices=str(path))
    assert client.config.prices.price("gpt-4.1") == ModelPrice(1.0, 4.0)


@pytest.mark.parametrize("prices, field", [
    ({"gpt-4.1": {"input": -1, "output": 2}}, "prices[gpt-4.1].input"),
    ({"gpt-4.1": {"input": 1, "output": float("nan")}}, "prices[gpt-4.1].output"),
    ({"gpt-4.1": {"input": 1}}, "prices[gpt-4.1]"),
    ({"gpt-4.1": 3.0}, "prices[gpt-4.1]"),
    ({"": (1, 2)}, "prices"),
    (42, "prices"),
    ("/nonexistent/prices.json", "prices"),
])
def test_bad_prices_raise_config_error_naming_the_field(prices, field, make_client):
    with pytest.raises(ConfigError) as info:
        make_client(prices=prices)
    assert info.value.field == field


def test_unknown_model_costs_zero_and_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger="holysheep_lb")
    led = ledger()
    for _ in range(3):
        led.settle(led.admit("mystery-1", msgs(40), {}), usage(100, 100))
    led.settle(led.admit("mystery-2", msgs(40), {}), usage(100, 100))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "'mystery-1'" in warnings[0] and "'mystery-2'" in warnings[1]
    report = led.report()
    assert report["by_model"]["mystery-1"]["requests"] == 3
    assert report["by_model"]["mystery-1"]["cost_usd"] == 0.0


def test_estimate_prompt_tokens_four_chars_per_token_plus_four_per_message():
    assert estimate_prompt_tokens([{"role": "user", "content": "x" * 400}]) == 104
    assert estimate_prompt_tokens([{"role": "system", "content": "abc"},
                                   {"role": "user", "content": [{"type": "text", "text": "abcde"}]}]) == 2 + 8
    assert estimate_prompt_tokens([{"role": "assistant", "content": None}]) == 4


# -- ledger and report ----------------------------------------------------------------------

def test_estimate_uses_max_tokens_then_assumed_output_tokens():
    led = ledger(budget=Budget(assumed_output_tokens=100))
    with_max = led.estimate("gpt-4.1", msgs(400), {"max_tokens": 50})
    assert (with_max.input_tokens, with_max.output_tokens) == (104, 50)
    assert with_max.amount_usd == Decimal("0.000608")  # 104*2 + 50*8 = 608 micro-USD
    without = led.estimate("gpt-4.1", msgs(400), {"n": 2})
    assert without.output_tokens == 200


def test_actual_cost_comes_from_usage_and_estimate_is_the_fallback():
    led = ledger()
    res = led.admit("gpt-4.1", msgs(400), {"max_tokens": 50})
    settled = led.settle(res, usage(90, 10))
    assert (settled.input_tokens, settled.output_tokens, settled.from_usage) == (90, 10, True)
    assert settled.cost_usd == Decimal("0.00026")
    res = led.admit("gpt-4.1", msgs(400), {"max_tokens": 50})
    settled = led.settle(res, None)
    assert (settled.input_tokens, settled.output_tokens, settled.from_usage) == (104, 50, False)
    assert led.report()["totals"]["cost_usd"] == 0.000868


def test_report_per_model_per_day_and_savings_against_baseline():
    wall = WallClock()
    led = ledger(wall=wall)
    led.settle(led.admit("gpt-4.1", msgs(10), {}), usage(100, 50))          # 200 + 400 = 600 micro-USD
    wall.now += 86400
    led.settle(led.admit("deepseek-v3.2", msgs(10), {}), usage(1000, 200))  # 280 + 84 = 364 micro-USD
    led.record_cache_hit("deepseek-v3.2")
    report = led.report(baseline_model="gpt-4.1")
    assert report["days"] == ["2026-11-26", "2026-11-27"]
    assert report["totals"] == {"requests": 2, "cached_requests": 1, "input_tokens": 1100,
                                "output_tokens": 250, "cost_usd": 0.000964,
                                "unconfirmed_calls": 0, "unconfirmed_usd": 0.0,
                                "cached_input_tokens": 0, "cache_write_tokens": 0,
                                "cache_saved_usd": 0.0, "unreadable_usage": 0, "cached_input_share": 0.0}
    assert report["by_model"]["gpt-4.1"]["cost_usd"] == 0.0006
    assert report["by_model"]["deepseek-v3.2"]["share_of_requests"] == 2 / 3
    assert report["by_model"]["gpt-4.1"]["share_of_cost"] == 600 / 964
    assert report["by_day"]["2026-11-27"]["cost_usd"] == 0.000364
    # same 1100 input + 250 output tokens at gpt-4.1: 2200 + 2000 = 4200 micro-USD
    assert report["baseline"] == {"model": "gpt-4.1", "cost_usd": 0.0042, "savings_usd": 0.003236,
                                  "savings_share": 3236 / 4200}
    # a model against itself saves nothing (the seed's "savings" did exactly this)
    only_gpt = led.report(baseline_model="gpt-4.1", until="2026-11-26")
    assert only_gpt["baseline"]["savings_usd"] == 0.0
    assert led.report(since="2026-11-27")["totals"]["requests"] == 1


def test_an_attempt_that_timed_out_after_sending_keeps_its_estimate_as_unconfirmed_spend():
    led = ledger(budget=Budget(daily_usd=0.0025))
    held = led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})  # 104 in + 100 out: $0.001008
    led.record_unconfirmed(held)  # the first node timed out after the request was sent
    assert led.store.reserved_usd() == Decimal("0.001008")  # still held for the next attempt
    led.settle(held, usage(104, 90))  # another node answered: the gateway billed both
    report = led.report()
    assert report["totals"] == {"requests": 1, "cached_requests": 0, "input_tokens": 208, "output_tokens": 190,
                                "cost_usd": 0.001936, "unconfirmed_calls": 1, "unconfirmed_usd": 0.001008,
                                "cached_input_tokens": 0, "cache_write_tokens": 0,
                                "cache_saved_usd": 0.0, "unreadable_usage": 0, "cached_input_share": 0.0}
    assert report["by_model"]["gpt-4.1"]["unconfirmed_calls"] == 1
    assert report["by_day"]["2026-11-26"]["unconfirmed_usd"] == 0.001008
    assert report["in_flight_reserved_usd"] == 0.0
    with pytest.raises(BudgetExceededError):  # caps count it: 0.001936 + 0.001008 > 0.0025
        led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})


def test_unconfirmed_spend_counts_against_a_models_own_cap_and_survives_a_failed_call():
    led = ledger(budget=Budget(per_model={"gpt-4.1": {"daily_usd": 0.0015}}))
    held = led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})
    led.record_unconfirmed(held)
    led.cancel(held)  # every attempt failed: the reservation goes, the unconfirmed spend stays
    assert led.report()["totals"]["cost_usd"] == 0.001008 and led.store.reserved_usd() == 0
    with pytest.raises(BudgetExceededError) as info:
        led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})
    assert info.value.scope == "gpt-4.1" and info.value.spent_usd == 0.001008


def test_report_rejects_unpriced_baseline():
    with pytest.raises(InvalidRequestError) as info:
        ledger().report(baseline_model="nope")
    assert info.value.field == "baseline_model"


def test_store_forgets_days_past_retention():
    store = InMemorySpendStore(retain_days=31)
    old = Reservation("gpt-4.1", "2026-10-01", 1, 1, Decimal("0.01"))
    assert store.try_reserve(old, ()) is None
    store.settle(old, input_tokens=1, output_tokens=1, cost_usd=Decimal("0.01"))
    new = Reservation("gpt-4.1", "2026-11-26", 1, 1, Decimal("0.01"))
    assert store.try_reserve(new, ()) is None
    assert [r.day for r in store.rows()] == []
    store.settle(new, input_tokens=1, output_tokens=1, cost_usd=Decimal("0.01"))
    assert [r.day for r in store.rows()] == ["2026-11-26"]
    assert store.reserved_usd() == 0
    with pytest.raises(ConfigError):
        InMemorySpendStore(retain_days=7)


def test_spend_rows_per_day_are_capped_and_further_models_fold_into_one_other_row():
    wall = WallClock()
    store = InMemorySpendStore(max_models_per_day=3)
    led = SpendLedger(PriceTable({f"m{i}": (1.0, 1.0) for i in range(10)}), store=store, wall_clock=wall)
    for i in range(10):
        led.settle(led.admit(f"m{i}", msgs(40), {}), usage(1000, 0))  # $0.001 each
    led.settle(led.admit("m1", msgs(40), {}), usage(1000, 0))  # a model with a row keeps it
    led.record_cache_hit("m9")
    rows = {r.model: (r.requests, r.cached_requests, r.input_tokens, r.cost_usd) for r in store.rows()}
    assert rows == {"m0": (1, 0, 1000, Decimal("0.001")), "m1": (2, 0, 2000, Decimal("0.002")),
                    "m2": (1, 0, 1000, Decimal("0.001")), OTHER_MODELS: (7, 1, 7000, Decimal("0.007"))}
    assert led.report()["totals"]["cost_usd"] == 0.011
    assert len(store._totals) == 2, "only the client-wide day and month totals: no model has a cap"
    wall.now += 86400  # a new day: new models get rows again
    led.settle(led.admit("m7", msgs(40), {}), usage(1000, 0))
    assert [(r.day, r.model) for r in store.rows()][-1] == ("2026-11-27", "m7")
    with pytest.raises(ConfigError):
        InMemorySpendStore(max_models_per_day=0)


def test_a_per_model_cap_holds_for_a_model_folded_into_other():
    store = InMemorySpendStore(max_models_per_day=1)
    led = SpendLedger(PriceTable(), store=store, wall_clock=WallClock(),
                      budget=Budget(per_model={"gpt-4.1": BudgetCap(daily_usd=0.0015)}))
    led.settle(led.admit("deepseek-v3.2", msgs(400), {"max_tokens": 100}), usage(104, 100))
    led.settle(led.admit("gpt-4.1", msgs(400), {"max_tokens": 100}), usage(104, 100))  # $0.001008
    assert [r.model for r in store.rows()] == ["deepseek-v3.2", OTHER_MODELS]
    with pytest.raises(BudgetExceededError) as info:  # another $0.001008 would pass gpt-4.1's cap
        led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})
    assert info.value.scope == "gpt-4.1" and info.value.spent_usd == 0.001008


# -- budgets --------------------------------------------------------------------------------

def test_budget_raises_before_sending_when_estimate_would_pass_the_cap():
    led = ledger(budget=Budget(daily_usd=0.002))
    led.settle(led.admit("gpt-4.1", msgs(400), {"max_tokens": 100}), usage(104, 100))  # 0.001008 spent
    with pytest.raises(BudgetExceededError) as info:
        led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})  # another 0.001008 > 0.002
    err = info.value
    assert (err.model, err.scope, err.period) == ("gpt-4.1", "client", "day")
    assert (err.cap_usd, err.spent_usd, err.reserved_usd, err.estimate_usd) == (0.002, 0.001008, 0.0, 0.001008)
    assert not err.downgrade_tried
    assert "daily budget of $0.0020 for this client" in str(err)
    assert led.store.reserved_usd() == 0  # a refusal holds nothing


def test_in_flight_reservations_count_against_the_cap():
    led = ledger(budget=Budget(daily_usd=0.003))
    held = [led.admit("gpt-4.1", msgs(400), {"max_tokens": 100}) for _ in range(2)]  # 2 x 0.001008
    with pytest.raises(BudgetExceededError) as info:
        led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})
    assert info.value.reserved_usd == 0.002016
    led.cancel(held[0])  # a failed call spends nothing and frees its reservation
    led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})


def test_budget_downgrades_to_the_most_expensive_cheaper_model_that_fits():
    budget = Budget(per_model={"gpt-4.1": {"daily_usd": 0.001}}, on_exceeded="downgrade")
    led = ledger(budget=budget)
    # gpt-4.1 estimate 0.001008 > its cap; gemini (0.0002812) is the next cheaper
    res = led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})
    assert (res.model, res.amount_usd) == ("gemini-2.5-flash", Decimal("0.0002812"))
    res = led.admit("gpt-4.1", msgs(400), {"max_tokens": 100},
                    is_available=lambda model: model != "gemini-2.5-flash")
    assert res.model == "deepseek-v3.2"
    assert led.admit("claude-sonnet-4.5", msgs(400), {"max_tokens": 100}).model == "claude-sonnet-4.5"


def test_downgrade_raises_when_no_cheaper_model_fits():
    led = ledger(budget=Budget(daily_usd=0.00001, on_exceeded="downgrade"))
    with pytest.raises(BudgetExceededError) as info:
        led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})
    assert info.value.downgrade_tried and "no cheaper model fits" in str(info.value)


def test_monthly_cap_spans_days_and_resets_with_the_month():
    wall = WallClock(DAY)  # 2026-11-26
    led = ledger(budget=Budget(monthly_usd=0.0025), wall=wall)
    for _ in range(2):
        led.settle(led.admit("gpt-4.1", msgs(400), {"max_tokens": 100}), usage(104, 100))
        wall.now += 86400
    with pytest.raises(BudgetExceededError) as info:  # 2026-11-28: 0.002016 + 0.001008 > 0.0025
        led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})
    assert info.value.period == "month"
    wall.now += 3 * 86400  # 2026-12-01
    assert led.today() == "2026-12-01"
    led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})


def test_daily_cap_resets_at_utc_midnight():
    wall = WallClock(DAY + 86399)
    led = ledger(budget=Budget(daily_usd=0.0015), wall=wall)
    led.settle(led.admit("gpt-4.1", msgs(400), {"max_tokens": 100}), usage(104, 100))
    with pytest.raises(BudgetExceededError):
        led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})
    wall.now += 1
    assert led.admit("gpt-4.1", msgs(400), {"max_tokens": 100}).day == "2026-11-27"


def test_per_model_cap_leaves_other_models_alone():
    led = ledger(budget=Budget(per_model={"gpt-4.1": BudgetCap(daily_usd=0.0005)}))
    with pytest.raises(BudgetExceededError) as info:
        led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})
    assert info.value.scope == "gpt-4.1"
    assert led.admit("deepseek-v3.2", msgs(400), {"max_tokens": 100}).model == "deepseek-v3.2"


@pytest.mark.parametrize("budget, field", [
    ({"daily_usd": -1}, "budget.daily_usd"),
    ({"on_exceeded": "ignore"}, "budget.on_exceeded"),
    ({"per_model": {"gpt-4.1": {"weekly_usd": 1}}}, "budget.per_model[gpt-4.1]"),
    ({"per_model": {"gpt-4.1": 5}}, "budget.per_model[gpt-4.1]"),
    ({"assumed_output_tokens": -5}, "budget.assumed_output_tokens"),
    ({"yearly_usd": 5}, "budget"),
    ("lots", "budget"),
])
def test_bad_budget_raises_config_error(budget, field, make_client):
    with pytest.raises(ConfigError) as info:
        make_client(budget=budget)
    assert info.value.field == field


def _spend_concurrently(led: SpendLedger, *, threads: int, actual_output_tokens: int):
    """Each thread spends until refused; returns (successes, max reserved seen)."""
    start = threading.Barrier(threads)
    ok = [0] * threads
    max_reserved = [Decimal(0)]
    lock = threading.Lock()

    def worker(k: int) -> None:
        start.wait(timeout=10)
        for _ in range(1000):
            try:
                res = led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})
            except BudgetExceededError:
                return
            reserved = led.store.reserved_usd()
            with lock:
                max_reserved[0] = max(max_reserved[0], reserved)
            led.settle(res, usage(104, actual_output_tokens))
            ok[k] += 1

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in pool)
    return sum(ok), max_reserved[0]


def test_32_threads_never_overspend_when_answers_match_estimates():
    cap = 0.5
    led = ledger(budget=Budget(daily_usd=cap))
    successes, _ = _spend_concurrently(led, threads=32, actual_output_tokens=100)
    per_call = 0.001008
    assert successes == math.floor(cap / per_call) == 496
    spent = led.report()["totals"]["cost_usd"]
    assert spent == float(Decimal("0.001008") * successes) <= cap
    assert led.store.reserved_usd() == 0


def test_32_threads_overspend_is_bounded_by_the_estimates_in_flight():
    cap = Decimal("0.5")
    led = ledger(budget=Budget(daily_usd=float(cap)))
    # every answer is 60 output tokens longer than its max_tokens estimate said
    successes, max_reserved = _spend_concurrently(led, threads=32, actual_output_tokens=160)
    spent = Decimal(str(led.report()["totals"]["cost_usd"]))
    estimate = Decimal("0.001008")
    assert spent > cap * Decimal("0.99")
    assert spent - cap <= 32 * estimate  # never more than one estimate per thread in flight
    assert max_reserved <= 32 * estimate
    assert successes == spent / Decimal("0.001488")  # 104*2 + 160*8 micro-USD each


# -- through the Client -----------------------------------------------------------------------

OK = chat_body("gpt-4.1", 104, 100)


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_refused_by_the_budget_at_admission_counts_in_stats(rsps, make_client, stream):
    client = make_client([{"id": "a", "base_url": A}], budget={"daily_usd": 0.0001}, wall_clock=WallClock())
    with pytest.raises(BudgetExceededError):
        client.chat_completion(msgs(400), model="gpt-4.1", max_tokens=100, stream=stream)
    assert len(rsps.calls) == 0
    stats = client.stats()
    assert (stats["calls"], stats["successes"], stats["failures"]) == (1, 0, 1)
    assert stats["failures_by_error"] == {"BudgetExceededError": 1} and stats["success_rate"] == 0.0


def test_client_refuses_over_budget_call_without_sending(rsps, make_client):
    rsps.post(A + "/chat/completions", json=OK)
    client = make_client([{"id": "a", "base_url": A}], budget={"daily_usd": 0.0015}, wall_clock=WallClock())
    resp = client.chat_completion(msgs(400), model="gpt-4.1", max_tokens=100)
    assert resp.extra["cost"] == {"model": "gpt-4.1", "estimated_usd": 0.001008, "cost_usd": 0.001008,
                                  "input_tokens": 104, "output_tokens": 100, "from_usage": True,
                                  "cached_tokens": 0, "cache_write_tokens": 0, "cache_saved_usd": 0.0}
    with pytest.raises(BudgetExceededError):
        client.chat_completion(msgs(400), model="gpt-4.1", max_tokens=100)
    assert len(rsps.calls) == 1
    report = client.cost_report(baseline_model="claude-sonnet-4.5")
    assert report["totals"]["requests"] == 1 and report["in_flight_reserved_usd"] == 0.0
    assert report["baseline"]["savings_usd"] == 0.000804  # 104*3 + 100*15 = 1812 - 1008 micro-USD


def test_client_downgrades_and_marks_the_answer(rsps, make_client):
    rsps.post(A + "/chat/completions", json={**OK, "model": "gemini-2.5-flash"})
    client = make_client([{"id": "a", "base_url": A}], wall_clock=WallClock(),
                         budget=Budget(daily_usd=0.001, on_exceeded="downgrade"))
    resp = client.chat_completion(msgs(400), model="gpt-4.1", max_tokens=100)
    assert json.loads(rsps.calls[0].request.body)["model"] == "gemini-2.5-flash"
    assert resp.fallback is True
    assert resp.extra["cost"]["downgraded_from"] == "gpt-4.1"
    assert resp.extra["cost"]["cost_usd"] == 0.0002812  # 104*0.30 + 100*2.50 micro-USD


def test_failed_call_releases_its_reservation_and_costs_nothing(rsps, make_client):
    rsps.post(A + "/chat/completions", status=400, json={"error": {"message": "bad"}})
    client = make_client([{"id": "a", "base_url": A}], budget={"daily_usd": 1.0})
    with pytest.raises(Exception):
        client.chat_completion(msgs(400), model="gpt-4.1", max_tokens=100)
    report = client.cost_report()
    assert report["totals"]["requests"] == 0 and report["in_flight_reserved_usd"] == 0.0


def test_store_after_fork_has_a_fresh_lock_and_no_parent_reservations():
    led = ledger(budget=Budget(daily_usd=0.0015))
    led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})  # in flight in the "parent"
    held, release = threading.Event(), threading.Event()

    def hold():
        with led.store._ledger_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    try:
        led.store.reset_after_fork()  # what the Client's after-fork hook calls in the child
        assert led.store.reserved_usd() == 0
        led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})  # neither deadlocks nor counts the parent's
    finally:
        release.set()
        holder.join(10)


def test_record_spend_counts_a_request_held_elsewhere_without_dropping_a_local_reservation():
    store, day = InMemorySpendStore(), "2026-11-26"
    capped = [pricing.Limit("gpt-4.1", "day", Decimal("1"))]
    held = Reservation("gpt-4.1", day, 10, 10, Decimal("0.0004"))
    assert store.try_reserve(held, capped) is None  # held here: makes the model's own totals
    elsewhere = Reservation("gpt-4.1", day, 10, 10, Decimal("0.0003"))  # held in a shared store
    store.record_spend(elsewhere, input_tokens=10, output_tokens=5, cost_usd=Decimal("0.00006"))
    assert store._totals[(day, "gpt-4.1")] == [Decimal("0.00006"), Decimal("0.0004")]
    assert store._totals[(day, None)] == [Decimal("0.00006"), Decimal("0.0004")]
    store.settle(held, input_tokens=10, output_tokens=10, cost_usd=Decimal("0.0001"))
    assert all(pair == [Decimal("0.00016"), 0] for pair in store._totals.values())
    assert [(r.requests, r.input_tokens, r.output_tokens) for r in store.rows()] == [(2, 20, 15)]


def test_ledger_after_fork_renews_the_price_tables_lock_and_the_store():
    led = ledger(budget=Budget(daily_usd=1.0))
    led.admit("gpt-4.1", msgs(400), {"max_tokens": 100})  # in flight in the "parent"
    assert led.prices._warned_lock.acquire(timeout=1)  # held by a parent thread at fork time
    led.reset_after_fork()  # what the Client's after-fork hook calls in the child
    assert led.store.reserved_usd() == 0
    renewed = led.prices._warned_lock
    assert renewed.acquire(timeout=1)  # free in the child (a bounded check: no hang if it is not)
    renewed.release()
    assert led.prices.cost_usd("no-such-model", 10, 10) == 0.0  # warns, taking the lock
