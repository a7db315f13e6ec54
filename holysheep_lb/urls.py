"""What a node URL (or a proxy's) says about safety: on this machine, in cleartext, and
whether a proxy would read the API key. The one place these rules live; ``config`` and
``transport`` call them (``holysheep_lb.config`` re-exports the public names), and so does
``contrib.redis`` for the Redis password (:func:`is_loopback_host`)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlsplit

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Node

__all__ = ["is_loopback_host", "is_loopback_url", "is_cleartext_url", "check_proxy"]


def is_loopback_host(host: str) -> bool:
    """True when ``host`` (a name or an IP address, without brackets) is this machine:
    127.0.0.0/8, ::1 or localhost. Anything else, an empty host included, is not."""
    host = host.lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_url(url: str) -> bool:
    """True when ``url`` points at this machine (127.0.0.0/8, ::1 or localhost)."""
    return is_loopback_host(urlsplit(url).hostname or "")


def is_cleartext_url(url: str) -> bool:
    """True for an ``http://`` URL (the scheme in any case): what is sent there can be read."""
    return urlsplit(url).scheme == "http"  # urlsplit lower-cases the scheme


def _without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` replaced, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:authority_end]
    if "@" not in authority:
        return url
    return f"{scheme}://<credentials>@{authority.rpartition('@')[2]}{rest[authority_end:]}"


def check_proxy(node: "Node", proxy_url: Optional[str], *, sends_key: bool, allow_insecure_http: bool) -> None:
    """Refuse a proxy that would read ``node``'s API key in cleartext.

    A request to an ``http://`` node through a proxy is handed to the proxy as plain
    HTTP, Authorization header included (an ``https://`` node is reached with CONNECT:
    the key stays inside TLS). Like a cleartext node, that is refused unless the proxy
    is on this machine, is reached over TLS, or ``allow_insecure_http`` is set.
    """
    if proxy_url is not None and "://" not in proxy_url:
        proxy_url = "http://" + proxy_url  # as requests reads a proxy given without a scheme
    if (proxy_url is None or not sends_key or allow_insecure_http or not is_cleartext_url(node.base_url)
            or urlsplit(proxy_url).scheme == "https" or is_loopback_url(proxy_url)):
        return
    parts = urlsplit(proxy_url)
    host = parts.hostname or "?"
    shown = f"{parts.scheme}://{'[' + host + ']' if ':' in host else host}" + (
        f":{parts.port}" if _port_or_none(parts) is not None else "")
    raise ConfigError(
        f"node[{node.id}].base_url", node.base_url,
        f"requests to this http:// node would go through the proxy {shown} (from the environment) in "
        "cleartext: the proxy would see the API key; use https://, a loopback proxy, NO_PROXY, "
        "or pass allow_insecure_http=True",
    )


def _port_or_none(parts: Any) -> Optional[int]:
    try:
        return parts.port
    except ValueError:
        return None
