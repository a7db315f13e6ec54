"""holysheep_lb: a blocking, thread-safe client that spreads OpenAI-compatible API calls
over several regional gateway nodes and keeps answering when nodes fail.

    from holysheep_lb import Client
    with Client(nodes=[...]) as client:
        resp = client.chat_completion([{"role": "user", "content": "Hi"}], model="gpt-4.1")
        answer = resp["choices"][0]["message"]["content"]   # resp.node_id: who answered
"""

import logging

__version__ = "0.1.0"

from .cache import ResponseCache  # noqa: E402
from .client import Client  # noqa: E402
from .config import BreakerSettings, ClientConfig, Node  # noqa: E402
from .errors import (  # noqa: E402
    AllAttemptsFailedError,
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    Attempt,
    AuthenticationError,
    BadRequestError,
    ContentFilterError,
    ContextWindowExceededError,
    CircuitOpenError,
    BudgetExceededError,
    ConfigError,
    FirstTokenTimeoutError,
    HolySheepError,
    InternalServerError,
    InvalidRequestError,
    NoHealthyNodeError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RateLimitExceeded,
    ResponseTooLargeError,
    SharedStateUnavailableError,
    StreamInterruptedError,
    StreamRestartedError,
    StreamStallError,
    UnprocessableEntityError,
)
from .ratelimit import TokenBucket  # noqa: E402
from .models import AUTO, ModelCapabilities, ModelRouter, RoutingDecision, RoutingRequest  # noqa: E402
from .pricing import Budget, BudgetCap, InMemorySpendStore, ModelPrice, PriceTable, SpendStore  # noqa: E402
from .response import Response  # noqa: E402
from .selection import RoutingStrategy, Strategy  # noqa: E402
from .streaming import CannedStream, ChatStream  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "Client",
    "ClientConfig",
    "BreakerSettings",
    "Node",
    "TokenBucket",
    "Response",
    "CannedStream",
    "ChatStream",
    "RoutingStrategy",
    "Strategy",
    "AUTO",
    "ModelRouter",
    "ModelCapabilities",
    "RoutingDecision",
    "RoutingRequest",
    "PriceTable",
    "ModelPrice",
    "Budget",
    "BudgetCap",
    "SpendStore",
    "InMemorySpendStore",
    "ResponseCache",
    "HolySheepError",
    "APIError",
    "APIStatusError",
    "BadRequestError",
    "ContextWindowExceededError",
    "ContentFilterError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "APIConnectionError",
    "APITimeoutError",
    "APIResponseValidationError",
    "ResponseTooLargeError",
    "StreamInterruptedError",
    "StreamRestartedError",
    "FirstTokenTimeoutError",
    "StreamStallError",
    "NoHealthyNodeError",
    "AllAttemptsFailedError",
    "CircuitOpenError",
    "RateLimitExceeded",
    "BudgetExceededError",
    "SharedStateUnavailableError",
    "ConfigError",
    "InvalidRequestError",
    "Attempt",
]
