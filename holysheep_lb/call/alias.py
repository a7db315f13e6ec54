"""``client.chat.completions.create(...)``: the OpenAI-style alias of ``Client.chat_completion``."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

__all__ = ["Chat", "Completions"]


class Completions:
    def __init__(self, client: Any) -> None:
        self._client = client

    def create(self, *, model: Optional[str] = None, messages: Sequence[Mapping[str, Any]],
               **params: Any) -> Any:
        """OpenAI-style alias of :meth:`Client.chat_completion`."""
        return self._client.chat_completion(messages, model=model, **params)


class Chat:
    def __init__(self, client: Any) -> None:
        self.completions = Completions(client)
