"""Many chat completions at once on a bounded thread pool, results in input order.

Each call goes through ``Client.chat_completion``, so retries, failover, rate limits and
budgets apply to every item exactly as they do to a single call. Used by
:meth:`holysheep_lb.Client.map` and by cron-style scripts that work through a file of
prompts.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from .errors import HolySheepError, InvalidRequestError
from .response import Response

if TYPE_CHECKING:
    from .client import Client

__all__ = ["run_batch", "BatchResult"]

log = logging.getLogger(__name__)

#: One slot of a batch: the answer, or (with ``return_exceptions=True``) the error.
BatchResult = Union[Response, HolySheepError]


def run_batch(
    client: "Client",
    requests: Iterable[Mapping[str, Any]],
    *,
    max_workers: int = 8,
    return_exceptions: bool = True,
    on_progress: Optional[Callable[[int, int], None]] = None,
) -> List[BatchResult]:
    """Run ``client.chat_completion(**request)`` for each request on ``max_workers`` threads.

    Blocks until every call has ended. Returns one slot per request, in input order.
    With ``return_exceptions=True`` a failed call's :class:`HolySheepError` fills its
    slot; otherwise the first failure cancels the calls not yet started, waits for the
    running ones and is raised. ``on_progress(done, total)`` runs in the calling thread
    after each call ends. On ``KeyboardInterrupt`` (or any exception from
    ``on_progress``) calls not yet started are cancelled and running ones are waited
    for (each is bounded by the client's deadline), so no thread outlives the batch.
    """
    items = _validate(requests, max_workers, on_progress)
    total = len(items)
    results: List[Any] = [None] * total
    if not total:
        return results
    pool = ThreadPoolExecutor(max_workers=min(max_workers, total), thread_name_prefix="holysheep-batch")
    pending: Dict[Future, int] = {}
    try:
        call: Callable[..., Any] = client.chat_completion  # any of its overloads
        for index, kwargs in enumerate(items):
            pending[pool.submit(call, **kwargs)] = index
        done_count = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                index = pending.pop(future)
                try:
                    results[index] = future.result()
                except HolySheepError as exc:
                    if not return_exceptions:
                        raise
                    results[index] = exc
                done_count += 1
                if on_progress is not None:
                    on_progress(done_count, total)
    finally:
        if pending:
            log.debug("batch stopped early: cancelling calls not started, waiting for %d running",
                      sum(1 for f in pending if f.running()))
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _validate(requests: Iterable[Mapping[str, Any]], max_workers: Any,
              on_progress: Any) -> List[Dict[str, Any]]:
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise InvalidRequestError("max_workers", max_workers, "must be an integer >= 1")
    if on_progress is not None and not callable(on_progress):
        raise InvalidRequestError("on_progress", on_progress, "must be a callable(done, total) or None")
    if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Iterable):
        raise InvalidRequestError("requests", requests, "must be a list of chat_completion keyword dicts")
    items = []
    for i, request in enumerate(requests):
        if not isinstance(request, Mapping) or "messages" not in request:
            raise InvalidRequestError(f"requests[{i}]", request,
                                      "must be a dict of chat_completion arguments with 'messages'")
        if request.get("stream"):
            raise InvalidRequestError(f"requests[{i}].stream", request["stream"],
                                      "a batch call cannot stream")
        items.append(dict(request))
    return items
