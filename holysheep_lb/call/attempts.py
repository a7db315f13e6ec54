"""The attempt loop: pick -> permit -> send -> release, until an answer or the policy says stop.

The loop decides nothing: what an outcome means is :func:`~holysheep_lb.policy.classify.classify`'s
answer, and what to do next (retry after W, wait for a throttled node, stop and why) is
:meth:`~holysheep_lb.policy.retry.RetryPolicy.decide`'s. No lock is held while sending.

Stages here::

    AttemptStage.run(ctx)                    the loop over nodes for one model
      next: HedgeStage or NodeAttempt        one attempt (maybe hedged) on a picked node
    NodeAttempt.run(ctx, node, timeout)      node breaker permit, send, release, record
      sender: JsonSender or StreamSender     send(ctx, node, timeout), finish(ctx, node, result, ms)
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Protocol, Tuple

from ..breakers import BreakerBoard, stream_outcome_hook
from ..cleanup import discard
from ..errors import (
    AllAttemptsFailedError,
    APIError,
    APITimeoutError,
    Attempt,
    CircuitOpenError,
    HolySheepError,
    RateLimitError,
)
from ..nodes import NodeState
from ..observe import AttemptEvent, Decision
from ..policy.classify import classify, throttled
from ..policy.retry import RETRY, RETRY_BUDGET_EXHAUSTED, STOP, WAIT, RetryPolicy
from ..response import Response
from ..selection import Selector
from .context import CallContext

__all__ = ["AttemptStage", "NodeAttempt", "JsonSender", "Sender", "OneAttempt", "Timeout"]

log = logging.getLogger(__name__)

Timeout = Tuple[float, float]  # (connect_s, read_s)


class Sender(Protocol):
    """Sends one attempt and turns a successful result into the call's answer."""

    streams: bool  # a stream's node breaker hears how the stream ends, not that it began

    def send(self, ctx: CallContext, node: NodeState, timeout: Timeout) -> Any:
        """One attempt's request; raise an APIError on failure."""

    def wait_s(self, ctx: CallContext, model: Optional[str], read_s: float) -> float:
        """How long an attempt at ``model`` waits for its answer (a stream: its first chunk),
        given the read timeout ``read_s``; the attempt loop bounds it by the deadline."""

    def finish(self, ctx: CallContext, node: NodeState, result: Any, latency_ms: float,
               permit: Any) -> Any:
        """The answer, taking over ``node``'s in-flight slot (and a stream's breaker permit)."""


class OneAttempt(Protocol):
    """The stage after the loop: one attempt on ``node`` (maybe hedged)."""

    def run(self, ctx: CallContext, node: NodeState, timeout: Timeout) -> Tuple[NodeState, Any, float]:
        """(node that answered, result, latency_ms); the caller owns that node's slot."""


class JsonSender:
    """Sends ``ctx.body`` and returns a :class:`Response`."""

    streams = False

    def __init__(self, selector: Selector) -> None:
        self._selector = selector

    def send(self, ctx: CallContext, node: NodeState, timeout: Timeout) -> Any:
        return node.transport.send(ctx.method, ctx.path, body=ctx.body, headers=ctx.headers, timeout_s=timeout,
                                   deadline_s=max(0.001, ctx.deadline - ctx.clock()),
                                   secrets=ctx.extra_headers.values())

    def wait_s(self, ctx: CallContext, model: Optional[str], read_s: float) -> float:
        return read_s

    def finish(self, ctx: CallContext, node: NodeState, result: Any, latency_ms: float, permit: Any) -> Any:
        try:
            total_ms = (ctx.clock() - ctx.started) * 1000.0
        finally:
            self._selector.release_success(node, latency_ms, started=ctx.picked[node.id],
                                           quota_headers=getattr(result, "quota_headers", None))
        data = result.data
        return Response(data, node_id=node.id, region=node.region, attempts=tuple(ctx.attempts),
                        latency_ms=total_ms, request_id=result.request_id, model=data.get("model", ctx.model))


class NodeAttempt:
    """One attempt on one node. It owns the node's slot: on failure (or an interrupt) the
    node and its breaker permit are released and the error raised; on success the caller
    owns the slot (and, for a stream, ``ctx.permits[node.id]``)."""

    def __init__(self, *, selector: Selector, breakers: BreakerBoard, policy: RetryPolicy,
                 sender: Sender) -> None:
        self.selector = selector
        self.breakers = breakers
        self.policy = policy
        self.sender = sender

    def run(self, ctx: CallContext, node: NodeState, timeout: Timeout) -> Tuple[Any, float]:
        selector, clock = self.selector, ctx.clock
        started_at = ctx.picked[node.id]
        permit = result = None
        try:
            permit = self.breakers.admit("node", node.id) if self.breakers.nodes_enabled else None
            t0 = clock()
            result = self.sender.send(ctx, node, timeout)
            ended = clock()
            latency_ms = (ended - t0) * 1000.0
        except APIError as exc:
            freed = False
            try:
                ended = clock()
                latency_ms = (ended - t0) * 1000.0
                outcome = classify(exc)
                freed = True  # a release frees the slot before anything in it can raise
                selector.release_failure(node, outcome.kind, latency_ms, started=started_at,
                                         retry_after_s=self.policy.throttle_s(outcome))
                ctx.attempts.append(Attempt(node.id, latency_ms, outcome.status_code,
                                            f"{type(exc).__name__}: {exc.message}", outcome.kind))
                if ctx.observers:  # reported once the policy decided what follows (next_step)
                    ctx.attempt_failed(exc, AttemptEvent(
                        node.id, node.node.base_url, ctx.model or "", outcome.kind, latency_ms / 1000.0,
                        outcome.status_code, type(exc).__name__, node.id in ctx.hedges, ended_at=ended))
            finally:
                if not freed:
                    selector.release_cancelled(node, started=started_at)
                if permit is not None:
                    permit.record(exc)
                if ctx.costs is not None and isinstance(exc, APITimeoutError) and exc.request_sent:
                    ctx.costs.unanswered()  # the node may still answer it, and the gateway bill it
            raise
        except BaseException:  # refused by the node's breaker, or interrupted: nothing to hold against it
            try:
                if result is not None:
                    discard(result)  # it answered, but nobody will read it
            finally:
                selector.release_cancelled(node, started=started_at)
                if permit is not None:
                    permit.release()
            raise
        status = getattr(result, "status_code", None)
        ctx.attempts.append(Attempt(node.id, latency_ms, status))
        if ctx.observers:
            ctx.emit("attempt_ended", AttemptEvent(node.id, node.node.base_url, ctx.model or "", "ok",
                                                   latency_ms / 1000.0, status, None, node.id in ctx.hedges,
                                                   None, ended))
        if permit is not None:
            if not self.sender.streams:
                permit.record(None)
            else:  # a stream: the node's breaker hears how it ends, not only that it began
                ctx.permits[node.id] = permit
        return result, latency_ms


class Direct:
    """The unhedged :class:`OneAttempt`: the attempt runs on the calling thread."""

    def __init__(self, attempt: NodeAttempt) -> None:
        self.next = attempt

    def run(self, ctx: CallContext, node: NodeState, timeout: Timeout) -> Tuple[NodeState, Any, float]:
        result, latency_ms = self.next.run(ctx, node, timeout)
        return node, result, latency_ms


class AttemptStage:
    """The attempt loop for one model: pick a node, run ``next`` on it, ask the policy."""

    def __init__(self, *, selector: Selector, breakers: BreakerBoard, policy: RetryPolicy, next: OneAttempt,
                 sender: Sender, timeouts: Timeout, sleep: Any) -> None:
        self.selector = selector
        self.breakers = breakers
        self.policy = policy
        self.next = next
        self.sender = sender
        self.timeouts = timeouts
        self.sleep = sleep

    def avoid(self, ctx: CallContext) -> list:
        if not self.breakers.nodes_enabled:
            return ctx.tried
        return ctx.tried + [n.id for n in self.selector.nodes if not self.breakers.allows("node", n.id)]

    def run(self, ctx: CallContext) -> Any:
        """The answer (``sender.finish``'s), or the final error / AllAttemptsFailedError."""
        selector, clock, policy = self.selector, ctx.clock, self.policy
        ctx.started = clock()
        ctx.untried = lambda: len(set(self.avoid(ctx))) < len(selector.nodes)
        last_error: Optional[APIError] = None
        circuit_error: Optional[CircuitOpenError] = None
        reason = "all attempts failed"
        wait_s = 0.0
        while True:
            if ctx.retries == 0 and ctx.is_closed():  # close() ran: no attempt, no new connection
                reason = "the client was closed"
                break
            if wait_s > 0:
                self.sleep(wait_s)
            picked_at = clock()
            node = selector.pick(exclude=self.avoid(ctx), region=ctx.region, started=picked_at,
                                 affinity_key=ctx.affinity_key)
            # Until next.run() takes the node, the finally below releases it on every way
            # out, an interrupt (KeyboardInterrupt, a soft time limit) included.
            held: Optional[NodeState] = node
            try:
                ctx.picked[node.id] = picked_at
                throttle_s = node.throttled_until - clock()
                if throttle_s > 0:  # every node is throttled: the policy says wait or stop
                    decision = policy.decide(throttled(throttle_s), ctx)
                    if decision.action != WAIT:
                        reason = decision.reason
                        break
                    log.debug("all nodes throttled; waiting %.2f s for node %s", decision.wait_s, node.id)
                    self.sleep(decision.wait_s)
                remaining = ctx.deadline - clock()
                if remaining <= 0:
                    reason = "deadline exceeded"
                    break
                timeout = self._timeout(ctx)
                ctx.tried.append(node.id)
                held = None  # from here next.run() releases it
                node, result, latency_ms = self.next.run(ctx, node, timeout)
            except CircuitOpenError as exc:
                # This node's breaker refused (another thread took its half-open trial
                # since avoid() looked): try another node while one is allowed.
                circuit_error = exc
                decision = policy.decide(classify(exc), ctx)
            except APIError as exc:
                last_error = exc
                outcome = classify(exc)
                decision = policy.decide(outcome, ctx)
                if ctx.observers:
                    ctx.attempt_decided(exc, decision.action)
                if outcome.silent and exc.node_id is not None:
                    ctx.silent.add(exc.node_id)
                if decision.action == STOP and decision.reason == "final":
                    exc.attempts = tuple(ctx.attempts)
                    raise
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("attempt %d on node %s failed (%s); %s", ctx.retries + 1, exc.node_id,
                              outcome.kind, "retrying on another node" if decision.action == RETRY
                              else decision.reason)
            else:
                # Success: forget the failed attempts' errors. Their tracebacks hold this frame,
                # which holds the result: a cycle only the cyclic GC would break, keeping a
                # dropped stream's node, reservation and breaker trial until it runs.
                last_error = circuit_error = None
                return self._finish(ctx, node, result, latency_ms)
            finally:
                if held is not None:  # left before next.run() took it: a break, or an interrupt
                    selector.release_cancelled(held, started=picked_at)
            if decision.action != RETRY:
                reason = decision.reason
                if ctx.observers and reason == RETRY_BUDGET_EXHAUSTED:
                    ctx.emit("decided", Decision("retry_budget_exhausted", {"model": ctx.model}))
                break
            ctx.retries += 1
            wait_s = decision.wait_s
        error = self._failed(ctx, reason, last_error, circuit_error)
        last_error = circuit_error = None
        try:
            raise error
        finally:  # the error's traceback holds this frame: no locals may hold the error back
            error = None  # type: ignore[assignment]

    def _timeout(self, ctx: CallContext) -> Timeout:
        """(connect_s, wait_s) of the next attempt: the call's own timeout= else the client's,
        the sender's wait (a stream's first-token limit), bounded by the policy's share of the
        deadline (which leaves room for the chain's next model)."""
        connect_s, read_s = ctx.timeout or self.timeouts
        fallback_wait_s = None if ctx.next_model is None else self.sender.wait_s(ctx, ctx.next_model, read_s)
        limit_s = max(0.001, self.policy.attempt_limit_s(ctx, fallback_wait_s))
        return min(connect_s, limit_s), min(self.sender.wait_s(ctx, ctx.model, read_s), limit_s)

    def _finish(self, ctx: CallContext, node: NodeState, result: Any, latency_ms: float) -> Any:
        permit = ctx.permits.pop(node.id, None)
        if not self.sender.streams:
            return self.sender.finish(ctx, node, result, latency_ms, None)
        try:
            # finish() either returns a stream that owns the node, or raises having released it
            stream = self.sender.finish(ctx, node, result, latency_ms, permit)
            if permit is not None:
                stream.defer_outcome(stream_outcome_hook(permit))
        except BaseException:
            if permit is not None:
                permit.release()  # nothing if the stream's hook already took it
            raise
        return stream

    @staticmethod
    def _failed(ctx: CallContext, reason: str, last_error: Optional[APIError],
                circuit_error: Optional[CircuitOpenError]) -> HolySheepError:
        if circuit_error is not None and not ctx.attempts:
            return circuit_error
        error = AllAttemptsFailedError(reason, ctx.attempts, last_error, retry_after_s=(
            last_error.retry_after_s if isinstance(last_error, RateLimitError) else None))
        error.__cause__ = last_error
        return error
