"""NodeAdapter: requests' adapter with per-URL memos, on loopback (node_adapter.py)."""

from __future__ import annotations

import json

import requests.adapters

from holysheep_lb import node_adapter
from holysheep_lb.config import Node
from holysheep_lb.node_adapter import NodeAdapter
from holysheep_lb.transport import Transport

from ..conftest import API_KEY
from .scripted_server import ScriptedServer, http_response

OK = http_response(200, json.dumps({"ok": True}).encode(),
                   headers={"Content-Type": "application/json; charset=utf-8", "Set-Cookie": "sid=abc; Path=/",
                            "X-Request-Id": "req-1"})


def _transport(base_url: str) -> Transport:
    return Transport(Node(id="n", base_url=base_url), api_key=API_KEY, pool_maxsize=4, max_response_bytes=1 << 20)


def test_each_url_is_worked_out_once_and_the_request_line_carries_only_the_path():
    with ScriptedServer(OK) as server:
        transport = _transport(server.base_url)
        try:
            for _ in range(3):
                assert transport.send("POST", "/chat/completions", body=b"{}", timeout_s=(2, 2)).data == {"ok": True}
            transport.send("GET", "/models", timeout_s=(2, 2))
            adapter = transport.session.get_adapter(server.base_url)
            assert isinstance(adapter, NodeAdapter)
            assert sorted(url for url, _, _ in adapter._pool_keys) == [server.base_url + "/chat/completions",
                                                                     server.base_url + "/models"]
            assert sorted(adapter._paths.values()) == ["/v1/chat/completions", "/v1/models"]
        finally:
            transport.close()
    assert [r.path for r in server.requests] == ["/v1/chat/completions"] * 3 + ["/v1/models"]
    assert server.requests[0].headers["authorization"] == f"Bearer {API_KEY}"


def test_the_memos_stay_bounded_and_calls_past_the_bound_still_work(monkeypatch):
    monkeypatch.setattr(node_adapter, "_MEMO_LIMIT", 3)
    with ScriptedServer(OK) as server:
        transport = _transport(server.base_url)
        try:
            for k in range(6):
                assert transport.send("GET", f"/p{k}", timeout_s=(2, 2)).data == {"ok": True}
            adapter = transport.session.get_adapter(server.base_url)
            assert len(adapter._pool_keys) == 3 and len(adapter._paths) == 3
        finally:
            transport.close()
    assert [r.path for r in server.requests] == [f"/v1/p{k}" for k in range(6)]


def test_responses_keep_requests_shape_but_no_cookie_is_kept_anywhere():
    with ScriptedServer(OK) as server:
        transport = _transport(server.base_url)
        try:
            response = transport.open("GET", "/models", body=None, headers=None, timeout_s=(2, 2))
            try:
                assert response.status_code == 200 and response.reason == "X"
                assert response.headers["x-request-id"] == "req-1"  # case-insensitive
                assert response.encoding == "utf-8"
                assert response.url == server.base_url + "/models"
                assert response.request.method == "GET"
                assert len(response.cookies) == 0 and len(transport.session.cookies) == 0
            finally:
                response.close()
        finally:
            transport.close()


class _Pool:
    """Stands in for a urllib3 pool: requests' cert_verify only sets attributes on it."""


def test_tls_settings_are_checked_once_per_pool_and_again_when_they_change(monkeypatch):
    calls = []
    original = requests.adapters.HTTPAdapter.cert_verify

    def counting(self, conn, url, verify, cert):
        calls.append((url, verify))
        return original(self, conn, url, verify, cert)

    monkeypatch.setattr(requests.adapters.HTTPAdapter, "cert_verify", counting)
    adapter = NodeAdapter()
    pool, other = _Pool(), _Pool()
    for _ in range(3):
        adapter.cert_verify(pool, "https://h/v1/models", True, None)
    assert len(calls) == 1 and pool.cert_reqs == "CERT_REQUIRED"
    adapter.cert_verify(pool, "https://h/v1/models", False, None)  # settings changed: checked again
    assert len(calls) == 2 and pool.cert_reqs == "CERT_NONE"
    adapter.cert_verify(other, "https://h/v1/models", False, None)  # another pool: its own check
    assert len(calls) == 3
