"""Cost-aware model choice for ``model="auto"``: classify a request into a tier, map it to a model.

The default rules add up a score; the first matching row of each group counts once:

==========================  ===========================================  =====
rule                        when                                         score
==========================  ===========================================  =====
prompt length               estimated prompt tokens >= 8000              +2
                            >= 1500                                      +1
code                        a fenced block, or >= 2 lines that look      +1
                            like code (``def``, ``import``, ``{``, ...)
keywords                    an expert word (prove, security audit,       +2
                            legal, medical, ...)
                            else a reasoning word (analyze, debug,       +1
                            refactor, architecture, step by step, ...)
                            a simple-task word (translate, classify,     -1
                            extract, yes or no, one word, ...)
requested ``max_tokens``    >= 8000                                      +2
                            >= 2000                                      +1
                            <= 64                                        -1
system prompt               >= 300 estimated tokens of instructions      +1
==========================  ===========================================  =====

Score <= 0 is ``simple``, 1 ``standard``, 2 ``complex``, >= 3 ``expert``. A short,
unremarkable prompt scores 0 and goes to the cheapest tier; length alone moves a prompt
up at most two tiers (reading a long document is not hard reasoning). Keywords are
matched in the user and system messages, case-insensitively, at word starts.

Default tiers: simple -> ``deepseek-v3.2``, standard -> ``gemini-2.5-flash``,
complex -> ``gpt-4.1``, expert -> ``claude-sonnet-4.5``. Pin a tier with
``ModelRouter(tiers={"expert": "gpt-4.1"})``; replace the rules with
``ModelRouter(classify=fn)`` where ``fn(RoutingRequest)`` returns a tier or
``(tier, reason)``.

A model for which ``is_available(model)`` is False (its circuit breaker is open) is
skipped: the router walks the model's fallback chain (``fallbacks={model: [...]}``;
by default the other tiers' models, nearest higher tier first, then lower).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ConfigError
from .tokens import estimate_prompt_tokens, requested_output_tokens

__all__ = ["AUTO", "TIERS", "DEFAULT_TIER_MODELS", "RoutingRequest", "RoutingDecision", "ModelRouter",
           "classify_request", "ModelCapabilities", "CapabilityTable", "DEFAULT_CAPABILITIES",
           "REASONING_FIRST_TOKEN_TIMEOUT_S", "REASONING_STALL_TIMEOUT_S"]

log = logging.getLogger(__name__)

#: The model name that asks the router to choose.
AUTO = "auto"
TIERS: Tuple[str, ...] = ("simple", "standard", "complex", "expert")
DEFAULT_TIER_MODELS: Mapping[str, str] = {
    "simple": "deepseek-v3.2",
    "standard": "gemini-2.5-flash",
    "complex": "gpt-4.1",
    "expert": "claude-sonnet-4.5",
}

_EXPERT_WORDS = ("prove", "proof", "theorem", "formal verification", "security audit", "vulnerabilit",
                 "threat model", "legal", "contract clause", "compliance", "medical", "diagnos",
                 "research paper", "peer review")
_REASONING_WORDS = ("analyze", "analyse", "analysis", "step by step", "explain why", "design", "architecture",
                    "debug", "refactor", "optimize", "optimise", "trade-off", "tradeoff", "compare",
                    "evaluate", "derive", "algorithm", "complexity", "root cause")
_SIMPLE_WORDS = ("translate", "spell", "typo", "yes or no", "one word", "classify", "sentiment",
                 "extract", "tl;dr", "synonym", "capital of", "convert", "reformat", "what time")


def _word_pattern(words: Sequence[str]) -> "re.Pattern[str]":
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + ")", re.IGNORECASE)


_EXPERT_RE = _word_pattern(_EXPERT_WORDS)
_REASONING_RE = _word_pattern(_REASONING_WORDS)
_SIMPLE_RE = _word_pattern(_SIMPLE_WORDS)
_FENCE_RE = re.compile(r"```|~~~")
# Matched against one stripped line at a time: a pattern that may start at any line and
# run over blank lines (``^\s*`` with MULTILINE) backtracks quadratically in long runs
# of whitespace, and ``model="auto"`` prompts come from end users.
_CODE_LINE_RE = re.compile(
    r"def |class |import |from \S+ import |#include|public |private |function |const |let |var |"
    r"return\b|for \(|if \(|while \(|SELECT .+ FROM|[\w.]+\(.*\)\s*[;{:]?$|[}{]$"
)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p if isinstance(p, str) else str(p.get("text", "")) for p in content
                        if isinstance(p, (str, Mapping)))
    return ""


@dataclass(frozen=True)
class RoutingRequest:
    """What the rules look at: the messages and the call's parameters."""

    messages: Sequence[Mapping[str, Any]]
    params: Mapping[str, Any]

    @property
    def prompt_tokens(self) -> int:
        return estimate_prompt_tokens(self.messages)

    @property
    def system_text(self) -> str:
        return "\n".join(_text(m.get("content")) for m in self.messages if m.get("role") in ("system", "developer"))

    @property
    def user_text(self) -> str:
        return "\n".join(_text(m.get("content")) for m in self.messages if m.get("role") == "user")

    @property
    def max_tokens(self) -> Optional[int]:
        return requested_output_tokens(self.params)


@dataclass(frozen=True)
class RoutingDecision:
    """The router's choice: ``model`` to send to, its ``tier``, and why.

    ``primary_model`` is the tier's model; ``skipped`` the models passed over because
    they were unavailable. ``fallback`` is True when ``model`` is not the primary.
    """

    model: str
    tier: str
    reason: str
    primary_model: str
    skipped: Tuple[str, ...] = ()

    @property
    def fallback(self) -> bool:
        return self.model != self.primary_model


def has_code(text: str) -> bool:
    """A fenced block, or at least two lines that look like source code.

    Linear in the length of ``text``, whatever its shape.
    """
    if _FENCE_RE.search(text):
        return True
    found = 0
    for line in text.split("\n"):
        line = line.strip()
        if line and _CODE_LINE_RE.match(line):
            found += 1
            if found == 2:
                return True
    return False


def classify_request(request: RoutingRequest) -> Tuple[str, str]:
    """The default rules (see the module docstring): ``(tier, reason)``."""
    score = 0
    why: List[str] = []

    def add(points: int, what: str) -> None:
        nonlocal score
        score += points
        why.append(f"{what} {points:+d}")

    tokens = request.prompt_tokens
    for threshold, points in ((8000, 2), (1500, 1)):
        if tokens >= threshold:
            add(points, f"prompt ~{tokens} tokens")
            break
    words = request.user_text + "\n" + request.system_text
    if has_code(words):
        add(1, "code")
    match = _EXPERT_RE.search(words)
    if match:
        add(2, f"expert keyword {match.group(1).lower()!r}")
    else:
        match = _REASONING_RE.search(words)
        if match:
            add(1, f"reasoning keyword {match.group(1).lower()!r}")
    match = _SIMPLE_RE.search(words)
    if match:
        add(-1, f"simple-task keyword {match.group(1).lower()!r}")
    max_tokens = request.max_tokens
    if max_tokens is not None:
        if max_tokens >= 8000:
            add(2, f"max_tokens {max_tokens}")
        elif max_tokens >= 2000:
            add(1, f"max_tokens {max_tokens}")
        elif max_tokens <= 64:
            add(-1, f"max_tokens {max_tokens}")
    system = request.system_text
    if system and estimate_prompt_tokens([{"content": system}]) - 4 >= 300:
        add(1, "long system prompt")
    tier = TIERS[min(max(score, 0), len(TIERS) - 1)]
    return tier, f"score {score}: " + ("; ".join(why) if why else "short prompt, no signals")


class ModelRouter:
    """Chooses a model per call. Immutable after construction except ``is_available``; thread-safe.

    ``tiers`` pins tiers to models (merged over :data:`DEFAULT_TIER_MODELS`; new tier
    names may be added for a custom ``classify``). ``classify(RoutingRequest)``
    replaces the default rules and returns a tier or ``(tier, reason)``.
    ``fallbacks`` maps a model to the models to try, in order, when it is unavailable.
    ``is_available(model)`` says whether a model may be used now (e.g. its breaker is
    closed); the default says always.
    """

    def __init__(
        self,
        *,
        tiers: Optional[Mapping[str, str]] = None,
        classify: Optional[Callable[[RoutingRequest], Union[str, Tuple[str, str]]]] = None,
        fallbacks: Optional[Mapping[str, Sequence[str]]] = None,
        is_available: Optional[Callable[[str], bool]] = None,
    ) -> None:
        merged = dict(DEFAULT_TIER_MODELS)
        for tier, model in (tiers or {}).items():
            if not isinstance(tier, str) or not tier or not isinstance(model, str) or not model:
                raise ConfigError("tiers", {tier: model}, "must map tier names to model names (non-empty strings)")
            merged[tier] = model
        if classify is not None and not callable(classify):
            raise ConfigError("classify", classify, "must be a callable taking a RoutingRequest")
        if is_available is not None and not callable(is_available):
            raise ConfigError("is_available", is_available, "must be a callable taking a model name")
        chains: Dict[str, Tuple[str, ...]] = {}
        for model, chain in (fallbacks or {}).items():
            if isinstance(chain, str) or not all(isinstance(m, str) and m for m in chain):
                raise ConfigError(f"fallbacks[{model}]", chain, "must be a list of model names")
            chains[model] = tuple(chain)
        self.tiers: Mapping[str, str] = merged
        self.classify = classify or classify_request
        self.fallbacks: Mapping[str, Tuple[str, ...]] = chains
        self.is_available: Callable[[str], bool] = is_available or (lambda model: True)
        self.uses_default_availability = is_available is None  # a Client then passes its breakers

    def __repr__(self) -> str:
        return f"ModelRouter(tiers={dict(self.tiers)})"

    def route(self, messages: Sequence[Mapping[str, Any]], params: Optional[Mapping[str, Any]] = None,
              *, is_available: Optional[Callable[[str], bool]] = None) -> RoutingDecision:
        """Classify the call and pick the first available model of its tier's chain.

        ``is_available`` overrides the router's own check for this call (a Client passes
        its breakers when the router was given none), so one router can serve many
        clients without being rewired by them.
        """
        available = self.is_available if is_available is None else is_available
        tier, reason = self._classify(RoutingRequest(messages, dict(params or {})))
        primary = self.tiers[tier]
        skipped: List[str] = []
        chosen = primary
        for model in self.chain(primary):
            if available(model):
                chosen = model
                break
            skipped.append(model)
        else:
            # Nothing is available: send to the tier's model and let its breaker answer.
            reason += "; no model of the chain is available"
        if skipped and chosen != primary:
            reason += f"; skipped unavailable {', '.join(skipped)}"
        decision = RoutingDecision(chosen, tier, reason, primary, tuple(skipped))
        log.debug("routing: tier %s -> model %s (%s)", tier, chosen, reason)
        return decision

    def chain(self, model: str) -> Tuple[str, ...]:
        """``model`` and then its fallbacks, in the order they are tried."""
        if model in self.fallbacks:
            rest = self.fallbacks[model]
        else:
            ordered = list(dict.fromkeys(self.tiers.values()))
            i = ordered.index(model) if model in ordered else len(ordered)
            rest = tuple(ordered[i + 1:]) + tuple(reversed(ordered[:i]))
        return (model,) + tuple(m for m in rest if m != model)

    def _classify(self, request: RoutingRequest) -> Tuple[str, str]:
        result = self.classify(request)
        tier, reason = result if isinstance(result, tuple) else (result, "custom rule")
        if tier not in self.tiers:
            raise ConfigError("classify", tier, f"must return one of the tiers {sorted(self.tiers)}")
        return tier, str(reason)


# ------------------------------------------------------------------ model capabilities

#: Defaults for reasoning models, which think before their first token (minutes on
#: hard prompts) and may pause between chunks while they think again.
REASONING_FIRST_TOKEN_TIMEOUT_S = 300.0
REASONING_STALL_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ModelCapabilities:
    """What the client knows of one model; None means "not known: use the default".

    ``prefill``: whether the model continues a trailing assistant message (an assistant
    *prefill*) instead of starting a new answer; only such a model may continue a cut
    stream, any other restarts it. Unknown counts as no: a model that ignores a prefill
    would answer twice. ``prefill_message`` is merged into that assistant message
    (e.g. ``{"prefix": True}`` for DeepSeek's and Mistral's prefix completion) and
    ``prefill_params`` into the request (e.g. vLLM's ``{"continue_final_message": True,
    "add_generation_prompt": False}``). ``first_token_timeout_s`` and
    ``stall_timeout_s`` override the client's stream limits for this model.
    """

    prefill: Optional[bool] = None
    prefill_message: Mapping[str, Any] = field(default_factory=dict)
    prefill_params: Mapping[str, Any] = field(default_factory=dict)
    first_token_timeout_s: Optional[float] = None
    stall_timeout_s: Optional[float] = None

    def __post_init__(self) -> None:
        if self.prefill is not None and not isinstance(self.prefill, bool):
            raise ConfigError("prefill", self.prefill, "must be True, False or None")
        for name in ("prefill_message", "prefill_params"):
            value = getattr(self, name)
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise ConfigError(name, value, "must be a dict with string keys")
            object.__setattr__(self, name, dict(value))
        for name in ("first_token_timeout_s", "stall_timeout_s"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1e9:
                raise ConfigError(name, value, "must be a number of seconds > 0, or None")

    @classmethod
    def from_value(cls, name: str, value: Any) -> "ModelCapabilities":
        """A ModelCapabilities, or one built from a dict of its fields (errors name ``name``)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(name, value, "must be a ModelCapabilities or a dict of its fields")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise ConfigError(f"{name}.{unknown[0]}", value[unknown[0]], f"is not a capability; known: {sorted(known)}")
        try:
            return cls(**value)
        except ConfigError as exc:
            raise ConfigError(f"{name}.{exc.field}", exc.value, exc.allowed) from None


_REASONING = ModelCapabilities(prefill=False, first_token_timeout_s=REASONING_FIRST_TOKEN_TIMEOUT_S,
                               stall_timeout_s=REASONING_STALL_TIMEOUT_S)

#: Built-in knowledge, matched on the model name without a ``provider/`` prefix: an
#: exact name first, then the longest prefix ending in ``*``. OpenAI's chat API and
#: Gemini start a new answer after an assistant message (no prefill); Anthropic's API
#: continues one, except Claude Sonnet 4.6 / Opus 4.7 which reject it (LiteLLM #27967).
DEFAULT_CAPABILITIES: Mapping[str, ModelCapabilities] = {
    "gpt-*": ModelCapabilities(prefill=False),
    "chatgpt-*": ModelCapabilities(prefill=False),
    "gemini-*": ModelCapabilities(prefill=False),
    "claude-*": ModelCapabilities(prefill=True),
    "claude-sonnet-4-6*": ModelCapabilities(prefill=False),
    "claude-sonnet-4.6*": ModelCapabilities(prefill=False),
    "claude-opus-4-7*": ModelCapabilities(prefill=False),
    "claude-opus-4.7*": ModelCapabilities(prefill=False),
    "o1*": _REASONING,
    "o3*": _REASONING,
    "o4*": _REASONING,
    "gpt-5*": _REASONING,
    "deepseek-r1*": _REASONING,
    "deepseek-reasoner*": _REASONING,
    "qwq*": _REASONING,
}


class CapabilityTable:
    """Per-model capabilities: the built-in table, extended or overridden by the user's.

    ``user`` maps a model name (or a prefix ending in ``*``) to a
    :class:`ModelCapabilities` or a dict of its fields; a user entry replaces the
    built-in entry of the same key and wins over every built-in match. Immutable;
    thread-safe.
    """

    def __init__(self, user: Optional[Mapping[str, Any]] = None, *,
                 builtin: Mapping[str, ModelCapabilities] = DEFAULT_CAPABILITIES) -> None:
        if user is not None and not isinstance(user, Mapping):
            raise ConfigError("model_capabilities", user, "must be a dict of model name -> capabilities")
        parsed: Dict[str, ModelCapabilities] = {}
        for key, value in (user or {}).items():
            if not isinstance(key, str) or not key or key == "*" * len(key):
                raise ConfigError("model_capabilities", key, "keys must be model names or prefixes ending in '*'")
            parsed[key] = ModelCapabilities.from_value(f"model_capabilities[{key}]", value)
        self._user = parsed
        self._builtin = dict(builtin)

    def __repr__(self) -> str:
        return f"CapabilityTable(user={sorted(self._user)})"

    def get(self, model: str) -> ModelCapabilities:
        """The capabilities of ``model`` (all unknown when nothing matches)."""
        name = model.rsplit("/", 1)[-1]
        for table in (self._user, self._builtin):
            found = _lookup(table, model) or _lookup(table, name)
            if found is not None:
                return found
        return ModelCapabilities()

    def accepts_prefill(self, model: str) -> bool:
        return self.get(model).prefill is True

    def first_token_timeout_s(self, model: str, default_s: float) -> float:
        value = self.get(model).first_token_timeout_s
        return default_s if value is None else float(value)

    def stall_timeout_s(self, model: str, default_s: float) -> float:
        value = self.get(model).stall_timeout_s
        return default_s if value is None else float(value)

    def stream_limits(self, model: str, *, call_first_token_s: Optional[float], client_first_token_s: float,
                      client_stall_s: float) -> Tuple[float, float]:
        """``(first_token_timeout_s, stall_timeout_s)`` of a stream of ``model``: the one
        place these are decided. The call's value wins, then the model's, then the client's."""
        first = call_first_token_s if call_first_token_s is not None else \
            self.first_token_timeout_s(model, client_first_token_s)
        return first, self.stall_timeout_s(model, client_stall_s)


def _lookup(table: Mapping[str, ModelCapabilities], model: str) -> Optional[ModelCapabilities]:
    exact = table.get(model)
    if exact is not None:
        return exact
    best: Optional[Tuple[int, ModelCapabilities]] = None
    for key, caps in table.items():
        if key.endswith("*") and model.startswith(key[:-1]) and (best is None or len(key) > best[0]):
            best = (len(key), caps)
    return None if best is None else best[1]
