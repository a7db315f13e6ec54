"""HTTP to one node: a ``requests.Session`` per node, size-capped reads, typed errors.

This is the only module that touches requests/urllib3 exceptions: ``translate_error``
turns every one of them into our tree (most specific class first), so callers above
it see :mod:`holysheep_lb.errors` only.

Per-node sessions are built for thread pools: each node's pool keeps as many keep-alive
connections as that node had requests in flight at once, up to ``pool_maxsize`` (256 by
default). urllib3 opens a connection only when none is idle, so the sockets stay bounded
by the callers' own concurrency, and a pool never closes a connection it will want again
a moment later (the old default of 32 made 96 threads over 2 nodes close and reopen
connections all the time, logging "Connection pool is full"). urllib3's own retries are
off (the client retries on *another* node instead), redirects are never followed (an Authorization
header must not travel to another host), and ``trust_env`` is off: proxies and the CA
bundle are read from the environment once per node here instead of on every request.
A proxy that would read the API key in cleartext is refused at construction
(:func:`holysheep_lb.config.check_proxy`). Every error quotes what the node or the HTTP
library said only through a :class:`~holysheep_lb.redaction.Redactor`: the node's key,
headers and proxy credentials, and each request's query and ``extra_headers`` values.
"""

from __future__ import annotations

import http.cookiejar
import json
import logging
import socket
import time
from typing import Any, Collection, Dict, Iterator, Mapping, NamedTuple, Optional, Tuple, Union

import requests
import urllib3.exceptions
from requests.structures import CaseInsensitiveDict
from urllib3.util.retry import Retry

from . import forksafe
from ._version import __version__
from .config import Node, check_proxy
from .deadline import Watch, WatchedAdapter, set_current, watch
from .hangs import Exchanges
from .node_adapter import NodeAdapter
from .urls import sends_credentials
from .errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APITimeoutError,
    ConfigError,
    ResponseTooLargeError,
)
from .policy.classify import local_failure, status_error
from . import redaction
from .redaction import NO_REDACTION, Redactor, proxy_secrets
from .retry import parse_retry_after, parse_should_retry

__all__ = ["Transport", "HTTPResult", "translate_error", "USER_AGENT"]

log = logging.getLogger(__name__)

USER_AGENT = f"holysheep-lb/{__version__}"
_READ_CHUNK = 64 * 1024


class HTTPResult(NamedTuple):
    """A decoded 2xx answer."""

    status_code: int
    data: Dict[str, Any]
    request_id: Optional[str]
    # the node's x-ratelimit-* headers, read by quota.py; None without them
    quota_headers: Optional[Dict[str, str]] = None


def translate_error(exc: BaseException, node_id: str, redact: Redactor = NO_REDACTION) -> APIError:
    """Map a requests/urllib3/socket exception to our tree. The only such mapping.

    The result's ``__cause__`` is ``exc``, unless ``exc`` quotes the API key: a node can
    echo it where the HTTP framing is parsed (a status line, a chunk size), and urllib3
    quotes those. Raise the result outside the ``except`` block, so that such an
    exception is not kept as its ``__context__`` either.
    """
    if isinstance(exc, APIError):
        return exc
    error = _translate(exc, node_id, _describe(exc, redact))
    if not redact.found_in(exc):
        error.__cause__ = exc
    return error


def _translate(exc: BaseException, node_id: str, text: str) -> APIError:
    if isinstance(exc, (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)):
        return APITimeoutError(f"connect timeout: {text}", node_id=node_id)
    if isinstance(exc, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, socket.timeout)):
        return APITimeoutError(f"read timeout: {text}", node_id=node_id, request_sent=True)
    if isinstance(exc, requests.exceptions.ConnectionError):
        # requests wraps a urllib3 read timeout met while streaming in a ConnectionError
        inner = exc.args[0] if exc.args else None
        if isinstance(inner, urllib3.exceptions.ReadTimeoutError):
            return APITimeoutError(f"read timeout: {text}", node_id=node_id, request_sent=True)
        return APIConnectionError(f"connection error: {text}", node_id=node_id)
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
        return APIConnectionError(f"connection broken: {text}", node_id=node_id)
    if isinstance(exc, (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError)):
        return APIResponseValidationError(f"undecodable body: {text}", node_id=node_id)
    if isinstance(exc, (urllib3.exceptions.HTTPError, requests.exceptions.RequestException, OSError)):
        return APIConnectionError(f"{type(exc).__name__}: {text}", node_id=node_id)
    # Anything else failed in this process before the node was involved (e.g. a value
    # http.client cannot encode): final, and not held against the node or the model.
    return local_failure(f"could not send the request: {type(exc).__name__}: {text}", node_id)


def _describe(exc: BaseException, redact: Redactor = NO_REDACTION) -> str:
    text = redact.text(str(exc) or type(exc).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


class Transport:
    """Sends requests to one node over its own pooled session. Thread-safe."""

    def __init__(
        self,
        node: Node,
        *,
        api_key: Optional[str],
        pool_maxsize: int,
        max_response_bytes: int,
        verify: Union[bool, str] = True,
        allow_insecure_http: bool = False,
    ) -> None:
        self.node = node
        self._api_key = node.api_key or api_key
        self.redactor = NO_REDACTION  # set with the session: it knows the proxy's credentials
        self._pool_maxsize = pool_maxsize
        self._verify = verify
        self.max_response_bytes = max_response_bytes
        self._urls: Dict[str, str] = {}
        self.closed = False
        self._allow_insecure_http = allow_insecure_http
        self._refused: Optional[ConfigError] = None  # set when a child's proxy would see the key
        self.exchanges = Exchanges()  # those under way, so that the ones stuck on a hung node can be cut
        self.session = self._new_session()
        self._check_proxy()
        redaction.install_log_filter()
        forksafe.register(self, phase=forksafe.PHASE_CONNECTIONS)

    def _check_proxy(self) -> None:
        # node headers may carry credentials too (a gateway's own key header)
        check_proxy(self.node, self.proxy_url, sends_key=sends_credentials(self.node, self._api_key),
                    allow_insecure_http=self._allow_insecure_http)

    @property
    def proxy_url(self) -> Optional[str]:
        """The proxy this node's requests go through (from the environment), or None."""
        return requests.utils.select_proxy(self.node.base_url, self.session.proxies)

    def __repr__(self) -> str:
        return f"<Transport node={self.node.id} base_url={self.node.base_url}>"

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        session.headers.clear()
        session.headers.update({
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            "Accept-Encoding": "gzip, deflate",
            "Connection": "keep-alive",
        })
        session.headers.update(self.node.headers)
        if self._api_key:
            session.headers["Authorization"] = f"Bearer {self._api_key}"
        # Resolve the environment once (HTTPS_PROXY/NO_PROXY, REQUESTS_CA_BUNDLE):
        # with trust_env off requests would otherwise re-read it on every request.
        env = requests.Session().merge_environment_settings(
            self.node.base_url, {}, None, self._verify, None
        )
        session.proxies = env.get("proxies") or {}
        # for every error built from what this node sends or what the HTTP library says:
        # the key, the node's headers (a gateway's own key header), the proxy's credentials
        self.redactor = Redactor(self._api_key, [*self.node.headers.values(), *proxy_secrets(session.proxies.values())])
        session.verify = env.get("verify", self._verify)
        adapter = NodeAdapter(  # connections obey each call's deadline (deadline.py)
            pool_connections=1,
            pool_maxsize=self._pool_maxsize,
            max_retries=Retry(total=0, connect=0, read=0, redirect=0, status=0, raise_on_redirect=False),
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._adapter = adapter
        # Responses' cookies are never stored (nor sent): bounded memory, no hidden state.
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        return session

    @forksafe.once_per_process
    def reset_after_fork(self) -> None:
        """Forget the parent's connections: sockets must not be shared across processes.

        The proxy is read from the environment again, and checked again: a child whose
        environment sends the key to a cleartext proxy refuses every request with the
        same :class:`ConfigError` the constructor would raise (a fork handler cannot raise).
        (``exchanges`` resets itself: it is in the fork registry.)
        """
        self.session = self._new_session()
        try:
            self._check_proxy()
        except ConfigError as exc:
            self._refused = exc
        else:
            self._refused = None

    def close(self) -> None:
        """Close every pooled connection now, and open no new one from now on.

        Requests in flight end normally; their connections are closed as they are
        released (a closed pool keeps none). urllib3 >= 2.0.3 leaves closing a cleared
        pool to the garbage collector (urllib3 issue 3082): while an exception's
        traceback still references a pool, its sockets would stay open after
        ``Session.close()``. Close the pools first.
        """
        self.closed = True
        for adapter in self.session.adapters.values():
            if isinstance(adapter, WatchedAdapter):
                adapter.closed = True  # set before the pools close: a racing lookup closes its own
            if not isinstance(adapter, requests.adapters.HTTPAdapter):
                adapter.close()  # not one we mount: it knows its own pools
                continue
            managers = [adapter.poolmanager, *adapter.proxy_manager.values()]
            for pools in (m.pools for m in managers if m is not None):
                for key in list(pools.keys()):
                    pool = pools.get(key)
                    if pool is not None:
                        pool.close()
        self.session.close()

    def open(
        self,
        method: str,
        path: str,
        *,
        body: Optional[bytes],
        headers: Optional[Mapping[str, str]],
        timeout_s: Tuple[float, float],
        deadline_s: Optional[float] = None,
        secrets: Collection[str] = (),
    ) -> requests.Response:
        """Send a request and return the response with its body unread (streaming).

        ``deadline_s`` bounds the exchange from connect to the last header, and the
        body's reads until :meth:`end_deadline` (or the response's release): past it
        the connection is cut and :class:`APITimeoutError` raised. ``secrets``: values
        of this request that may be credentials (a call's ``extra_headers`` values);
        they, the path's query and the node's own secrets never show in an error
        (:meth:`redactor_of` the response says what to blank in what it brings).
        """
        if self.closed:
            raise self._closed_error()
        if self._refused is not None:
            raise self._refused
        entry = None if deadline_s is None else watch(deadline_s)
        if entry is not None:
            self.exchanges.track(entry)
        redact = self.redactor.for_request(path, secrets)
        set_current(entry)  # read by the connection as it connects and sends (deadline.py)
        redaction.set_current(redact)  # urllib3 logs the URL meanwhile, query included
        error: Optional[APIError]
        try:
            # the adapter directly: Session.send adds hooks, a cookie jar and redirect
            # handling, none of which a node's session uses (node_adapter.py)
            response = self._adapter.send(
                self._prepare(method, path, body, headers),
                timeout=timeout_s,
                stream=True,
                verify=self.session.verify,
                proxies=self.session.proxies,
                cert=None,
            )
        except Exception as exc:  # noqa: BLE001 - every error is translated, none swallowed
            error = self._failure(exc, entry, redact)
        else:
            error = None
        finally:
            set_current(None)
            redaction.set_current(None)
        if error is not None:
            raise error  # outside the except block (see translate_error)
        if entry is not None:
            response.holysheep_watch = entry  # type: ignore[attr-defined]
        if redact is not self.redactor:
            response.holysheep_redactor = redact  # type: ignore[attr-defined]
        return response

    def redactor_of(self, response: requests.Response) -> Redactor:
        """What to blank in errors built from ``response``: this node's secrets and its request's."""
        redact = getattr(response, "holysheep_redactor", None)
        return redact if isinstance(redact, Redactor) else self.redactor

    def end_deadline(self, response: requests.Response) -> None:
        """Stop bounding ``response`` by its deadline (a stream past its first chunk).

        Raises :class:`APITimeoutError` if the deadline cut it first.
        """
        entry = _watch_of(response)
        if entry is not None and entry.end():
            raise self._past_deadline(entry)

    def _failure(self, exc: BaseException, entry: Optional[Watch], redact: Redactor) -> APIError:
        """The typed error for a failed exchange: the deadline's cut and a closed client
        explain the failure better than what the socket said."""
        if entry is not None and entry.end():
            return self._past_deadline(entry)
        if self.closed:
            return self._closed_error()
        return translate_error(exc, self.node.id, redact)

    def cut_exchanges(self) -> int:
        """Cut every exchange under way on this node (it was found hung): each blocked call
        fails at once with :class:`APITimeoutError` and can be retried elsewhere. Returns
        how many were cut."""
        return self.exchanges.cut_all()

    def _past_deadline(self, entry: Watch) -> APITimeoutError:
        if self.exchanges.was_cut_as_hung(entry):
            return APITimeoutError("the node answered nothing for far longer than usual (hung); the connection "
                                   "was cut so that the call can go to another node",
                                   node_id=self.node.id, request_sent=entry.sent)
        when = "while the response was arriving" if entry.sent else "before the request was sent"
        return APITimeoutError(f"the call's deadline passed {when}; the connection was cut",
                               node_id=self.node.id, request_sent=entry.sent)

    def _closed_error(self) -> APIConnectionError:
        # final, and held against neither the node nor the model: the client was closed
        return local_failure("the client is closed", self.node.id)

    def _prepare(self, method: str, path: str, body: Optional[bytes],
                 headers: Optional[Mapping[str, str]]) -> requests.PreparedRequest:
        """Build the request directly: ``Session.request`` would re-merge the session's
        headers and re-parse the URL on every call, which costs more than our whole
        routing step. Headers were validated at construction; the URL once per path."""
        prepared = requests.PreparedRequest()
        prepared.method = method
        prepared.url = self._url(path)
        merged: "CaseInsensitiveDict[Union[str, bytes]]" = CaseInsensitiveDict()
        base = self.session.headers
        if isinstance(base, CaseInsensitiveDict):  # copy its store: the names were lowered once already
            merged._store = base._store.copy()  # type: ignore[assignment]
        else:
            merged.update(base)
        if headers:
            merged.update(headers)
        if body is not None:
            merged["Content-Length"] = str(len(body))
        prepared.headers = merged
        prepared.body = body
        prepared.hooks = {"response": []}
        prepared._cookies = self.session.cookies  # always empty: its policy refuses every cookie
        return prepared

    def _url(self, path: str) -> str:
        url = self._urls.get(path)
        if url is None:
            probe = requests.PreparedRequest()
            probe.prepare_url(self.node.base_url + path, None)
            url = str(probe.url)  # prepare_url always sets it
            if len(self._urls) < 64:  # bounded: paths come from callers of request()
                self._urls[path] = url
        return url

    def send(
        self,
        method: str,
        path: str,
        *,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout_s: Tuple[float, float],
        deadline_s: Optional[float] = None,
        secrets: Collection[str] = (),
    ) -> HTTPResult:
        """Send a request and decode the answer; raise a typed error for anything but 2xx JSON.

        ``deadline_s`` bounds the whole exchange: the read timeout applies to each socket
        read, so without it a node trickling its body could hold the caller much longer.
        ``secrets`` as for :meth:`open`.
        """
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        response = self.open(method, path, body=body, headers=headers, timeout_s=timeout_s, deadline_s=deadline_s,
                             secrets=secrets)
        entry = _watch_of(response)
        try:
            try:
                raw = self._read_capped(response, deadline)
            finally:
                response.close()
            result = self.decode(response, raw)
        except APIError as exc:
            if entry is not None and entry.end():
                raise self._past_deadline(entry) from exc
            raise
        if entry is not None and entry.end():  # a close-delimited body cut short reads as complete
            raise self._past_deadline(entry)
        return result

    def decode(self, response: requests.Response, raw: bytes) -> HTTPResult:
        """Turn a fully read response into an HTTPResult or a typed error."""
        node_id = self.node.id
        headers = response.headers
        redact = self.redactor_of(response)
        request_id = redact.header(headers.get("x-request-id") or headers.get("request-id"))
        status = response.status_code
        if status < 200:  # a 1xx is never the final answer to our requests
            raise APIResponseValidationError(f"unexpected informational status {status}", node_id=node_id,
                                             status_code=status, request_id=request_id)
        if status >= 300:
            # a server echoing our Authorization header must not put the key in errors
            raise status_error(
                status,
                redact.body(raw),
                node_id=node_id,
                request_id=request_id,
                headers=_small_headers(headers, redact),
                retry_after_s=parse_retry_after(headers),
                should_retry=parse_should_retry(headers),
            )
        problem = None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            problem = _describe(exc)
        if problem is not None:  # raised outside the except: a JSONDecodeError's ``doc`` is the whole body
            raise APIResponseValidationError(
                f"invalid JSON in a {status} response: {problem}",
                node_id=node_id, status_code=status, request_id=request_id,
            )
        if not isinstance(data, dict):
            raise APIResponseValidationError(
                f"expected a JSON object, got {type(data).__name__}",
                node_id=node_id, status_code=status, request_id=request_id,
            )
        return HTTPResult(status, data, request_id, _quota_headers(headers))

    def _read_capped(self, response: requests.Response, deadline: Optional[float] = None) -> bytes:
        cap = self.max_response_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise ResponseTooLargeError(
                f"response of {declared} bytes exceeds max_response_bytes={cap}", node_id=self.node.id
            )
        parts = []
        size = 0
        raw = response.raw
        try:
            if raw.chunked or not hasattr(raw, "read1"):
                chunks: Iterator[bytes] = raw.stream(_READ_CHUNK, decode_content=True)
            else:  # read1 returns what has arrived, so the deadline is checked as it trickles
                chunks = iter(lambda: raw.read1(_READ_CHUNK, decode_content=True), b"")
            for chunk in chunks:
                size += len(chunk)
                if size > cap:
                    raise ResponseTooLargeError(
                        f"response exceeds max_response_bytes={cap}", node_id=self.node.id
                    )
                parts.append(chunk)
                if deadline is not None and time.monotonic() > deadline:
                    raise APITimeoutError("the call's deadline passed while the body was still arriving",
                                          node_id=self.node.id, request_sent=True)
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated, never swallowed
            error = self._failure(exc, _watch_of(response), self.redactor_of(response))
        else:
            return b"".join(parts)
        raise error  # outside the except block (see translate_error)

    def raise_for_error_status(self, response: requests.Response, *, body_cap_bytes: int = 64 * 1024) -> None:
        """For a non-2xx streaming response: read at most ``body_cap_bytes``, close it, raise the typed error."""
        if 200 <= response.status_code < 300:
            return
        read_error: Optional[APIError] = None
        try:
            raw = response.raw.read(body_cap_bytes, decode_content=True) or b""
        except Exception as exc:  # noqa: BLE001 - the status is the news; the read error is chained
            raw = b""
            read_error = translate_error(exc, self.node.id, self.redactor_of(response))
        finally:
            response.close()
        try:
            self.decode(response, raw)
        except APIError as exc:
            raise exc from read_error

    def iter_bytes(self, response: requests.Response) -> Iterator[bytes]:
        """Yield a streaming body's bytes as they arrive, translating errors; the caller closes it.

        Chunked bodies go through ``iter_content`` (one HTTP chunk at a time, and the
        connection returns to the pool when fully read); others use ``read1`` where
        urllib3 has it, so a close-delimited event stream is not held back to fill a buffer.
        """
        raw = response.raw
        entry = _watch_of(response)
        try:
            if getattr(raw, "chunked", True) or not hasattr(raw, "read1"):
                yield from response.iter_content(chunk_size=_READ_CHUNK)
            else:
                while True:
                    data = raw.read1(_READ_CHUNK, decode_content=True)
                    if not data:
                        break
                    yield data
        except Exception as exc:  # noqa: BLE001 - translated, never swallowed
            error = self._failure(exc, entry, self.redactor_of(response))
        else:
            if entry is not None and entry.cut:  # the cut read as the end of the body
                raise self._past_deadline(entry)
            return
        raise error  # outside the except block (see translate_error)

    def set_read_timeout(self, response: requests.Response, timeout_s: float) -> None:
        """Change the socket read timeout of an open streaming response (first chunk -> stall)."""
        sock = getattr(getattr(response.raw, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.settimeout(timeout_s)
            except OSError:
                pass  # the socket is already closed: the next read reports it

    def iter_lines(self, response: requests.Response) -> Iterator[bytes]:
        """Yield raw lines of a streaming body, translating errors; the caller closes it."""
        try:
            yield from response.iter_lines(chunk_size=1024)
            return
        except Exception as exc:  # noqa: BLE001 - translated, never swallowed
            error = translate_error(exc, self.node.id, self.redactor_of(response))
        raise error  # outside the except block (see translate_error)


def _watch_of(response: requests.Response) -> Optional[Watch]:
    return getattr(response, "holysheep_watch", None)


def _try_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


_KEPT_HEADERS = ("retry-after", "retry-after-ms", "x-request-id", "x-should-retry", "content-type")


def _quota_headers(headers: Mapping[str, str]) -> Optional[Dict[str, str]]:
    """The x-ratelimit-* headers (quota.py parses them), few and short: nothing secret is in them."""
    # requests' headers hold each name lowered already: no per-item __getitem__ and lower()
    pairs = headers.lower_items() if isinstance(headers, CaseInsensitiveDict) else headers.items()
    kept = {k.lower(): v[:80] for k, v in pairs if k[:12].lower() == "x-ratelimit-"}
    return dict(list(kept.items())[:12]) if kept else None


def _small_headers(headers: Mapping[str, str], redact: Redactor) -> Dict[str, str]:
    return {k: redact.text(headers[k])[:200] for k in _KEPT_HEADERS if k in headers}
