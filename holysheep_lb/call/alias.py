"""Kept for importers: ``client.chat.completions`` now lives in :mod:`holysheep_lb.openai_api`."""

from __future__ import annotations

from ..openai_api import Chat, Completions

__all__ = ["Chat", "Completions"]
