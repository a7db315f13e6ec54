"""A provider-style prompt cache of one simulated node.

Providers keep a prompt's leading tokens on the server that served it: a later
request with the same prefix, on the same node, within the TTL, is cheaper and
faster.  Here an entry is the key of a prefix (see :func:`plans._cache_prefix`);
capacity is in entries, least recently used first out; a hit refreshes the TTL.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional

from cachetools import TTLCache

from .config import SimNode


class PromptCache:
    """Thread-safe; the lock guards the TTLCache and the counters only."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: Optional[TTLCache] = None
        self._settings: tuple = ()
        self.hits = 0
        self.misses = 0

    def configure(self, cfg: SimNode) -> None:
        """Follow the node's settings; changing capacity or TTL empties the cache."""
        settings = (cfg.prompt_cache_entries, cfg.prompt_cache_ttl_s)
        with self._lock:
            if settings == self._settings:
                return
            self._settings = settings
            entries, ttl_s = settings
            self._entries = TTLCache(maxsize=entries, ttl=ttl_s, timer=self._clock) if entries > 0 else None

    def eligible(self, cfg: SimNode, key: Optional[str], prefix_tokens: int) -> bool:
        return cfg.prompt_cache_entries > 0 and key is not None and prefix_tokens >= cfg.prompt_cache_min_tokens

    def contains(self, key: str) -> bool:
        """Whether ``key`` is cached (and not expired); changes nothing."""
        with self._lock:
            return self._entries is not None and key in self._entries

    def record(self, key: str, hit: bool) -> None:
        """Count an answered request and store (or refresh) its prefix."""
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1
            if self._entries is not None:
                self._entries[key] = True

    def stats(self) -> Dict[str, int]:
        with self._lock:
            entries = 0
            if self._entries is not None:
                self._entries.expire()
                entries = len(self._entries)
            return {"hits": self.hits, "misses": self.misses, "entries": entries}

    def reset_counts(self) -> None:
        with self._lock:
            self.hits = self.misses = 0


def usage_fields(form: str, prompt_tokens: int, cached_tokens: int, written_tokens: int) -> Dict[str, Any]:
    """The usage fields that report the cache in the provider form ``form``
    (``"openai"``, ``"deepseek"`` or ``"anthropic"``)."""
    if form == "deepseek":
        return {"prompt_cache_hit_tokens": cached_tokens, "prompt_cache_miss_tokens": prompt_tokens - cached_tokens}
    if form == "anthropic":
        return {"cache_read_input_tokens": cached_tokens, "cache_creation_input_tokens": written_tokens}
    return {"prompt_tokens_details": {"cached_tokens": cached_tokens}}
