"""Prompt-cache affinity: consistent hashing with bounded loads, a preference never a promise."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from holysheep_lb.hangs import HangPolicy
from holysheep_lb import ConfigError, InvalidRequestError, Node
from holysheep_lb.affinity import (
    AffinityRouter,
    AffinitySettings,
    HashRing,
    key_position,
    prefix_key,
)
from holysheep_lb.nodes import EjectionPolicy, NodeState
from holysheep_lb.selection import Selector, make_strategy

from .conftest import API_KEY

LONG = "You are a support assistant. " * 200  # ~1,450 tokens: above the 1,024 minimum
KEYS = [key_position(f"conversation-{i}") for i in range(4000)]


class _NoTransport:
    def close(self):
        pass


def _selector(ids, clock, strategy="round_robin", hang=None, **settings):
    states = [NodeState(Node(id=i, base_url=f"http://127.0.0.1:1/{i}"), _NoTransport()) for i in ids]
    extra = {} if hang is None else {"hang": hang}
    return Selector(states, make_strategy(strategy), clock=clock, rand=random.Random(3).random, **extra,
                    ejection=EjectionPolicy(after_failures=1, base_s=30, max_s=300, jitter=0.0),
                    affinity=AffinityRouter(ids, AffinitySettings(**settings)))


def _call(sel, key, latency_ms=100.0):
    started = sel.clock()
    node = sel.pick(started=started, affinity_key=key)
    sel.release_success(node, latency_ms, started=started)
    return node.id


# -- the ring ------------------------------------------------------------------------------------

def test_adding_a_node_moves_about_one_in_n_keys_all_to_the_new_node():
    before, after = HashRing(["a", "b", "c", "d"]), HashRing(["a", "b", "c", "d", "e"])
    moved = [(before.owner(k), after.owner(k)) for k in KEYS if before.owner(k) != after.owner(k)]
    assert all(new == "e" for _, new in moved)
    assert 0.13 < len(moved) / len(KEYS) < 0.27  # about 1/5


def test_removing_a_node_moves_only_its_own_keys():
    full, less = HashRing(["a", "b", "c", "d"]), HashRing(["a", "b", "d"])
    for k in KEYS:
        if full.owner(k) != "c":
            assert less.owner(k) == full.owner(k)


def test_keys_spread_over_the_nodes_about_evenly():
    ring = HashRing(["a", "b", "c", "d"])
    counts = Counter(ring.owner(k) for k in KEYS)
    assert max(counts.values()) / (len(KEYS) / 4) < 1.2


# -- the key -------------------------------------------------------------------------------------

def test_default_key_is_the_prefix_before_the_last_user_message_once_long_enough():
    conv = [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]
    later = conv + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    assert prefix_key("gpt-4.1", conv) == prefix_key("gpt-4.1", conv[:1] + [{"role": "user", "content": "other"}])
    assert prefix_key("gpt-4.1", conv) != prefix_key("gpt-4.1", later)  # the history grew: a longer prefix
    assert prefix_key("gpt-4.1", conv) != prefix_key("deepseek-v3.2", conv)
    assert prefix_key("gpt-4.1", [{"role": "system", "content": "short"}, {"role": "user", "content": "hi"}]) is None
    assert prefix_key("gpt-4.1", [{"role": "user", "content": LONG}]) is None  # nothing before the user message


def test_minimum_prefix_differs_by_model_and_users_can_extend_the_table():
    mid = [{"role": "system", "content": "y" * 2400}, {"role": "user", "content": "hi"}]  # ~600 tokens
    assert prefix_key("gpt-4.1", mid) is None
    assert prefix_key("deepseek-v3.2", mid) is not None
    router = AffinityRouter(["a"], AffinitySettings(min_prefix_tokens={"gpt-4.1": 512}))
    assert router.key_for("gpt-4.1", mid, {}) is not None
    assert router.key_for("gpt-4o", mid, {}) is None


def test_a_call_may_pass_its_own_key_and_bad_ones_are_refused_without_echoing_them():
    router = AffinityRouter(["a", "b"])
    assert router.key_for("gpt-4.1", [], {}, "conversation-7") == key_position("conversation-7")
    with pytest.raises(InvalidRequestError, match="affinity_key") as info:
        router.key_for("gpt-4.1", [], {}, "")
    with pytest.raises(InvalidRequestError) as info:
        router.key_for("gpt-4.1", [], {}, 12345678)
    assert "12345678" not in str(info.value)


def test_the_key_never_includes_the_api_key(make_client):
    conv = [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]
    nodes = [{"id": "a", "base_url": "https://a.example/v1"}, {"id": "b", "base_url": "https://b.example/v1"}]
    one = make_client(nodes, api_key=API_KEY)
    other = make_client(nodes, api_key="sk-another-key-entirely-0000000000")
    keys = [c.selector.affinity.key_for("gpt-4.1", conv, {}) for c in (one, other)]
    assert keys[0] == keys[1] == prefix_key("gpt-4.1", conv)  # a function of model, tools and prefix only
    assert isinstance(keys[0], int)
    assert API_KEY not in repr(one.stats()) + repr(one.nodes())


def test_settings_are_validated_naming_the_field():
    with pytest.raises(ConfigError, match="affinity.balance_factor"):
        AffinitySettings(balance_factor=1.0)
    with pytest.raises(ConfigError, match="affinity.slower_factor"):
        AffinitySettings.coerce({"slower_factor": "x"})
    with pytest.raises(ConfigError, match="affinity.colour"):
        AffinitySettings.coerce({"colour": 1})
    assert not AffinitySettings.coerce(False).enabled and AffinitySettings.coerce(None).enabled


# -- routing -------------------------------------------------------------------------------------

def test_a_key_keeps_to_its_node_while_other_keys_spread(clock):
    sel = _selector(["a", "b", "c", "d"], clock)
    keys = KEYS[:40]
    first = {k: _call(sel, k) for k in keys}
    for _ in range(3):
        assert {k: _call(sel, k) for k in keys} == first
    assert len(set(first.values())) == 4
    summary = sel.affinity.summary()
    assert summary["keyed_calls"] == 160 and summary["hit_rate"] > 0.95


def test_an_ejected_node_loses_its_keys_and_gets_them_back(clock):
    sel = _selector(["a", "b", "c", "d"], clock)
    keys = [k for k in KEYS[:200] if sel.affinity.ring.owner(k) == "b"][:10]
    assert all(_call(sel, k) == "b" for k in keys)
    started = clock()
    node = sel.pick(started=started, affinity_key=keys[0])
    sel.release_failure(node, "connect", 5.0, started=started)  # after_failures=1: ejected for 30 s
    assert sel.by_id["b"].unusable_reason(clock()) == "ejected"
    moved = {k: _call(sel, k) for k in keys}
    assert "b" not in moved.values()
    assert moved == {k: _call(sel, k) for k in keys}  # to one other node each, consistently
    clock.advance(31)  # half-open: one trial, which succeeds and re-admits the node
    trial = sel.pick(started=clock(), affinity_key=keys[0])
    assert trial.id == "b"
    sel.release_success(trial, 100.0, started=clock())
    assert sel.by_id["b"].unusable_reason(clock()) is None
    assert all(_call(sel, k) == "b" for k in keys)


def test_a_hung_node_loses_its_keys_and_gets_them_back_when_it_answers(clock):
    # one stuck request is enough here (by default a lone one is left to its own limits)
    sel = _selector(["a", "b", "c", "d"], clock, hang=HangPolicy(watch_interval_s=None, min_waiting=1))
    for k in KEYS[:80]:
        _call(sel, k)  # every node measured at 100 ms
    keys = [k for k in KEYS[:200] if sel.affinity.ring.owner(k) == "c"][:5]
    hung_at = clock()
    hung = sel.pick(started=hung_at, affinity_key=keys[0])
    assert hung.id == "c"
    clock.advance(1.0)  # unanswered for 1 s: ten times the others' latency
    assert all(_call(sel, k) != "c" for k in keys)
    assert sel.by_id["c"].unusable_reason(clock()) == "hung"  # hang detection (issue 17) left it out
    passed_over = sel.affinity.summary()["preferred_passed_over"]
    assert passed_over["unusable"] >= len(keys)
    sel.release_success(hung, 120.0, started=hung_at)  # it answers at last, and fast again
    for _ in range(5):
        _call(sel, keys[1], 100.0)
    clock.advance(30)  # the slow sample decays
    assert all(_call(sel, k) == "c" for k in keys)


def test_a_throttled_node_is_passed_over(clock):
    sel = _selector(["a", "b"], clock)
    key = next(k for k in KEYS if sel.affinity.ring.owner(k) == "a")
    sel.by_id["a"].throttled_until = clock() + 5
    assert _call(sel, key) == "b"
    clock.advance(6)
    assert _call(sel, key) == "a"


def test_bounded_loads_one_hot_key_cannot_take_much_more_than_its_share_under_load(clock):
    sel = _selector(["a", "b", "c", "d"], clock)
    hot = KEYS[0]
    counts: Counter = Counter()
    for _ in range(125):  # 16 calls in flight at a time, all with the same key
        held = [sel.pick(started=clock(), affinity_key=hot) for _ in range(16)]
        for node in held:
            sel.release_success(node, 100.0, started=clock())
        counts.update(n.id for n in held)
    assert counts[sel.affinity.ring.owner(hot)] == max(counts.values())
    assert max(counts.values()) / 500 <= 1.25  # at most ceil(1.2 x 16 / 4) = 5 of every 16


def test_a_lone_conversation_keeps_to_its_node_while_nothing_else_is_in_flight(clock):
    sel = _selector(["a", "b", "c", "d"], clock)
    assert len({_call(sel, KEYS[0]) for _ in range(200)}) == 1


def test_a_node_with_many_requests_in_flight_is_passed_over(clock):
    sel = _selector(["a", "b", "c", "d"], clock)
    key = next(k for k in KEYS if sel.affinity.ring.owner(k) == "a")
    first = sel.pick(started=clock(), affinity_key=key)
    assert first.id == "a"
    # 1 of 1 in flight and every recent keyed call: above 1.2 x its share of both
    second = sel.pick(started=clock(), affinity_key=key)
    assert second.id != "a"
    for node in (first, second):
        sel.release_success(node, 100.0, started=clock())
    assert _call(sel, key) == "a"  # nothing in flight: home again


def test_a_retry_follows_the_ring_and_is_not_counted_as_a_miss(clock):
    sel = _selector(["a", "b", "c", "d"], clock)
    key = KEYS[5]
    order = list(sel.affinity.ring.walk(key))
    first = sel.pick(started=clock(), affinity_key=key)
    second = sel.pick(exclude=[first.id], started=clock(), affinity_key=key)
    assert [first.id, second.id] == order[:2]
    assert sel.affinity.summary()["keyed_calls"] == 1


def test_affinity_off_leaves_the_strategy_alone(clock):
    sel = _selector(["a", "b", "c"], clock, enabled=False)
    conv = [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]
    assert sel.affinity.key_for("gpt-4.1", conv, {}) is None
    assert [_call(sel, sel.affinity.key_for("gpt-4.1", conv, {})) for _ in range(6)] == list("abcabc")


def test_nodes_and_stats_show_affinity_and_cached_token_share(clock):
    sel = _selector(["a", "b"], clock)
    key = next(k for k in KEYS if sel.affinity.ring.owner(k) == "a")
    _call(sel, key)
    sel.affinity.record_usage("a", {"prompt_tokens": 2000, "completion_tokens": 1,
                                    "prompt_tokens_details": {"cached_tokens": 1500}})
    sel.affinity.record_usage("b", "junk")  # ignored, never raises
    sel.affinity.record_usage("zzz", {"prompt_tokens": 1})  # not a node: ignored
    row = {r["id"]: r for r in sel.snapshot()}["a"]
    assert row["affinity"] == {"preferred_calls": 1, "sent_to_preferred": 1, "hit_rate": 1.0}
    assert row["prompt_cache"] == {"answers_with_usage": 1, "prompt_tokens": 2000, "cached_tokens": 1500,
                                   "cached_share": 0.75}
    assert sel.node_stats()["b"]["prompt_cache"]["cached_share"] is None


# -- the call pipeline carries the key explicitly ---------------------------------------------------


def test_the_attempt_loop_sends_the_calls_key_and_a_retry_follows_the_ring(clock):
    from holysheep_lb import InternalServerError

    from .test_call_stages import FakeAttempt, _ctx, _loop, _parts

    parts = _parts(clock, strategy="round_robin")
    key = next(k for k in KEYS if list(parts.selector.affinity.ring.walk(k))[0] == "c")
    order = list(parts.selector.affinity.ring.walk(key))
    fake = FakeAttempt(parts, {order[0]: InternalServerError("down", status_code=503),
                               order[1]: "answer", order[2]: "answer"})
    node_id, result = _loop(parts, fake, []).run(_ctx(clock, model="m", affinity_key=key))
    assert fake.seen == order[:2] and node_id == order[1] and result == "answer"
    assert parts.selector.affinity.summary()["keyed_calls"] == 1


def test_a_hedged_copy_gets_no_key(clock):
    from holysheep_lb.call.hedge import HedgeStage

    from .test_call_stages import _ctx, _parts

    parts = _parts(clock, strategy="round_robin", hedge_delay_s=0.1)
    seen = []
    real_pick = parts.selector.pick

    def spy(**kwargs):
        seen.append(kwargs)
        return real_pick(**kwargs)

    parts.selector.pick = spy  # type: ignore[method-assign]
    stage = HedgeStage(hedger=parts.hedger, selector=parts.selector, breakers=parts.breakers,
                       ledger=parts.ledger, next=None)  # type: ignore[arg-type]
    ctx = _ctx(clock, model="m", affinity_key=KEYS[0])
    ctx.tried.append("a")
    other = stage.pick_other(ctx)
    assert other is not None and other.id != "a"
    assert seen and seen[0].get("affinity_key") is None and seen[0]["fresh_only"] is True
    assert parts.selector.affinity.summary()["keyed_calls"] == 0


def test_chat_completion_puts_the_key_on_the_call_context(make_client, monkeypatch):
    client = make_client([{"id": n, "base_url": f"https://{n}.example/v1"} for n in "ab"])
    seen = []

    def run(ctx, cache=None):  # the chat pipeline's entry: record the key, send nothing
        seen.append(ctx.affinity_key)
        raise InvalidRequestError("stop", None, "here")

    monkeypatch.setattr(client._pipes.chat, "run", run)
    conv = [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]
    for messages, kwargs in ((conv, {}), (conv, {"affinity_key": "conversation-7"}),
                             ([{"role": "user", "content": "hi"}], {})):
        with pytest.raises(InvalidRequestError, match="stop"):
            client.chat_completion(messages, model="gpt-4.1", **kwargs)
    assert seen == [prefix_key("gpt-4.1", conv), key_position("conversation-7"), None]


def test_the_default_key_tells_apart_prefixes_that_concatenate_alike():
    user = {"role": "user", "content": "q"}
    split_a = [{"role": "system", "content": LONG + "ab"}, {"role": "system", "content": "c"}, user]
    split_b = [{"role": "system", "content": LONG + "a"}, {"role": "system", "content": "bc"}, user]
    named = [{"role": "system", "content": LONG + "ab", "name": "x"}, {"role": "system", "content": "c"}, user]
    parts = [{"role": "system", "content": [{"type": "text", "text": LONG}]}, user]
    keys = [prefix_key("gpt-4.1", m) for m in (split_a, split_b, named, parts)]
    assert None not in keys and len(set(keys)) == 4
    assert prefix_key("gpt-4.1", split_a, tools=[{"type": "function"}]) != keys[0]
