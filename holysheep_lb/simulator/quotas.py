"""Per-node quotas in OpenAI's form: requests and tokens per minute.

Each limit is a bucket of ``limit`` that refills continuously at ``limit / 60``
per second, as OpenAI's does (Azure's windows of 1-10 s are not modelled).  A
request needs one request and its tokens (prompt + answer); when either bucket
is short the node answers 429.  Every answer of a node with a quota carries
``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; a reset is the time
until the bucket is full again, written like OpenAI's (``1s``, ``6m0s``,
``120ms``, ``1m30.5s``).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .config import SimNode

_SECONDS_PER_MINUTE = 60.0


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it (Go's ``time.Duration``
    form, at millisecond resolution): ``0s``, ``120ms``, ``1s``, ``1m30.5s``, ``6m0s``."""
    ms = max(0, math.ceil(seconds * 1000.0 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest_ms = divmod(ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    secs = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class _Bucket:
    def __init__(self, per_minute: int, now: float) -> None:
        self.limit = per_minute
        self.level = float(per_minute)
        self.at = now

    @property
    def rate_per_s(self) -> float:
        return self.limit / _SECONDS_PER_MINUTE

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(float(self.limit), self.level + (now - self.at) * self.rate_per_s)
        self.at = now

    def wait_s(self, amount: float) -> Optional[float]:
        """Seconds until ``amount`` is available; None if it never will be."""
        if amount > self.limit:
            return None
        return max(0.0, (amount - self.level) / self.rate_per_s)

    def headers(self, kind: str) -> List[Tuple[str, str]]:
        return [
            (f"x-ratelimit-limit-{kind}", str(self.limit)),
            (f"x-ratelimit-remaining-{kind}", str(max(0, math.floor(self.level + 1e-9)))),
            (f"x-ratelimit-reset-{kind}", format_duration((self.limit - self.level) / self.rate_per_s)),
        ]


@dataclass(frozen=True)
class QuotaDecision:
    """The outcome of asking a node's quota for one request."""

    allowed: bool
    headers: Tuple[Tuple[str, str], ...]
    limited_by: Optional[str] = None  # "requests" or "tokens" when refused
    retry_after_s: Optional[float] = None  # None when waiting would not help
    message: str = ""


class NodeQuota:
    """The request and token buckets of one node.  Thread-safe; time comes from ``clock``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: Optional[_Bucket] = None
        self._tokens: Optional[_Bucket] = None
        self.limited: Dict[str, int] = {"requests": 0, "tokens": 0}

    def configure(self, cfg: SimNode) -> None:
        """Follow the node's settings; a changed limit starts again from a full bucket."""
        now = self._clock()
        with self._lock:
            if (self._requests.limit if self._requests else None) != cfg.requests_per_minute:
                self._requests = _Bucket(cfg.requests_per_minute, now) if cfg.requests_per_minute else None
            if (self._tokens.limit if self._tokens else None) != cfg.tokens_per_minute:
                self._tokens = _Bucket(cfg.tokens_per_minute, now) if cfg.tokens_per_minute else None

    @property
    def active(self) -> bool:
        return self._requests is not None or self._tokens is not None

    def admit(self, tokens: int, *, charge: bool = True) -> QuotaDecision:
        """Take one request and ``tokens`` from the buckets, or refuse; with
        ``charge=False`` only report the state (the headers of a free endpoint)."""
        now = self._clock()
        with self._lock:
            buckets = [(kind, b) for kind, b in (("requests", self._requests), ("tokens", self._tokens)) if b]
            needs = {"requests": 1.0, "tokens": float(tokens)}
            for _, bucket in buckets:
                bucket.refill(now)
            refused = None
            if charge:
                for kind, bucket in buckets:
                    if bucket.level + 1e-9 < needs[kind]:
                        refused = (kind, bucket)
                        break
                if refused is None:
                    for kind, bucket in buckets:
                        bucket.level -= needs[kind]
            headers = tuple(h for kind, bucket in buckets for h in bucket.headers(kind))
            if refused is None:
                return QuotaDecision(True, headers)
            kind, bucket = refused
            self.limited[kind] += 1
            wait_s = bucket.wait_s(needs[kind])
            used = bucket.limit - max(0, math.floor(bucket.level + 1e-9))
        label = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
        if wait_s is None:
            message = (f"Request too large on {label}: Limit {bucket.limit}, Requested {int(needs[kind])}. "
                       "The input or output tokens must be reduced in order to run successfully.")
        else:
            message = (f"Rate limit reached on {label}: Limit {bucket.limit}, Used {used}, "
                       f"Requested {int(needs[kind])}. Please try again in {format_duration(wait_s)}.")
        return QuotaDecision(False, headers, kind, wait_s, message)

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {"limited_requests": self.limited["requests"], "limited_tokens": self.limited["tokens"]}

    def reset_counts(self) -> None:
        with self._lock:
            self.limited = {"requests": 0, "tokens": 0}
