"""What a node URL (or a proxy's) says about safety: on this machine, in cleartext, and
whether a proxy or an unverified TLS peer would read the API key; and how any URL is shown in a message
(:func:`redact_url`). The one place these rules live; ``config`` and ``transport`` call
them (``holysheep_lb.config`` re-exports the public names), and so does ``contrib.redis``
for the Redis password (:func:`is_loopback_host`) and the URLs it refuses."""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Node

__all__ = ["is_loopback_host", "is_loopback_url", "is_cleartext_url", "sends_credentials", "check_cleartext",
           "check_proxy", "check_unverified_tls", "redact_url"]


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


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,15}://")
NOT_A_URL = "<not a URL>"


def redact_url(url: str, *, scheme_only: bool = False) -> str:
    """``url`` as an error message, a log line or a repr may quote it: without its user
    information, query and fragment (``https://<credentials>@gw.example/v1?<query removed>``).

    The one rule for every URL this package quotes (node, proxy and Redis URLs). Never
    raises, whatever the text. Everything up to the *last* ``@`` counts as user
    information, so a password with an unencoded ``/``, ``?``, ``#`` or ``@`` in it is
    still hidden. Text that does not start like a URL (``scheme://``) may be anything, a
    key passed in the wrong place included: it is shown as ``"<not a URL>"``. A path
    (``/models?key=...``) is shown without its query and fragment.
    ``scheme_only``: only ``scheme://...`` (for a URL its parser could not read, whose
    parts cannot be told apart).
    """
    if not isinstance(url, str):
        return NOT_A_URL
    match = _SCHEME.match(url)
    if match is not None:
        prefix, rest = match.group(), url[match.end():]
        if scheme_only:
            return prefix + "..."
        at = rest.rfind("@")
        if at >= 0:
            prefix, rest = prefix + "<credentials>@", rest[at + 1:]
    elif url[:1] == "/" and url[:2] != "//" and not scheme_only:
        prefix, rest = "", url  # a path (a call's path=): no user information to hide
    else:
        return NOT_A_URL
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[:cut] + ("?<query removed>" if rest[cut] == "?" else "#<fragment removed>")
    return prefix + rest


def sends_credentials(node: "Node", api_key: Optional[str]) -> bool:
    """Whether requests to ``node`` carry credentials: an API key (the node's own or the
    client's ``api_key``) or node headers (which may hold a gateway's own key)."""
    return bool(node.api_key or api_key or node.headers)


def check_cleartext(node: "Node", *, sends_key: bool, allow_insecure_http: bool) -> None:
    """Refuse an ``http://`` node that is not this machine and would receive credentials
    (the API key, or node headers, which may hold a gateway's own key): anyone on the
    path reads them. Allowed on loopback, without credentials, or with
    ``allow_insecure_http``. The key is never shown."""
    if not sends_key or allow_insecure_http or not is_cleartext_url(node.base_url) or is_loopback_url(node.base_url):
        return
    raise ConfigError(
        f"node[{node.id}].base_url", node.base_url,
        "would send the API key over plain http:// to a non-loopback host; "
        "use https:// or pass allow_insecure_http=True",
    )


def check_unverified_tls(node: "Node", verify: object, *, sends_key: bool, allow_insecure_http: bool) -> None:
    """Refuse TLS without certificate verification (``verify=False``) to an ``https://``
    node that is not this machine and would receive credentials.

    Without verification whoever answers in the node's place (a man in the middle)
    completes the handshake and reads the Authorization header and node headers, as over
    http://. Allowed on loopback, without credentials, or with ``allow_insecure_http``
    (the one switch for "this network is trusted"). The key is never shown.
    """
    if (verify is not False or not sends_key or allow_insecure_http or is_cleartext_url(node.base_url)
            or is_loopback_url(node.base_url)):
        return  # an http:// node is check_cleartext's
    raise ConfigError(
        "verify", False,
        f"node {node.id} ({redact_url(node.base_url)}) is not this machine and would receive the API key "
        "(or its headers) over TLS that verifies no certificate: whoever answers in its place reads them; "
        "leave verify=True, pass verify=<path of a CA bundle file or directory> for a private CA, "
        "or pass allow_insecure_http=True to accept this on a trusted network",
    )


def check_proxy(node: "Node", proxy_url: Optional[str], *, sends_key: bool, allow_insecure_http: bool) -> None:
    """Refuse a proxy that would read ``node``'s API key in cleartext.

    A request to an ``http://`` node through a proxy is handed to the proxy as plain
    HTTP, Authorization header included (an ``https://`` node is reached with CONNECT:
    the key stays inside TLS). Like a cleartext node, that is refused unless the proxy
    is on this machine, is reached over TLS, or ``allow_insecure_http`` is set.
    """
    if proxy_url is not None and "://" not in proxy_url:
        proxy_url = "http://" + proxy_url  # as requests reads a proxy given without a scheme
    if proxy_url is None or not sends_key or allow_insecure_http or not is_cleartext_url(node.base_url):
        return
    try:
        scheme: Optional[str] = urlsplit(proxy_url).scheme
        loopback = is_loopback_url(proxy_url)
    except ValueError:  # "http://[::1": requests would fail on every request, quoting it
        scheme, loopback = None, False
    if scheme is None:  # raised out here: the ValueError must not be kept as its __context__
        raise ConfigError(f"node[{node.id}].base_url", node.base_url,
                          f"the proxy {redact_url(proxy_url)} (from the environment) for this node cannot be "
                          "read: fix it, or set NO_PROXY for this host")
    if scheme == "https" or loopback:
        return
    raise ConfigError(
        f"node[{node.id}].base_url", node.base_url,
        f"requests to this http:// node would go through the proxy {redact_url(proxy_url)} (from the environment) "
        "in cleartext: the proxy would see the API key; use https://, a loopback proxy, NO_PROXY, "
        "or pass allow_insecure_http=True",
    )
