"""OpenAI-shaped views of the JSON the API returns: dicts and lists that also read by attribute.

Code written for openai-python reads answers by attribute
(``resp.choices[0].message.content``); code written for plain JSON reads them by key
(``resp["choices"][0]["message"]["content"]``). Every object here does both: a
:class:`JSONObject` *is* the dict it wraps (``isinstance(x, dict)``, ``==`` with plain
dicts, ``json.dumps``) and a :class:`JSONList` *is* the list, so answers can be passed
back as messages, cached, pickled and compared as before.

Reading by attribute:

* a key the server sent reads as its value, dicts and lists of dicts as views of the
  field's kind (``message`` as :class:`Message`, ``tool_calls`` as a list of
  :class:`ToolCall`), fields of unknown shape as generic views;
* a known field of that kind (the annotations below, which follow openai-python's
  names and types) that the server omitted reads as None, as openai-python does, so
  ``delta.content or ""`` works on the last chunk of a stream;
* any other name raises AttributeError, so a misspelt field is an error, not a silent
  None. Keys that are not identifiers, start with ``_`` or are named like a dict method
  (``items``, ``keys``...) are read by key.

Views are built lazily, one level at a time, when an attribute is read: a call that
only reads by key pays nothing. A view is a one-level copy of the dict or list it
replaces, stored back into its parent, so the parsed JSON is never copied whole, the
caller's own dicts (a ``fallback_reply``) are never modified, and a change made through
a view is seen by key as well. Attributes are read-only; assign by key. Reading from
several threads is safe (two threads may build the same view at once: both are equal
and one is kept); mutating from several threads is not, as for any dict.

``model_dump()`` returns the plain JSON (dicts and lists, unknown fields kept, a deep
copy); ``model_dump_json()`` the same as a string.
"""

from __future__ import annotations

import difflib
import json
import typing
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Iterable, Iterator, List, Optional, Tuple, Union, overload

__all__ = [
    "JSONObject",
    "JSONList",
    "Function",
    "CustomToolCallInput",
    "ToolCall",
    "URLCitation",
    "Annotation",
    "Audio",
    "Message",
    "TopLogprob",
    "TokenLogprob",
    "ChoiceLogprobs",
    "Choice",
    "CompletionTokensDetails",
    "PromptTokensDetails",
    "Usage",
    "DeltaFunction",
    "DeltaToolCall",
    "ChoiceDelta",
    "ChunkChoice",
    "ChatCompletionChunk",
    "Embedding",
    "Model",
]


class JSONObject(Dict[str, Any]):
    """A JSON object that also reads by attribute; the base of every typed view.

    A subclass declares its known fields as annotations (``content: Optional[str]``);
    a field annotated with a view class (or a list of one) is read as that view.
    """

    __slots__ = ()

    #: known field name -> the view class for its objects (or its list's objects);
    #: None for a field read as it is (strings, numbers, lists of numbers)
    _fields: ClassVar[Dict[str, Optional[type]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__slots__" not in cls.__dict__:  # an instance __dict__ would let `view.field = x` diverge from the key
            raise TypeError(f"{cls.__name__} must declare __slots__")
        hints = typing.get_type_hints(cls)
        cls._fields = {name: _view_class(hint) for name, hint in hints.items() if not name.startswith("_")}

    if not TYPE_CHECKING:  # hidden from type checkers: only declared fields type-check

        def __getattr__(self, name: str) -> Any:
            # only reached when normal lookup failed (not for dict methods or metadata)
            if name[:1] == "_":  # copy/pickle probe dunders: never answer them from the JSON
                raise AttributeError(name)
            fields = type(self)._fields
            value = dict.get(self, name, _MISSING)
            if value is _MISSING:
                if name in fields:
                    return None
                raise _NoSuchField(self, name) from None
            kind = fields.get(name, JSONObject)
            if kind is None:
                return value
            view = _wrap(value, kind)
            if view is not value:
                dict.__setitem__(self, name, view)
            return view

    def __dir__(self) -> Iterable[str]:
        keys = {k for k in self if isinstance(k, str) and k.isidentifier() and k[:1] != "_"}
        return sorted(set(super().__dir__()) | set(type(self)._fields) | keys)

    def model_dump(self) -> Dict[str, Any]:
        """The JSON as plain dicts and lists, unknown fields included (a deep copy)."""
        return _plain(self)

    def model_dump_json(self, *, indent: Optional[int] = None) -> str:
        """The JSON as a string (``indent`` as in :func:`json.dumps`)."""
        return json.dumps(self, indent=indent, ensure_ascii=False)

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (dict(self),))


class JSONList(List[Any]):
    """A JSON list whose objects read by attribute (as the view class of its field)."""

    __slots__ = ("_kind",)

    def __init__(self, items: Iterable[Any] = (), kind: type = JSONObject) -> None:
        super().__init__(items)
        self._kind = kind

    @overload
    def __getitem__(self, index: typing.SupportsIndex) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> "JSONList": ...

    def __getitem__(self, index: Union[typing.SupportsIndex, slice]) -> Any:
        value = list.__getitem__(self, index)
        if isinstance(index, slice):
            return JSONList(value, self._kind)
        view = _wrap(value, self._kind)
        if view is not value:
            list.__setitem__(self, index, view)
        return view

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def __reversed__(self) -> Iterator[Any]:
        for i in range(len(self) - 1, -1, -1):
            yield self[i]

    def __reduce__(self) -> Tuple[Any, ...]:
        return (JSONList, (list.copy(self), self._kind))


_MISSING = object()


def _view_class(hint: Any) -> Optional[type]:
    """The view class a field's annotation names (through Optional, Union, List), if any."""
    if hint is Any:
        return JSONObject
    if isinstance(hint, type):
        return hint if issubclass(hint, JSONObject) else None
    for arg in typing.get_args(hint):
        found = _view_class(arg)
        if found is not None:
            return found
    return None


def _wrap(value: Any, kind: type) -> Any:
    """``value`` as a view: dicts as ``kind``, lists as lists of ``kind``; anything else as it is."""
    cls = type(value)
    if cls is dict:
        if kind is JSONObject:  # a field of unknown shape: OpenAI objects name their kind
            tag = value.get("object")
            kind = _BY_OBJECT.get(tag, JSONObject) if isinstance(tag, str) else JSONObject
        return kind(value)
    if cls is list:
        return JSONList(value, kind)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in dict.items(value)}
    if isinstance(value, list):
        return [_plain(v) for v in list.__iter__(value)]
    return value


class _NoSuchField(AttributeError):
    """A name that is neither a key nor a known field. The message (with its "did you
    mean") is composed only when shown: ``getattr(view, name, default)`` probes are cheap."""

    def __init__(self, obj: JSONObject, name: str) -> None:
        super().__init__(name)
        self._obj = obj
        self._name = name

    def __str__(self) -> str:
        kind = type(self._obj).__name__
        message = f"{kind!r} object has no attribute {self._name!r} (not a key it has, nor a known field)"
        candidates = [k for k in self._obj.__dir__() if k[:1] != "_"]
        close = difflib.get_close_matches(self._name, candidates, n=1)
        return f"{message}; did you mean {close[0]!r}?" if close else message

    def __reduce__(self) -> Tuple[Any, ...]:  # unpickled as the plain AttributeError it reads as
        return (AttributeError, (str(self),))


# -- chat completions (openai-python's chat_completion*.py, completion_usage.py) ----------


class Function(JSONObject):
    """The function a tool call (or the older ``function_call``) asks for."""

    __slots__ = ()
    name: str
    arguments: str  # JSON text as the model wrote it: validate before use


class CustomToolCallInput(JSONObject):
    """The input of a call to a custom (free-form) tool."""

    __slots__ = ()
    name: str
    input: str


class ToolCall(JSONObject):
    """One tool call of an assistant message."""

    __slots__ = ()
    id: str
    type: str
    function: Function
    custom: Optional[CustomToolCallInput]


class URLCitation(JSONObject):
    __slots__ = ()
    end_index: int
    start_index: int
    title: str
    url: str


class Annotation(JSONObject):
    __slots__ = ()
    type: str
    url_citation: URLCitation


class Audio(JSONObject):
    __slots__ = ()
    id: str
    data: str
    expires_at: int
    transcript: str


class Message(JSONObject):
    """The assistant's message of a choice (can be sent back as a message as it is)."""

    __slots__ = ()
    content: Optional[str]
    refusal: Optional[str]
    role: str
    annotations: Optional[List[Annotation]]
    audio: Optional[Audio]
    function_call: Optional[Function]
    tool_calls: Optional[List[ToolCall]]
    reasoning_content: Optional[str]  # not OpenAI's: DeepSeek-style reasoning models send it


class TopLogprob(JSONObject):
    __slots__ = ()
    token: str
    bytes: Optional[List[int]]
    logprob: float


class TokenLogprob(JSONObject):
    __slots__ = ()
    token: str
    bytes: Optional[List[int]]
    logprob: float
    top_logprobs: List[TopLogprob]


class ChoiceLogprobs(JSONObject):
    __slots__ = ()
    content: Optional[List[TokenLogprob]]
    refusal: Optional[List[TokenLogprob]]


class Choice(JSONObject):
    """One choice of a chat completion."""

    __slots__ = ()
    finish_reason: str
    index: int
    logprobs: Optional[ChoiceLogprobs]
    message: Message


class CompletionTokensDetails(JSONObject):
    __slots__ = ()
    accepted_prediction_tokens: Optional[int]
    audio_tokens: Optional[int]
    reasoning_tokens: Optional[int]
    rejected_prediction_tokens: Optional[int]


class PromptTokensDetails(JSONObject):
    __slots__ = ()
    audio_tokens: Optional[int]
    cached_tokens: Optional[int]


class Usage(JSONObject):
    """Token usage of a chat completion, a stream's last chunk or an embeddings call."""

    __slots__ = ()
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int
    completion_tokens_details: Optional[CompletionTokensDetails]
    prompt_tokens_details: Optional[PromptTokensDetails]


# -- stream chunks ------------------------------------------------------------------------


class DeltaFunction(JSONObject):
    """A piece of a streamed function call: concatenate ``arguments`` over the chunks."""

    __slots__ = ()
    name: Optional[str]
    arguments: Optional[str]


class DeltaToolCall(JSONObject):
    """A piece of a streamed tool call; ``index`` says which call it continues."""

    __slots__ = ()
    index: int
    id: Optional[str]
    type: Optional[str]
    function: Optional[DeltaFunction]


class ChoiceDelta(JSONObject):
    """What one chunk adds to a choice; every field may be absent."""

    __slots__ = ()
    content: Optional[str]
    function_call: Optional[DeltaFunction]
    refusal: Optional[str]
    role: Optional[str]
    tool_calls: Optional[List[DeltaToolCall]]
    reasoning_content: Optional[str]  # not OpenAI's: DeepSeek-style reasoning models send it


class ChunkChoice(JSONObject):
    """One choice of a stream chunk."""

    __slots__ = ()
    delta: ChoiceDelta
    finish_reason: Optional[str]
    index: int
    logprobs: Optional[ChoiceLogprobs]


class ChatCompletionChunk(JSONObject):
    """One chunk of a streamed chat completion (the last may carry only ``usage``)."""

    __slots__ = ()
    id: str
    choices: List[ChunkChoice]
    created: int
    model: str
    object: str
    service_tier: Optional[str]
    system_fingerprint: Optional[str]
    usage: Optional[Usage]


# -- embeddings and models ----------------------------------------------------------------


class Embedding(JSONObject):
    """One vector of an embeddings answer (a base64 string if asked for that encoding)."""

    __slots__ = ()
    embedding: List[float]
    index: int
    object: str


class Model(JSONObject):
    """One entry of the models list."""

    __slots__ = ()
    id: str
    created: int
    object: str
    owned_by: str


# A field of unknown shape (``data`` of a list answer) is viewed by its ``object`` tag.
_BY_OBJECT: Dict[str, type] = {
    "chat.completion.chunk": ChatCompletionChunk,
    "embedding": Embedding,
    "model": Model,
}
