"""The openai-python surface of :class:`~holysheep_lb.Client`: ``client.chat.completions.create``,
``client.embeddings.create`` and ``client.models.list``.

Code written for openai-python runs after swapping its constructor::

    client = holysheep_lb.Client(nodes=[...])      # was: client = OpenAI()
    resp = client.chat.completions.create(model="gpt-4.1", messages=[...])
    resp.choices[0].message.content

Each method here is a thin, typed front of the client's own call
(``chat_completion``, ``embeddings``, ``models``), which keep working: ``client.embeddings``
and ``client.models`` are namespace objects that are also callable as before
(``client.embeddings("text", model=...)``, ``client.models()``).

Every method takes openai-python's per-call ``timeout``, ``extra_headers``,
``extra_query`` and ``extra_body`` (see :mod:`holysheep_lb.request_options`) next to this
client's ``region`` and ``deadline_s``. ``stream=True`` is typed: it returns a
:class:`ChatCompletionStream` (iterate it for :class:`~holysheep_lb.types.ChatCompletionChunk`),
anything else a :class:`~holysheep_lb.response.Response`.
"""

from __future__ import annotations

from typing import (TYPE_CHECKING, Any, Dict, FrozenSet, Iterator, List, Literal, Mapping, Optional, Protocol,
                    Sequence, Tuple, Union, overload, runtime_checkable)

from .errors import Attempt, InvalidRequestError
from .request_options import Timeout, check_call_params, request_options
from .response import Response
from .types import ChatCompletionChunk, Model
from .validation import check_json_value

if TYPE_CHECKING:  # pragma: no cover - the client imports this module
    from .client import Client

__all__ = ["Chat", "Completions", "Embeddings", "Models", "ModelsPage", "ChatCompletionStream"]

# Each method's own arguments (never sent as body fields) and the body fields it builds.
_EMBEDDING_ARGS: FrozenSet[str] = frozenset({"input", "model", "region", "deadline_s", "timeout", "extra_headers",
                                             "extra_query", "extra_body"})
_EMBEDDING_BUILT: FrozenSet[str] = frozenset({"model", "input"})


@runtime_checkable
class ChatCompletionStream(Protocol):
    """What ``stream=True`` returns: a :class:`~holysheep_lb.streaming.ChatStream`, or a
    :class:`~holysheep_lb.streaming.CannedStream` when every model failed and the client
    has a ``fallback_reply``. Iterate it for chunks; close it (or use ``with``) to stop early.
    """

    @property
    def node_id(self) -> Optional[str]: ...

    @property
    def attempts(self) -> Tuple[Attempt, ...]: ...

    @property
    def request_id(self) -> Optional[str]: ...

    @property
    def fallback(self) -> bool: ...

    @property
    def extra(self) -> Dict[str, Any]: ...

    @property
    def latency_ms(self) -> Optional[float]: ...

    @property
    def usage(self) -> Optional[Dict[str, Any]]: ...

    @property
    def finish_reason(self) -> Optional[str]: ...

    @property
    def text(self) -> str:
        """The first choice's text received so far."""

    def __iter__(self) -> Iterator[ChatCompletionChunk]: ...

    def __next__(self) -> ChatCompletionChunk: ...

    def read_text(self) -> str:
        """Read to the end; the first choice's whole text."""

    def choice_text(self, index: int) -> str: ...

    def close(self) -> None: ...

    def __enter__(self) -> "ChatCompletionStream": ...

    def __exit__(self, *exc_info: Any) -> None: ...


class ModelsPage(Response):
    """``client.models.list()``: the models list, which iterates its models as
    openai-python's page does (``for m in client.models.list(): m.id``).

    It is still the dict the server sent: read it by key (``page["data"]``,
    ``page.keys()``); ``len()`` counts its keys, as for any dict.
    """

    __slots__ = ()
    data: List[Model]

    def __iter__(self) -> Iterator[Model]:  # type: ignore[override]
        return iter(self.data)

    @classmethod
    def of(cls, resp: Response) -> "ModelsPage":
        page = cls(dict(resp))
        for name in Response.__slots__:
            setattr(page, name, getattr(resp, name))
        return page

    def __reduce__(self) -> Tuple[Any, ...]:
        return (_rebuild_page, (dict.copy(self), {k: getattr(self, k) for k in Response.__slots__}))


def _rebuild_page(data: Dict[str, Any], state: Dict[str, Any]) -> ModelsPage:
    page = ModelsPage(data)
    for k, v in state.items():
        setattr(page, k, v)
    return page


class Completions:
    """``client.chat.completions``."""

    def __init__(self, client: "Client") -> None:
        self._client = client

    @overload
    def create(self, *, messages: Sequence[Mapping[str, Any]], model: Optional[str] = None,
               stream: Literal[True], region: Optional[str] = None, deadline_s: Optional[float] = None,
               idempotency_key: Optional[str] = None, cache: Optional[bool] = None,
               timeout: Optional[Timeout] = None, extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None, extra_body: Optional[Mapping[str, Any]] = None,
               **params: Any) -> ChatCompletionStream: ...

    @overload
    def create(self, *, messages: Sequence[Mapping[str, Any]], model: Optional[str] = None,
               stream: Optional[Literal[False]] = None, region: Optional[str] = None,
               deadline_s: Optional[float] = None, idempotency_key: Optional[str] = None,
               cache: Optional[bool] = None, timeout: Optional[Timeout] = None,
               extra_headers: Optional[Mapping[str, str]] = None, extra_query: Optional[Mapping[str, Any]] = None,
               extra_body: Optional[Mapping[str, Any]] = None, **params: Any) -> Response: ...

    @overload
    def create(self, *, messages: Sequence[Mapping[str, Any]], model: Optional[str] = None,
               stream: Optional[bool], region: Optional[str] = None, deadline_s: Optional[float] = None,
               idempotency_key: Optional[str] = None, cache: Optional[bool] = None,
               timeout: Optional[Timeout] = None, extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None, extra_body: Optional[Mapping[str, Any]] = None,
               **params: Any) -> Union[Response, ChatCompletionStream]: ...

    def create(self, *, messages: Sequence[Mapping[str, Any]], model: Optional[str] = None,
               stream: Optional[bool] = None, region: Optional[str] = None, deadline_s: Optional[float] = None,
               idempotency_key: Optional[str] = None, cache: Optional[bool] = None,
               timeout: Optional[Timeout] = None, extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None, extra_body: Optional[Mapping[str, Any]] = None,
               **params: Any) -> Union[Response, ChatCompletionStream]:
        """``POST /chat/completions``, as :meth:`Client.chat_completion` (which documents
        every argument); API parameters (``temperature``, ``tools``, ``n``...) are sent as
        they are."""
        return self._client.chat_completion(
            messages, model, stream=stream, region=region, deadline_s=deadline_s, idempotency_key=idempotency_key,
            cache=cache, timeout=timeout, extra_headers=extra_headers, extra_query=extra_query,
            extra_body=extra_body, **params)


class Chat:
    """``client.chat``."""

    def __init__(self, client: "Client") -> None:
        self.completions = Completions(client)


class Embeddings:
    """``client.embeddings.create(model=, input=)``, and callable as before:
    ``client.embeddings(input, model=...)``."""

    def __init__(self, client: "Client") -> None:
        self._client = client

    def __call__(self, input: Union[str, Sequence[str]], model: Optional[str] = None, *,
                 region: Optional[str] = None, deadline_s: Optional[float] = None,
                 timeout: Optional[Timeout] = None, extra_headers: Optional[Mapping[str, str]] = None,
                 extra_query: Optional[Mapping[str, Any]] = None, extra_body: Optional[Mapping[str, Any]] = None,
                 **params: Any) -> Response:
        """``POST /embeddings`` for a string or a list of strings."""
        client = self._client
        model = client._resolve_model(model)
        if isinstance(input, str):
            ok = bool(input)
        else:
            ok = isinstance(input, (list, tuple)) and bool(input) and all(isinstance(i, str) for i in input)
        if not ok:
            raise InvalidRequestError("input", input, "must be a non-empty string or list of strings")
        check_json_value("input", input)
        if params:
            check_call_params(params, _EMBEDDING_ARGS)
        for name, value in params.items():
            check_json_value(name, value)
        options = request_options(timeout=timeout, extra_headers=extra_headers, extra_query=extra_query,
                                  extra_body=extra_body, reserved_body=_EMBEDDING_BUILT)
        payload = {"model": model, "input": input, **params}
        return client._request("embeddings", "POST", "/embeddings", payload, region=region,
                               deadline_s=deadline_s, options=options)

    def create(self, *, input: Union[str, Sequence[str]], model: Optional[str] = None,
               region: Optional[str] = None, deadline_s: Optional[float] = None,
               timeout: Optional[Timeout] = None, extra_headers: Optional[Mapping[str, str]] = None,
               extra_query: Optional[Mapping[str, Any]] = None, extra_body: Optional[Mapping[str, Any]] = None,
               **params: Any) -> Response:
        """openai-python's spelling of the call above (``dimensions``, ``encoding_format``... are sent)."""
        return self(input, model, region=region, deadline_s=deadline_s, timeout=timeout,
                    extra_headers=extra_headers, extra_query=extra_query, extra_body=extra_body, **params)


class Models:
    """``client.models.list()``, and callable as before: ``client.models()``."""

    def __init__(self, client: "Client") -> None:
        self._client = client

    def __call__(self, *, region: Optional[str] = None, deadline_s: Optional[float] = None,
                 timeout: Optional[Timeout] = None, extra_headers: Optional[Mapping[str, str]] = None,
                 extra_query: Optional[Mapping[str, Any]] = None) -> Response:
        """``GET /models`` from one node (with failover)."""
        options = request_options(timeout=timeout, extra_headers=extra_headers, extra_query=extra_query)
        return self._client._request("models", "GET", "/models", region=region,
                                     deadline_s=deadline_s, options=options)

    def list(self, *, region: Optional[str] = None, deadline_s: Optional[float] = None,
             timeout: Optional[Timeout] = None, extra_headers: Optional[Mapping[str, str]] = None,
             extra_query: Optional[Mapping[str, Any]] = None) -> ModelsPage:
        """``GET /models``: a page that iterates its models (``.data`` is the list)."""
        return ModelsPage.of(self(region=region, deadline_s=deadline_s, timeout=timeout,
                                  extra_headers=extra_headers, extra_query=extra_query))
