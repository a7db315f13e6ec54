"""Prompt-cache affinity: calls that share a long prompt prefix go to the same node.

Providers cache a prompt's leading tokens on the server that served it and bill them at
a fraction of the input price. Spread over N nodes, every node warms its own copy; kept
on one node, the prefix stays warm. This module decides *which* node a prefix prefers:

* **The key.** By default, a hash of the model, the tools and every message before the
  last user message, once that prefix is long enough for the provider to cache it
  (:data:`DEFAULT_MIN_PREFIX_TOKENS`, by model-name prefix; extend it with
  ``Client(affinity={"min_prefix_tokens": {"my-model": 2048}})``). A call may pass its
  own ``affinity_key=`` (e.g. a conversation id). Only a 64-bit hash of the key is kept:
  never the prompt, never the API key (which is not part of what is hashed).
* **Consistent hashing with bounded loads** (Mirrokni, Thorup, Zadimoghaddam 2018;
  HAProxy's ``hash-balance-factor``). Each node owns ``vnodes`` points of a hash ring; a
  key goes to the first node clockwise from its hash. A node leaving moves only its own
  keys (to the next node on the ring), and they come back when it does; a node joining
  takes about 1/N of the keys. A node is passed over while it has taken more than
  ``balance_factor`` x its share (by weight) of the recent keyed calls (a moving count
  over the last ~``128 x nodes`` of them) *and* has more than that share of the requests
  in flight, so no node takes much more than its share however the keys fall; and while
  it has more than ``2 x balance_factor`` x its share of the requests in flight (a burst
  guard). A client with little traffic (nothing in flight) keeps every key home.

  Why recent calls and not only the requests in flight (HAProxy's measure): with 16
  calls in flight over 4 nodes the bound ``ceil(1.25 x 16 / 4) = 5`` is reached by
  chance a third of the time, and every such call warms a second node's cache at the
  expense of another prefix (in ``benchmarks/prompt_cache.py`` that held the hit rate
  near 0.6). A share of recent calls moves only when the keys really are uneven; the
  in-flight condition keeps a lone busy conversation on its node while the node is idle.
* **A preference, never a promise.** A node that is ejected, down, throttled or waiting
  for its trial is not a candidate; a node that is clearly slower (typical latency, which
  includes the age of requests it has not answered, above ``slower_factor`` x the best
  candidate's and ``slower_margin_ms`` more) is passed over. If no node on the ring qualifies, the routing strategy
  chooses as if there were no key.

Thread-safety: :meth:`AffinityRouter.choose` runs under the selector's lock (it only
reads node state and bumps counters); usage counters have their own lock.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError, InvalidRequestError
from .tokens import estimate_prompt_tokens
from .usage import read_usage

__all__ = ["DEFAULT_MIN_PREFIX_TOKENS", "AffinitySettings", "AffinityRouter", "HashRing", "prefix_key",
           "key_position"]

#: Minimum prompt prefix a provider caches, in tokens, by model-name prefix (longest match
#: wins). OpenAI: 1,024 for every model with prompt caching. Anthropic: 1,024 for Sonnet
#: and Opus, 2,048 for Haiku. Gemini implicit caching: 1,024 for Flash, 2,048 for Pro.
#: DeepSeek caches in 64-token units. Anything else: :data:`FALLBACK_MIN_PREFIX_TOKENS`.
DEFAULT_MIN_PREFIX_TOKENS: Mapping[str, int] = MappingProxyType({
    "gpt-": 1024, "chatgpt-": 1024, "o1": 1024, "o3": 1024, "o4": 1024,
    "claude-": 1024, "claude-haiku": 2048, "claude-3-haiku": 2048, "claude-3-5-haiku": 2048,
    "gemini-": 1024, "gemini-2.5-pro": 2048,
    "deepseek": 64,
})
FALLBACK_MIN_PREFIX_TOKENS = 1024
_MAX_KEY_CHARS = 1024


def _position(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def key_position(affinity_key: str) -> int:
    """The ring position of a caller's own ``affinity_key`` (a 64-bit hash)."""
    return _position(b"key\0" + affinity_key.encode("utf-8", "surrogatepass"))


def _min_tokens(model: str, table: Mapping[str, int]) -> int:
    best, best_len = FALLBACK_MIN_PREFIX_TOKENS, -1
    for name_prefix, tokens in table.items():
        if model.startswith(name_prefix) and len(name_prefix) > best_len:
            best, best_len = tokens, len(name_prefix)
    return best


def prefix_key(model: str, messages: Sequence[Mapping[str, Any]], tools: Any = None,
               min_prefix_tokens: Mapping[str, int] = DEFAULT_MIN_PREFIX_TOKENS) -> Optional[int]:
    """The ring position of the cacheable prefix: model, tools and the messages before the
    last user message; None when that prefix is too short for ``model``'s cache.

    Only the arguments are hashed (never a credential). It runs on every chat call, so
    it is cheap: a prefix too short for any model's cache is refused on a character
    count, and text contents are hashed as they are (no JSON encoding of the prompt).
    """
    last_user = None
    for index in range(len(messages) - 1, -1, -1):
        if isinstance(messages[index], Mapping) and messages[index].get("role") == "user":
            last_user = index
            break
    prefix = messages[:last_user] if last_user is not None else messages[:-1]
    if not prefix and not tools:
        return None
    # the estimate (about 4 characters a token) is cheap; hash only what is long enough
    tools_text = json.dumps(tools, sort_keys=True, ensure_ascii=False, default=str) if tools else ""
    tokens = (estimate_prompt_tokens(prefix) if prefix else 0) + math.ceil(len(tools_text) / 4)
    if tokens < min(min_prefix_tokens.values(), default=0) or tokens < _min_tokens(model, min_prefix_tokens):
        return None
    digest = hashlib.blake2b(digest_size=8)
    update = digest.update
    for part in ("prefix", model, tools_text):
        _feed(update, part)
    for message in prefix:
        if isinstance(message, Mapping) and message.keys() <= _PLAIN_KEYS and isinstance(message.get("content"), str):
            _feed(update, str(message.get("role")))
            _feed(update, message["content"])
        else:  # parts, tool calls, names: rare; encoded whole (a different tag keeps them apart)
            _feed(update, "\1json")
            _feed(update, json.dumps(message, sort_keys=True, ensure_ascii=False, default=str))
    return int.from_bytes(digest.digest(), "big")


_PLAIN_KEYS = frozenset({"role", "content"})


def _feed(update: Any, text: str) -> None:
    """Length-prefixed, so that no two sequences of texts hash the same bytes."""
    data = text.encode("utf-8", "surrogatepass")
    update(len(data).to_bytes(8, "big"))
    update(data)


@dataclass(frozen=True)
class AffinitySettings:
    """``Client(affinity=...)``: True (the defaults), False (off), a dict of these fields or an instance.

    ``balance_factor``: a node is passed over while it has more than this x its share of
    the requests in flight (HAProxy's ``hash-balance-factor`` / 100; > 1).
    ``slower_factor``: a node is passed over while its typical latency is above this x
    the best candidate's (> 1) and by more than ``slower_margin_ms`` (estimates of idle
    nodes decay towards 0, so a ratio alone would call a node with fresh 100 ms samples
    slow next to ones idle for a minute). ``min_prefix_tokens``: model-name prefix -> minimum
    cacheable prefix, added to :data:`DEFAULT_MIN_PREFIX_TOKENS`. ``vnodes``: ring
    points per node.
    """

    enabled: bool = True
    balance_factor: float = 1.2
    slower_factor: float = 2.0
    slower_margin_ms: float = 250.0
    min_prefix_tokens: Mapping[str, int] = field(default_factory=dict)
    vnodes: int = 160

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError("affinity.enabled", self.enabled, "must be True or False")
        for name in ("balance_factor", "slower_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 < value < 1e6:
                raise ConfigError(f"affinity.{name}", value, "must be a number above 1")
        if isinstance(self.slower_margin_ms, bool) or not isinstance(self.slower_margin_ms, (int, float)) \
                or not 0 <= self.slower_margin_ms < 1e9:
            raise ConfigError("affinity.slower_margin_ms", self.slower_margin_ms, "must be a number of ms >= 0")
        if isinstance(self.vnodes, bool) or not isinstance(self.vnodes, int) or not 1 <= self.vnodes <= 4096:
            raise ConfigError("affinity.vnodes", self.vnodes, "must be an integer from 1 to 4096")
        if not isinstance(self.min_prefix_tokens, Mapping):
            raise ConfigError("affinity.min_prefix_tokens", self.min_prefix_tokens,
                              "must be a mapping of model-name prefix to a token count")
        for name, tokens in self.min_prefix_tokens.items():
            if not isinstance(name, str) or not name:
                raise ConfigError("affinity.min_prefix_tokens", name, "keys must be non-empty model-name prefixes")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise ConfigError(f"affinity.min_prefix_tokens[{name}]", tokens, "must be an integer >= 0")
        merged = {**DEFAULT_MIN_PREFIX_TOKENS, **self.min_prefix_tokens}
        object.__setattr__(self, "min_prefix_tokens", MappingProxyType(merged))

    @classmethod
    def coerce(cls, value: Any) -> "AffinitySettings":
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(enabled=False)
        if isinstance(value, AffinitySettings):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"enabled", "balance_factor", "slower_factor", "slower_margin_ms",
                                           "min_prefix_tokens", "vnodes"})
            if unknown:
                raise ConfigError(f"affinity.{unknown[0]}", value[unknown[0]],
                                  "is not an affinity setting (enabled, balance_factor, slower_factor, "
                                  "slower_margin_ms, min_prefix_tokens, vnodes)")
            return cls(**value)
        raise ConfigError("affinity", value, "must be True, False, a dict of settings or an AffinitySettings")


class HashRing:
    """A consistent-hash ring of node ids, ``vnodes`` points each. Immutable."""

    def __init__(self, node_ids: Sequence[str], vnodes: int = 160) -> None:
        points = sorted((_position(f"node\0{node_id}\0{i}".encode("utf-8")), node_id)
                        for node_id in node_ids for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [n for _, n in points]
        self.node_ids: Tuple[str, ...] = tuple(dict.fromkeys(node_ids))

    def walk(self, position: int) -> Iterator[str]:
        """Every node once, in ring order from ``position``: the key's owner first."""
        if not self._hashes:
            return
        start = bisect.bisect_left(self._hashes, position)
        seen: set = set()
        n_points, wanted = len(self._owners), len(self.node_ids)
        for step in range(n_points):
            owner = self._owners[(start + step) % n_points]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == wanted:
                    return

    def owner(self, position: int) -> Optional[str]:
        return next(self.walk(position), None)


class AffinityRouter:
    """Chooses a keyed call's node over a :class:`HashRing` with bounded loads; counts
    how often calls went to their preferred node, and the cached tokens each node reported."""

    def __init__(self, node_ids: Sequence[str], settings: Optional[AffinitySettings] = None) -> None:
        self.settings = settings or AffinitySettings()
        self.ring = HashRing(node_ids, self.settings.vnodes)
        # counters per node id (a fixed set: bounded memory); bumped under the selector's lock
        self._preferred = {n: 0 for n in self.ring.node_ids}   # keyed first attempts preferring n
        self._kept = {n: 0 for n in self.ring.node_ids}        # ... and sent to n
        self._passed_over: Dict[str, int] = {"unusable": 0, "overloaded": 0, "busy": 0, "slower": 0}
        # moving count of the keyed calls each node took (weights decay by 1 - 1/window a call)
        self._recent = {n: 0.0 for n in self.ring.node_ids}
        self._keep = 1.0 - 1.0 / (128 * max(1, len(self.ring.node_ids)))
        self._usage_lock = threading.Lock()
        self._answers = {n: 0 for n in self.ring.node_ids}
        self._prompt_tokens = {n: 0 for n in self.ring.node_ids}
        self._cached_tokens = {n: 0 for n in self.ring.node_ids}

    def key_for(self, model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
                affinity_key: Optional[str] = None) -> Optional[int]:
        """The call's ring position: its own ``affinity_key``, else its cacheable prefix's; None: no preference."""
        if affinity_key is not None:
            if not isinstance(affinity_key, str) or not affinity_key or len(affinity_key) > _MAX_KEY_CHARS:
                raise InvalidRequestError("affinity_key", type(affinity_key).__name__,
                                          f"must be a non-empty string of at most {_MAX_KEY_CHARS} characters")
            return key_position(affinity_key) if self.settings.enabled else None
        if not self.settings.enabled:
            return None
        return prefix_key(model, messages, params.get("tools"), self.settings.min_prefix_tokens)

    def choose(self, position: int, candidates: Sequence[Any], ctx: Any, *, first_attempt: bool) -> Optional[Any]:
        """The first node on the ring from ``position`` that is a candidate, not overloaded
        and not clearly slower; None when none is (the strategy then chooses).

        ``candidates`` are NodeStates the selector may use now; ``ctx`` a PickContext.
        """
        by_id = {n.id: n for n in candidates}
        factor = self.settings.balance_factor
        recent = self._recent
        total_weight = 0.0
        in_flight = 0
        recent_total = 0.0
        best_ms = math.inf
        for node in candidates:
            total_weight += ctx.weight(node)
            in_flight += node.in_flight
            recent_total += recent.get(node.id, 0.0)
            if node.mean_ms is not None:
                best_ms = min(best_ms, node.typical_latency_ms(ctx.now))
        chosen = None
        preferred = None
        for node_id in self.ring.walk(position):
            if preferred is None:
                preferred = node_id
            node = by_id.get(node_id)
            share = ctx.weight(node) / total_weight if node is not None and total_weight > 0 else 1.0
            if node is None:
                reason = "unusable"
            elif (recent[node_id] + 1 > math.ceil(factor * (recent_total + 1) * share)
                  and node.in_flight + 1 > math.ceil(factor * (in_flight + 1) * share)):
                reason = "overloaded"
            elif node.in_flight + 1 > math.ceil(2 * factor * (in_flight + 1) * share):
                reason = "busy"
            elif self._slower(node, best_ms, ctx.now):
                reason = "slower"
            else:
                chosen = node
                break
            if first_attempt and node_id == preferred:
                self._passed_over[reason] += 1
        if first_attempt and preferred is not None:
            self._preferred[preferred] += 1
            if chosen is not None and chosen.id == preferred:
                self._kept[preferred] += 1
        if chosen is not None:
            keep = self._keep
            for node_id in recent:
                recent[node_id] *= keep
            recent[chosen.id] += 1.0
        return chosen

    def _slower(self, node: Any, best_ms: float, now: float) -> bool:
        if node.mean_ms is None and not node.awaiting:
            return False  # never measured: unknown is not slow
        typical_ms = node.typical_latency_ms(now)
        return (typical_ms > self.settings.slower_factor * best_ms
                and typical_ms - best_ms > self.settings.slower_margin_ms)

    def record_usage(self, node_id: Optional[str], usage: Any) -> None:
        """Count the prompt and cached tokens a node's answer reported (any usage form)."""
        if node_id not in self._answers:
            return
        reading = read_usage(usage)
        if not reading.known:
            return
        with self._usage_lock:
            self._answers[node_id] += 1
            self._prompt_tokens[node_id] += reading.input_tokens
            self._cached_tokens[node_id] += reading.cached_tokens

    def reset_after_fork(self) -> None:
        self._usage_lock = threading.Lock()

    def node_stats(self, node_id: str) -> Dict[str, Any]:
        """Affinity and provider-cache figures of one node (read under the selector's lock)."""
        preferred, kept = self._preferred.get(node_id, 0), self._kept.get(node_id, 0)
        with self._usage_lock:
            prompt, cached = self._prompt_tokens.get(node_id, 0), self._cached_tokens.get(node_id, 0)
            answers = self._answers.get(node_id, 0)
        return {
            "affinity": {"preferred_calls": preferred, "sent_to_preferred": kept,
                         "hit_rate": (kept / preferred) if preferred else None},
            "prompt_cache": {"answers_with_usage": answers, "prompt_tokens": prompt, "cached_tokens": cached,
                             "cached_share": (cached / prompt) if prompt else None},
        }

    def summary(self) -> Dict[str, Any]:
        """Client-wide: keyed calls, how many went to their preferred node, and why others did not."""
        preferred, kept = sum(self._preferred.values()), sum(self._kept.values())
        with self._usage_lock:
            prompt, cached = sum(self._prompt_tokens.values()), sum(self._cached_tokens.values())
        return {"enabled": self.settings.enabled, "keyed_calls": preferred, "sent_to_preferred": kept,
                "hit_rate": (kept / preferred) if preferred else None,
                "preferred_passed_over": dict(self._passed_over),
                "cached_token_share": (cached / prompt) if prompt else None}


def annotate(rows: List[Dict[str, Any]], router: Optional[AffinityRouter], id_key: str = "id") -> None:
    """Add each node's affinity and prompt-cache figures to its row (in place)."""
    if router is None:
        return
    for row in rows:
        row.update(router.node_stats(row[id_key]))
