"""The process-wide Client, built lazily from ``settings.HOLYSHEEP`` on first use.

Thread-safe: request threads racing on the first call get the same Client. It is
closed at exit, and rebuilt when a test changes ``settings.HOLYSHEEP``
(``override_settings``).
"""

from __future__ import annotations

import atexit
import threading
from typing import Optional

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from holysheep_lb import Client

_client: Optional[Client] = None
_client_lock = threading.Lock()  # guards building and replacing _client


def get_client() -> Client:
    global _client
    client = _client
    if client is None:
        with _client_lock:
            if _client is None:
                _client = Client.from_mapping(settings.HOLYSHEEP)
            client = _client
    return client


def close_client() -> None:
    global _client
    with _client_lock:
        client, _client = _client, None
    if client is not None:
        client.close()


atexit.register(close_client)


@receiver(setting_changed)
def _rebuild_on_settings_change(setting: str, **kwargs) -> None:
    if setting == "HOLYSHEEP":
        close_client()
