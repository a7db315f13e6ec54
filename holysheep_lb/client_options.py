"""The ``Client`` constructor's signature: every option an explicit, typed keyword.

Every :class:`~holysheep_lb.config.ClientConfig` field is a keyword parameter of
:class:`ClientOptions.__init__` with the same type and default
(``tests/test_client_signature.py`` fails when the two drift apart), so type checkers
and IDEs know every option, and an unknown name is refused: by a type checker through
``**unknown: NoReturn``, at run time with a "did you mean". ``Client`` inherits this
constructor and builds itself in :meth:`ClientOptions._start`.
"""

from __future__ import annotations

import os
import time
from types import MappingProxyType
from typing import Any, Callable, Mapping, NoReturn, Optional, Sequence, Tuple, Type, TypeVar, Union

from .config import (API_KEY_ENV, CLIENT_OPTIONS, BreakerSettings, ClientConfig, config_from_env, config_from_mapping,
                     parse_nodes)
from .errors import ConfigError
from .models import ModelRouter
from .observe import CallObserver
from .policy.retry import RetryPolicy
from .pricing import SpendStore
from .suggest import unknown_option

__all__ = ["ClientOptions"]

_C = TypeVar("_C", bound="ClientOptions")
_EMPTY: Mapping[str, Any] = MappingProxyType({})  # the default of the mapping options (immutable)


class ClientOptions:
    """Checks the constructor's arguments and builds the :class:`ClientConfig`; the
    alternative constructors ``from_env`` and ``from_mapping``."""

    config: ClientConfig

    # Every ClientConfig field is a keyword parameter here, with the same type and default
    # (tests/test_client_signature.py fails when the two drift apart).
    def __init__(
        self,
        api_key: Optional[str] = None,
        nodes: Optional[Sequence[Any]] = None,
        *,
        strategy: Any = "adaptive",
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        deadline_s: float = 120.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.05,
        backoff_cap_s: float = 2.0,
        retry_after_cap_s: float = 60.0,
        pool_maxsize: int = 256,
        max_response_bytes: int = 16 * 1024 * 1024,
        stream_first_chunk_timeout_s: float = 30.0,
        stream_stall_timeout_s: float = 20.0,
        first_token_timeout_s: Optional[float] = None,
        stream_rescue: str = "auto",
        stream_max_rescues: int = 2,
        model_capabilities: Any = None,
        default_model: Optional[str] = None,
        default_region: Optional[str] = None,
        verify: Union[bool, str] = True,
        allow_insecure_http: bool = False,
        panic_threshold: float = 0.5,
        eject_after_failures: int = 5,
        ejection_base_s: float = 30.0,
        ejection_max_s: float = 300.0,
        slow_start_s: float = 0.0,
        health_check_interval_s: Optional[float] = 10.0,
        health_check_timeout_s: float = 2.0,
        unhealthy_threshold: int = 3,
        healthy_threshold: int = 2,
        breaker: Optional[BreakerSettings] = BreakerSettings(),
        model_breakers: Mapping[str, BreakerSettings] = _EMPTY,
        node_breakers: Optional[BreakerSettings] = None,
        breaker_storage: Optional[Callable[[str], Any]] = None,
        fallbacks: Mapping[str, Tuple[str, ...]] = _EMPTY,
        fallback_reply: Optional[Callable[..., Mapping[str, Any]]] = None,
        context_window_fallbacks: Mapping[str, Tuple[str, ...]] = _EMPTY,
        content_policy_fallbacks: Mapping[str, Tuple[str, ...]] = _EMPTY,
        requests_per_minute: Optional[float] = None,
        tokens_per_minute: Optional[float] = None,
        model_rate_limits: Mapping[str, Mapping[str, float]] = _EMPTY,
        rate_limiter_factory: Optional[Callable[[str, float, float], Any]] = None,
        rate_limit_burst_s: float = 1.0,
        retry_budget_ratio: Optional[float] = 0.2,
        retry_budget_min_per_s: float = 1.0,
        retry_budget_ttl_s: float = 10.0,
        hedge_delay_s: Union[None, float, str] = None,
        hedge_max_ratio: float = 0.05,
        hedge_max_threads: int = 64,
        rescue_hung_calls: bool = True,
        prices: Any = None,
        router: Optional[ModelRouter] = None,
        budget: Any = None,
        spend_store: Optional[SpendStore] = None,
        cache: Any = None,
        affinity: Any = True,
        # not ClientConfig options: objects the client works with
        retry: Optional[RetryPolicy] = None,
        observers: Optional[Sequence[CallObserver]] = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rand: Optional[Callable[[], float]] = None,
        wall_clock: Callable[[], float] = time.time,
        **unknown: NoReturn,  # a type checker rejects any other name; at run time: "did you mean"
    ) -> None:
        given = locals()
        options = {name: given[name] for name in CLIENT_OPTIONS if name in given and name not in ("nodes", "api_key")}
        # An option added to ClientConfig but not yet to this signature still works (the
        # drift test says to add it); any other name is refused, by name only: the value
        # of a misspelt api_key is the key.
        options.update({name: unknown[name] for name in unknown if name in CLIENT_OPTIONS})
        refused = sorted(set(unknown) - CLIENT_OPTIONS)
        if refused:
            raise unknown_option(None, refused[0], CLIENT_OPTIONS, what="Client option",
                                 reference="see help(holysheep_lb.ClientConfig) for every option")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError("retry", type(retry).__name__, "must be a holysheep_lb.RetryPolicy (or a subclass)")
        if observers is not None and (isinstance(observers, (str, bytes, Mapping)) or not isinstance(
                observers, Sequence) or not all(isinstance(o, CallObserver) for o in observers)):
            raise ConfigError("observers", type(observers).__name__, "must be a list of CallObserver objects")
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or None
        self._start(ClientConfig(nodes=parse_nodes(nodes), api_key=api_key, **options), retry=retry,
                    observers=observers or (), clock=clock, sleep=sleep, rand=rand, wall_clock=wall_clock)

    @classmethod
    def from_env(cls: Type[_C], environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> _C:
        """Build from ``HOLYSHEEP_API_KEY`` and ``HOLYSHEEP_NODES`` (JSON) or ``HOLYSHEEP_BASE_URL``."""
        return cls(**config_from_env(environ, **overrides))

    @classmethod
    def from_mapping(cls: Type[_C], mapping: Mapping[str, Any], **overrides: Any) -> _C:
        """Build from a dict of Client options, e.g. Django's ``settings.HOLYSHEEP``."""
        kwargs = config_from_mapping(mapping)
        kwargs.update(overrides)
        return cls(**kwargs)

    def _start(self, config: ClientConfig, *, retry: Optional[RetryPolicy], observers: Sequence[CallObserver],
               clock: Callable[[], float], sleep: Callable[[float], None], rand: Optional[Callable[[], float]],
               wall_clock: Callable[[], float]) -> None:
        raise NotImplementedError  # Client builds itself here
