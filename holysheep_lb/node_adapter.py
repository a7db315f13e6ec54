"""The transport adapter each node's session mounts: requests' own, minus per-call rework.

requests' ``HTTPAdapter.send`` re-derives, on every request, things that never change
for one node: which proxy applies (``select_proxy`` parses the URL), the pool key
(``parse_url`` again), the path to put on the request line (a third parse), and, for
HTTPS, whether the CA bundle exists (two ``stat`` calls). It then copies the response's
cookies into a jar that :class:`~holysheep_lb.transport.Transport` never reads (its
session's cookie policy refuses every cookie). On a node that answers in a millisecond
that is a tenth of the call.

:class:`NodeAdapter` overrides only the hooks requests documents for subclasses
(``get_connection_with_tls_context``, ``request_url``, ``cert_verify``,
``build_response``) and remembers their answers per URL while no proxy applies; with
a proxy, everything goes through requests unchanged. Error mapping, timeouts and the
urllib3 call stay requests' own. The memos are bounded (a node has a handful of paths).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from requests.models import PreparedRequest, Response
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers

from .deadline import WatchedAdapter

__all__ = ["NodeAdapter"]

_MEMO_LIMIT = 64  # distinct URLs remembered per adapter; beyond it, requests' own path


class NodeAdapter(WatchedAdapter):
    """``HTTPAdapter`` for one node's session: remembers per-URL pool keys and request
    paths while no proxy applies, checks a pool's TLS settings once, and builds
    responses without a cookie jar (the session refuses cookies)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pool_keys: Dict[Tuple[str, Any, Any], Tuple[Dict[str, Any], Dict[str, Any]]] = {}
        self._paths: Dict[str, str] = {}
        super().__init__(*args, **kwargs)

    def get_connection_with_tls_context(
        self,
        request: PreparedRequest,
        verify: Any,
        proxies: Optional[Dict[str, str]] = None,
        cert: Any = None,
    ) -> Any:
        url = request.url
        if proxies or not isinstance(url, str):
            return super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        key = (url, verify if isinstance(verify, (bool, str)) else id(verify), cert if cert is None or
               isinstance(cert, str) else tuple(cert))
        found = self._pool_keys.get(key)
        if found is None:
            found = self.build_connection_pool_key_attributes(request, verify, cert)
            if len(self._pool_keys) < _MEMO_LIMIT:
                self._pool_keys[key] = found
        host_params, pool_kwargs = found
        # urllib3 merges pool_kwargs into a copy of its own; the memo is never changed
        return self._checked(self.poolmanager.connection_from_host(**host_params, pool_kwargs=pool_kwargs))

    def request_url(self, request: PreparedRequest, proxies: Optional[Dict[str, str]]) -> str:
        url = request.url
        if proxies or not isinstance(url, str):
            return str(super().request_url(request, proxies))
        path = self._paths.get(url)
        if path is None:
            path = str(super().request_url(request, proxies))
            if len(self._paths) < _MEMO_LIMIT:
                self._paths[url] = path
        return path

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests sets the same attributes on the pool each time (and stats the CA
        # bundle for HTTPS); a pool keeps them, so once per pool and settings is enough
        settings = (url[:5].lower() == "https", verify, cert)
        if getattr(conn, "_holysheep_tls", None) == settings:
            return
        super().cert_verify(conn, url, verify, cert)
        conn._holysheep_tls = settings

    def build_response(self, req: PreparedRequest, resp: Any) -> Response:
        # requests' own, without copying cookies into the response's jar: nothing reads
        # them, and the session's policy refuses every cookie
        response = Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url.decode("utf-8") if isinstance(req.url, bytes) else str(req.url)
        response.request = req
        response.connection = self
        return response
