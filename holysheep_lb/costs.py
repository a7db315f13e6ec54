"""One chat call's spend, model by model: the cost steps the model chain runs.

The client reserves the first model's estimate before the chain runs (that is where a
budget may downgrade the call). Every other model the chain sends the call to reserves
its own estimate against its own caps first, so a fallback answer is priced and recorded
as the model that gave it, a fallback whose caps refuse is skipped, and spend still
passes a cap only by what answers exceed their estimates. A model that gives no answer
gives its reservation back; a canned ``fallback_reply`` costs nothing. An attempt that
timed out after its request was sent keeps its model's estimate as unconfirmed spend
(:meth:`CallCosts.unanswered`): the gateway may well have answered, and billed, it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .pricing import Reservation, Settled, SpendLedger
from .usage import total_tokens

__all__ = ["CallCosts", "StreamCosts", "cost_info"]

log = logging.getLogger(__name__)

SettleTokens = Callable[[Optional[int]], None]
OnSettled = Callable[[Any, Dict[str, Any]], None]  # (a stream's outcome, its cost_info)


def cost_info(reservation: Optional[Reservation], settled: Optional[Settled]) -> Dict[str, Any]:
    """``resp.extra["cost"]``; all zeros (model None) when no model was paid for.

    ``cached_tokens`` of the ``input_tokens`` were read from the provider's prompt cache
    (billed at the cached rate), ``cache_write_tokens`` written to it, and
    ``cache_saved_usd`` is what that saved against the input rate.
    """
    if reservation is None or settled is None:
        return {"model": None, "estimated_usd": 0.0, "cost_usd": 0.0, "input_tokens": 0,
                "output_tokens": 0, "from_usage": False, "cached_tokens": 0, "cache_write_tokens": 0,
                "cache_saved_usd": 0.0}
    return {"model": reservation.model, "estimated_usd": float(reservation.amount_usd),
            "cost_usd": float(settled.cost_usd), "input_tokens": settled.input_tokens,
            "output_tokens": settled.output_tokens, "from_usage": settled.from_usage,
            "cached_tokens": settled.cached_tokens, "cache_write_tokens": settled.cache_write_tokens,
            "cache_saved_usd": float(settled.cache_saved_usd)}


class CallCosts:
    """The chain's ``ModelCosts`` for one call answered at once (a :class:`Response`).

    ``first`` is the reservation the client made for the chain's first model. Every
    reservation is settled or cancelled exactly once; call :meth:`close` when the chain
    is done (in a ``finally``): it gives back whatever is still held, ``first`` if the
    chain never sent to that model (its breaker was open), or a reservation whose call
    was interrupted (KeyboardInterrupt) before it was settled. Used by the calling
    thread only.
    """

    def __init__(self, ledger: SpendLedger, first: Reservation, messages: Sequence[Mapping[str, Any]],
                 params: Mapping[str, Any]) -> None:
        self._ledger = ledger
        self._first: Optional[Reservation] = first
        self._held: List[Reservation] = [first]  # reserved, not yet settled nor cancelled
        self._messages = messages
        self._params = params
        self._sending: Optional[Reservation] = None  # the model the chain sends to now

    def reserve(self, model: str) -> Reservation:
        first, self._first = self._first, None
        if first is not None:
            if first.model == model:
                self._sending = first
                return first
            self.cancel(first)  # the chain went past the first model without sending
        held = self._ledger.admit(model, self._messages, self._params, downgrade=False)
        self._held.append(held)
        self._sending = held
        return held

    def unanswered(self) -> None:
        """An attempt timed out after its request was sent: count the estimate of the model
        being sent to as unconfirmed spend. May run on a hedged copy's thread."""
        sending = self._sending
        if sending is not None:
            self._ledger.record_unconfirmed(sending)

    def _take(self, held: Reservation) -> bool:
        """Whether ``held`` was still held (it no longer is): settle or cancel it once."""
        for i, reservation in enumerate(self._held):
            if reservation is held:  # by identity: two calls may hold equal estimates
                del self._held[i]
                return True
        return False

    def cancel(self, held: Reservation) -> None:
        if self._take(held):
            self._ledger.cancel(held)

    def answered(self, held: Reservation, result: Any, settle_tokens: SettleTokens) -> None:
        try:
            if self._take(held):
                result.extra["cost"] = cost_info(held, self._ledger.settle(held, result.get("usage")))
        finally:  # the rate limits hear the usage even if the spend step was interrupted
            settle_tokens(total_tokens(result.get("usage") if isinstance(result, Mapping) else None))

    def close(self) -> None:
        self._first = None
        while self._held:
            self.cancel(self._held[-1])


class StreamCosts(CallCosts):
    """``ModelCosts`` for a stream: the answering model is settled from the usage that
    ends the stream (pass :meth:`ended` as the stream's ``on_end``); a stream cut short
    keeps its estimates. :meth:`ended` may run on another thread (the stream reaper).

    ``on_settled(outcome, cost)`` hears each stream it settles (``cost`` as
    :func:`cost_info`), once: from :meth:`ended`, or from :meth:`answered` for a stream
    that ended while it was opened.
    """

    def __init__(self, ledger: SpendLedger, first: Reservation, messages: Sequence[Mapping[str, Any]],
                 params: Mapping[str, Any], on_settled: Optional[OnSettled] = None) -> None:
        super().__init__(ledger, first, messages, params)
        self._open: Optional[Tuple[Reservation, SettleTokens]] = None
        self._ended: Any = None  # the outcome of a stream that ended before answered() took it
        self._on_settled = on_settled

    def answered(self, held: Reservation, result: Any, settle_tokens: SettleTokens) -> None:
        if not self._take(held):
            return
        if getattr(result, "state", "open") == "open":
            self._open = (held, settle_tokens)  # settled by ended()
        else:  # the stream already ended while it was opened: ended() found nothing to settle
            outcome, self._ended = self._ended, None
            self._settle(held, settle_tokens, getattr(result, "usage", None), outcome)

    def ended(self, outcome: Any) -> None:
        """The stream's ``on_end`` hook (a :class:`~holysheep_lb.streaming.StreamOutcome`)."""
        pending, self._open = self._open, None
        if pending is None:
            self._ended = outcome  # answered() settles it, if the chain takes the stream
        else:
            self._settle(*pending, outcome.usage, outcome)

    def close(self) -> None:
        self._ended = None
        super().close()

    def _settle(self, held: Reservation, settle_tokens: SettleTokens, usage: Any, outcome: Any) -> None:
        failed: Optional[Exception] = None
        try:
            settled: Optional[Settled] = self._ledger.settle(held, usage)
        except Exception as exc:  # the spend store failed: raised below, once the call has ended
            failed, settled = exc, None
        finally:
            settle_tokens(total_tokens(usage))
        if self._on_settled is not None and outcome is not None:
            if failed is not None:
                # The call still ends for its observers (a span must not stay open), with
                # the error its caller gets and the reservation's estimate as its cost.
                outcome = dataclasses.replace(outcome, error=outcome.error or failed)
                settled = Settled(held.input_tokens, held.output_tokens, held.amount_usd, False)
            self._on_settled(outcome, cost_info(held, settled))
        if failed is not None:
            raise failed
