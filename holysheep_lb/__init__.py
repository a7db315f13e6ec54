"""holysheep_lb: a blocking, thread-safe client that spreads OpenAI-compatible API calls
over several regional gateway nodes and keeps answering when nodes fail.

    from holysheep_lb import Client
    with Client(nodes=[...]) as client:
        resp = client.chat_completion([{"role": "user", "content": "Hi"}], model="gpt-4.1")
        answer = resp["choices"][0]["message"]["content"]   # resp.node_id: who answered
"""

import logging

from ._version import __version__
from .cache import ResponseCache
from .client import Client
from .config import BreakerSettings, ClientConfig, Node
from .errors import (
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
from .ratelimit import TokenBucket
from .models import AUTO, ModelCapabilities, ModelRouter, RoutingDecision, RoutingRequest
from .openai_api import ChatCompletionStream, ModelsPage
from .pricing import Budget, BudgetCap, InMemorySpendStore, ModelPrice, PriceTable, SpendStore
from .response import Response
from .selection import RoutingStrategy, Strategy
from .streaming import CannedStream, ChatStream

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
    "ChatCompletionStream",
    "ModelsPage",
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
