"""Former home of the retry policy; everything now lives in :mod:`holysheep_lb.policy.retry`."""

from .policy.retry import (  # noqa: F401 - re-exported for importers of the old path
    NEXT_MODEL,
    RETRY,
    RETRY_BUDGET_EXHAUSTED,
    STOP,
    WAIT,
    RetryBudget,
    RetryContext,
    RetryDecision,
    RetryPolicy,
    parse_retry_after,
    parse_should_retry,
)

__all__ = ["RetryPolicy", "RetryDecision", "RetryContext", "RetryBudget", "RETRY_BUDGET_EXHAUSTED",
           "RETRY", "WAIT", "NEXT_MODEL", "STOP", "parse_retry_after", "parse_should_retry"]
