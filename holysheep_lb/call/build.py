"""Wiring: a client's components from its ClientConfig, and the call pipelines over them."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..affinity import AffinityRouter
from ..breakers import BreakerBoard
from ..breakers import wall_clock as breaker_wall_clock
from ..cache import credentials_fingerprint, make_cache
from ..config import ClientConfig
from ..fallbacks import ModelChain
from ..health import HealthChecker
from ..hedging import Hedger
from ..models import ModelRouter
from ..hangs import HangPolicy
from ..nodes import EjectionPolicy, NodeState
from ..pricing import SpendLedger
from ..policy.retry import RetryBudget, RetryPolicy
from ..ratelimit import RateLimits
from ..selection import Selector, make_strategy
from ..streaming import StreamOutcome, StreamReaper, StreamStats
from ..transport import Transport
from .attempts import AttemptStage, Direct, JsonSender, NodeAttempt, OneAttempt
from .chain import ChainStage
from .costs import CostsStage
from .hedge import HedgeStage
from .stream import StreamLimits, StreamSender, StreamStage
from .tally import CallTally

__all__ = ["Parts", "Pipelines", "build_parts", "build_pipelines", "policy_from_config", "reset_after_fork"]


def policy_from_config(cfg: ClientConfig) -> RetryPolicy:
    return RetryPolicy(cfg.max_retries, cfg.backoff_base_s, cfg.backoff_cap_s, cfg.retry_after_cap_s)


@dataclass
class Parts:
    """A client's long-lived components."""

    policy: RetryPolicy
    selector: Selector
    breakers: BreakerBoard
    chain: ModelChain
    rescue_chain: ModelChain  # a stream rescue's: one model, no fallbacks
    retry_budget: Optional[RetryBudget]
    hedger: Optional[Hedger]
    health: Optional[HealthChecker]
    router: ModelRouter
    ledger: SpendLedger
    cache: Any
    cache_scope: str
    stream_stats: StreamStats
    reaper: StreamReaper
    tally: CallTally


@dataclass
class Pipelines:
    """The stages a call enters by: JSON requests, chat (cost steps first), chat streams."""

    request: ChainStage
    chat: CostsStage
    stream: StreamStage


def build_parts(cfg: ClientConfig, *, policy: RetryPolicy, clock: Callable[[], float],
                rand: Callable[[], float], wall_clock: Callable[[], float], owner: object) -> Parts:
    """Every component; ``owner`` (the client) stops the health thread when collected."""
    states = [
        NodeState(node, Transport(node, api_key=cfg.api_key, pool_maxsize=cfg.pool_maxsize,
                                  max_response_bytes=cfg.max_response_bytes, verify=cfg.verify,
                                  allow_insecure_http=cfg.allow_insecure_http))
        for node in cfg.nodes
    ]
    strategy = make_strategy(cfg.strategy)
    if getattr(strategy, "default_region", "missing") is None and cfg.default_region:
        strategy.default_region = cfg.default_region  # type: ignore[attr-defined]
    selector = Selector(
        states, strategy,
        ejection=EjectionPolicy(cfg.eject_after_failures, cfg.ejection_base_s,
                                cfg.ejection_max_s, slow_start_s=cfg.slow_start_s),
        panic_threshold=cfg.panic_threshold, clock=clock, rand=rand,
        hang=HangPolicy(rescue=cfg.rescue_hung_calls),  # calls stuck on a hung node are cut, retried elsewhere
        affinity=AffinityRouter([s.id for s in states], cfg.affinity),  # prompt-cache affinity
    )
    breakers = BreakerBoard(model_settings=cfg.breaker, per_model=cfg.model_breakers,
                            node_settings=cfg.node_breakers, storage_factory=cfg.breaker_storage,
                            clock=breaker_wall_clock(clock))
    limits = RateLimits(requests_per_minute=cfg.requests_per_minute, tokens_per_minute=cfg.tokens_per_minute,
                        per_model=cfg.model_rate_limits, factory=cfg.rate_limiter_factory,
                        burst_s=cfg.rate_limit_burst_s, clock=clock)
    chain = ModelChain(breakers=breakers, limits=limits, fallbacks=cfg.fallbacks,
                       fallback_reply=cfg.fallback_reply, clock=clock, policy=policy,
                       context_window_fallbacks=cfg.context_window_fallbacks,
                       content_policy_fallbacks=cfg.content_policy_fallbacks, tell_trials=True)
    rescue_chain = ModelChain(breakers=breakers, limits=limits, clock=clock, policy=policy, tell_trials=True)
    retry_budget = None
    if cfg.retry_budget_ratio is not None:
        retry_budget = RetryBudget(cfg.retry_budget_ratio, min_per_s=cfg.retry_budget_min_per_s,
                                   ttl_s=cfg.retry_budget_ttl_s, clock=clock)
    hedger = None
    if cfg.hedge_delay_s is not None:
        hedger = Hedger(delay_s=cfg.hedge_delay_s, selector=selector, max_ratio=cfg.hedge_max_ratio,
                        max_threads=cfg.hedge_max_threads, retry_budget=retry_budget, clock=clock)
    health = None
    if cfg.health_check_interval_s is not None:
        health = HealthChecker(
            selector, interval_s=cfg.health_check_interval_s, timeout_s=cfg.health_check_timeout_s,
            unhealthy_threshold=cfg.unhealthy_threshold, healthy_threshold=cfg.healthy_threshold,
            clock=clock, rand=rand,
        )
        health.start()
        # A client dropped without close() must not leave its thread probing forever
        # (the thread holds the selector, never the client).
        weakref.finalize(owner, health.stop, 0.0)
    return Parts(
        policy=policy, selector=selector, breakers=breakers, chain=chain, rescue_chain=rescue_chain,
        retry_budget=retry_budget,
        hedger=hedger, health=health, router=cfg.router or ModelRouter(fallbacks=cfg.fallbacks),
        ledger=SpendLedger(cfg.prices, store=cfg.spend_store, budget=cfg.budget, wall_clock=wall_clock),
        cache=make_cache(cfg.cache, timer=clock),
        # a cache shared by several clients answers only the ones sending the same credentials
        cache_scope=credentials_fingerprint(cfg.nodes, cfg.api_key),
        stream_stats=StreamStats(), reaper=StreamReaper(clock), tally=CallTally(clock),
    )


def build_pipelines(cfg: ClientConfig, parts: Parts, *, sleep: Callable[[float], None],
                    is_available: Callable[[str], bool],
                    stream_ended: Callable[[StreamOutcome], None]) -> Pipelines:
    """The stages, outermost first; ``stream_ended`` counts a stream when it ends."""
    timeouts = (cfg.connect_timeout_s, cfg.read_timeout_s)
    common = dict(selector=parts.selector, breakers=parts.breakers, policy=parts.policy)
    json_sender = JsonSender(parts.selector)
    json_attempt = NodeAttempt(sender=json_sender, **common)  # type: ignore[arg-type]
    one: OneAttempt = Direct(json_attempt)
    if parts.hedger is not None:
        one = HedgeStage(hedger=parts.hedger, selector=parts.selector, breakers=parts.breakers,
                         ledger=parts.ledger, next=json_attempt)
    json_loop = AttemptStage(next=one, sender=json_sender, timeouts=timeouts, sleep=sleep,
                             **common)  # type: ignore[arg-type]
    limits = StreamLimits(cfg.model_capabilities, stall_timeout_s=cfg.stream_stall_timeout_s,
                          first_token_timeout_s=(cfg.first_token_timeout_s if cfg.first_token_timeout_s is not None
                                                 else cfg.stream_first_chunk_timeout_s))
    stream_sender = StreamSender(selector=parts.selector, reaper=parts.reaper, limits=limits,
                                 max_response_bytes=cfg.max_response_bytes)
    stream_loop = AttemptStage(next=Direct(NodeAttempt(sender=stream_sender, **common)),  # type: ignore[arg-type]
                               sender=stream_sender, timeouts=timeouts, sleep=sleep,
                               **common)  # type: ignore[arg-type]  # streams are never hedged
    chain = dict(chain=parts.chain, tally=parts.tally, retry_budget=parts.retry_budget, hedger=parts.hedger)
    request = ChainStage(next=json_loop, **chain)  # type: ignore[arg-type]
    chat = CostsStage(ledger=parts.ledger, cache=parts.cache, cache_scope=parts.cache_scope,
                      default_region=cfg.default_region, is_available=is_available, tally=parts.tally,
                      affinity=parts.selector.affinity, next=request)
    # a stream's rescue opens one model at a time (the rescuer walks the chain), as part of its call
    rescue = ChainStage(next=stream_loop, chain=parts.rescue_chain, tally=parts.tally,
                        retry_budget=None, hedger=None, part_of_call=True)
    stream = StreamStage(ledger=parts.ledger, is_available=is_available, tally=parts.tally,
                         record_end=stream_ended, next=ChainStage(next=stream_loop, **chain),  # type: ignore[arg-type]
                         rescue_next=rescue, chain=parts.chain, selector=parts.selector,
                         capabilities=cfg.model_capabilities, rescue_mode=cfg.stream_rescue,
                         max_rescues=cfg.stream_max_rescues)
    return Pipelines(request=request, chat=chat, stream=stream)


def reset_after_fork(parts: Parts) -> None:
    """In a forked child: fresh locks and sessions; the parent's calls do not exist here."""
    parts.tally.reset_after_fork()
    parts.selector.reset_lock_after_fork()
    for node in parts.selector.nodes:
        node.reset_after_fork()  # the parent's calls do not exist in this process (nor its hangs)
        node.transport.reset_after_fork()
    parts.chain.reset_after_fork()
    parts.rescue_chain.reset_after_fork()
    for part in (parts.retry_budget, parts.hedger, parts.health, parts.cache):
        if part is not None:
            part.reset_after_fork()
    parts.ledger.reset_after_fork()
    parts.stream_stats.reset_after_fork()
