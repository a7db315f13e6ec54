"""The API key never shows: not in logs at any level, reprs, exceptions, stats or CLI output.

Each test captures everything (root logger and ``holysheep_lb`` at DEBUG, stdout and
stderr), drives successes and every kind of failure with a distinctive key, and
searches all of it for the key.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading

import pytest

from holysheep_lb import Client, cli
from holysheep_lb.errors import ConfigError, HolySheepError
from holysheep_lb.health import HealthChecker
from holysheep_lb.simulator import SimulatedGateway

from ..conftest import wait_until
from .scripted_server import ScriptedServer, http_response

SECRET = "sk-HOLYSHEEP-7f3a9c1e52d04b6b-DO-NOT-LEAK"
FRAGMENTS = (SECRET, SECRET[3:], "7f3a9c1e52d04b6b")  # the whole key, without its prefix, its core
MSGS = [{"role": "user", "content": "keep my secret"}]


@pytest.fixture
def everything(caplog):
    """Every log record (root and holysheep_lb at DEBUG) and whatever else a test adds."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="holysheep_lb")
    texts = []
    yield texts
    records = caplog.get_records("call")
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s %(args)s")
    texts.extend(formatter.format(record) for record in records)  # with tracebacks, if any
    assert len(records) >= 3, "hardly anything was logged: the search would prove little"
    _assert_secret_absent(texts)


def _assert_secret_absent(texts):
    for text in texts:
        for fragment in FRAGMENTS:
            assert fragment not in text, f"the API key leaked: ...{text[max(0, text.find(fragment) - 80):][:200]}"


def _describe(*objects):
    return [f"{o!s} {o!r}" for o in objects]


def _exception_texts(exc):
    """str/repr of an error, its args, every attribute it carries, its attempts and their
    errors, and the same of every exception chained to any of them (cause and context)."""
    out = []
    seen = set()
    pending = [exc]
    while pending:
        exc = pending.pop()
        if not isinstance(exc, BaseException) or id(exc) in seen:
            continue
        seen.add(id(exc))
        out += _describe(exc)
        out += [repr(exc.args)] + [repr(v) for v in vars(exc).values()]
        attempts = getattr(exc, "attempts", ())
        out += [str(a) for a in attempts]
        pending += [exc.__cause__, exc.__context__, *exc.args, *(getattr(a, "error", None) for a in attempts),
                    *(v for v in vars(exc).values() if isinstance(v, BaseException))]
    return out


def test_calls_streams_failures_health_and_breakers_never_show_the_key(everything):
    nodes = [{"id": "ok"}, {"id": "err", "error_rate": 1.0}, {"id": "rst", "fault": "reset"},
             {"id": "bad", "fault": "malformed"}, {"id": "slow", "fault": "hang", "hang_s": 5.0},
             {"id": "cut", "stream_fault": "reset_midstream"}, {"id": "lim", "rate_limit_rate": 1.0}]
    with SimulatedGateway(nodes, seed=5) as gw:
        specs = {n["id"]: n for n in gw.client_nodes()}
        caught = []

        def attempt(fn):
            try:
                result = fn()
            except HolySheepError as exc:
                caught.append(exc)
                return None
            everything.extend(_describe(result))
            return result

        client = Client(api_key=SECRET, nodes=list(specs.values()), health_check_interval_s=0.05,
                        health_check_timeout_s=0.3, read_timeout_s=0.5, stream_first_chunk_timeout_s=0.5,
                        node_breakers={"fail_max": 1, "reset_timeout_s": 60}, max_response_bytes=2048,
                        breaker={"fail_max": 1, "reset_timeout_s": 60}, strategy="round_robin")
        with client:
            for i in range(14):
                attempt(lambda: client.chat_completion(MSGS, model=f"m{i % 3}"))
            attempt(lambda: client.embeddings("secret?", model="e"))
            attempt(lambda: client.models())
            for _ in range(4):
                stream = attempt(lambda: client.chat_completion(MSGS, model="m0", stream=True))
                if stream is not None:
                    attempt(lambda: list(stream))  # a rescued cut: StreamRestartedError to a consuming caller
                    attempt(stream.read_text)
                    everything.extend(_describe(stream))
                    everything.append(repr(stream.rescues))
            attempt(lambda: client.chat_completion(MSGS, model="m0", max_tokens=-1))
            attempt(lambda: client.chat_completion(MSGS, model="m0", user=object()))
            big = "x" * 4000  # echoed back: over max_response_bytes
            attempt(lambda: client.chat_completion([{"role": "user", "content": big}], model="m1"))
            assert wait_until(lambda: all(n["last_probe_ago_s"] is not None for n in client.nodes()), 5.0)
            everything.extend([repr(client), str(client), repr(client.config), str(client.config),
                               json.dumps(client.stats(), default=repr), repr(client.nodes()),
                               repr(client.breakers()), json.dumps(client.cost_report(), default=repr)])
            everything.extend(f"{n!r} {n.node!r} {n.transport!r}" for n in client.selector.nodes)
            everything.extend(repr(n) for n in client.config.nodes)
        for exc in caught:
            everything.extend(_exception_texts(exc))
        kinds = {type(e).__name__ for e in caught}
        assert {"CircuitOpenError", "InvalidRequestError"} <= kinds, kinds
        assert {"StreamInterruptedError", "StreamRestartedError"} & kinds, kinds
        failed = {a.kind for e in caught for a in getattr(e, "attempts", ())}
        assert {"timeout", "connect", "invalid_response", "status_5xx"} <= failed, failed

    # the client's own limits: a rate limit and a budget refuse before sending
    with SimulatedGateway([{"id": "ok"}], seed=5) as gw:
        with Client(api_key=SECRET, nodes=gw.client_nodes(), health_check_interval_s=None,
                    requests_per_minute=1, budget={"daily_usd": 1e-9}) as client:
            refused = []
            for call in (lambda: client.chat_completion(MSGS, model="gpt-4.1"),
                         lambda: client.request("GET", "/models"),
                         lambda: client.request("GET", "/models", deadline_s=0.05)):
                try:
                    call()
                except HolySheepError as exc:
                    refused.append(type(exc).__name__)
                    everything.extend(_exception_texts(exc))
            assert refused == ["BudgetExceededError", "RateLimitExceeded"]
            everything.append(json.dumps(client.stats(), default=repr))


def test_config_errors_never_echo_the_key():
    bad_settings = [
        {"api_key": SECRET + "\r\nX-Evil: 1"},
        {"nodes": [{"id": "a", "base_url": "https://a.example/v1", "api_key": SECRET + "\n"}]},
        {"nodes": [{"id": "a", "base_url": "https://a.example/v1", "headers": {"X-Key": SECRET + "\r\n"}}]},
        {"nodes": [{"id": "a", "base_url": "http://gw.example/v1", "api_key": SECRET}]},
        {"nodes": [{"id": "a", "base_url": "http://gw.example/v1"}]},
        {"nodes": [{"id": "a", "base_url": "https://a.example/v1", "weight": -1, "api_key": SECRET}]},
        {"retries": 3},
        {"apikey": SECRET}, {"API_KEY": SECRET}, {"token": SECRET}, {"key": SECRET}, {"apiKey": SECRET},
        {"api_key": [SECRET]}, {"api_key": {"value": SECRET}},
        {"nodes": [{"id": "a", "base_url": "https://a.example/v1", "apikey": SECRET}]},
        {"nodes": [{"id": "a", "base_url": "https://a.example/v1", "headers": [("api-key", SECRET)]}]},
        {"nodes": {"id": "a", "base_url": "https://a.example/v1", "api_key": SECRET}},
        {"nodes": [{"id": "a", "base_url": f"https://user:{SECRET}@a.example/v1"}]},
        {"nodes": [{"id": "a", "base_url": f"https://user:{SECRET}@a.example /v1"}]},
    ]
    texts = []
    for kwargs in bad_settings:
        with pytest.raises(ConfigError) as info:
            Client(**{"api_key": SECRET, "health_check_interval_s": None, **kwargs})
        texts.extend(_exception_texts(info.value))
    _assert_secret_absent(texts)


def test_a_mapping_of_settings_with_a_misspelt_key_never_echoes_it():
    texts = []
    for mapping in ({"apiKey": SECRET}, {"API_KEY": SECRET, "nodes": [{"id": "a", "base_url": "https://a.example/v1"}]},
                    {"api_key": [SECRET]}):
        with pytest.raises(ConfigError) as info:
            Client.from_mapping({"health_check_interval_s": None, **mapping})
        texts.extend(_exception_texts(info.value))
    with pytest.raises(ConfigError) as info:
        Client.from_env({"HOLYSHEEP_BASE_URL": f"https://u:{SECRET}@a.example/v1"})
    texts.extend(_exception_texts(info.value))
    _assert_secret_absent(texts)
    assert any("did you mean `api_key`?" in text for text in texts)


def test_a_server_echoing_the_authorization_header_does_not_leak_the_key(everything):
    def echo(request):
        said = request.headers.get("authorization", "")
        status = 401 if request.path.endswith("/chat/completions") else 503
        return http_response(status, json.dumps({"error": {"message": f"bad key: {said}"}}).encode())

    with ScriptedServer(echo) as server:
        with Client(api_key=SECRET, nodes=[{"id": "echo", "base_url": server.base_url}],
                    health_check_interval_s=None) as client:
            for call in (lambda: client.chat_completion(MSGS, model="m"),
                         lambda: client.chat_completion(MSGS, model="m", stream=True),
                         lambda: client.models()):
                with pytest.raises(HolySheepError) as info:
                    call()
                everything.extend(_exception_texts(info.value))
            checker = HealthChecker(client.selector, interval_s=1.0, timeout_s=1.0, unhealthy_threshold=1,
                                    healthy_threshold=1)
            assert checker.probe(client.selector.nodes[0]) is False
            everything.append(repr(client.nodes()))
        assert server.requests and all(r.headers["authorization"] == f"Bearer {SECRET}" for r in server.requests)
        assert any("[redacted]" in text for text in everything)


def test_the_cli_never_prints_the_key(everything, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("HOLYSHEEP_API_KEY", raising=False)
    monkeypatch.delenv("HOLYSHEEP_NODES", raising=False)
    monkeypatch.delenv("HOLYSHEEP_BASE_URL", raising=False)
    root_handlers = list(logging.getLogger().handlers)
    with SimulatedGateway([{"id": "ok"}, {"id": "down", "fault": "refuse"}], seed=2) as gw:
        good = tmp_path / "good.json"
        good.write_text(json.dumps({"api_key": SECRET, "nodes": gw.client_nodes()}))
        only_down = tmp_path / "down.json"
        only_down.write_text(json.dumps({"api_key": SECRET, "nodes": gw.client_nodes()[1:], "max_retries": 1}))
        bad_key = tmp_path / "bad_key.json"
        bad_key.write_text(json.dumps({"api_key": SECRET + "\r\n", "nodes": gw.client_nodes()}))
        misspelt = tmp_path / "misspelt.json"
        misspelt.write_text(json.dumps({"apikey": SECRET, "nodes": gw.client_nodes()}))
        in_url = tmp_path / "in_url.json"
        in_url.write_text(json.dumps({"nodes": [{"id": "u", "base_url": f"https://user:{SECRET}@gw.example/v1"}]}))
        insecure = tmp_path / "insecure.json"
        insecure.write_text(json.dumps({"api_key": SECRET, "nodes": [{"id": "r", "base_url": "http://gw.example/v1"}]}))
        runs = [
            (["chat", "hello", "--model", "m", "--json", "--config", str(good)], 0),
            (["chat", "hello", "--model", "m", "--json", "--stream", "--config", str(good)], 0),
            (["chat", "hello", "--model", "m", "-vv", "--config", str(good)], 0),
            (["health", "--json", "--config", str(good)], 1),
            (["bench", "--requests", "4", "--concurrency", "2", "--strategy", "round_robin", "--model", "m",
              "--json", "--config", str(good)], 0),
            (["chat", "hello", "--model", "m", "--json", "--config", str(only_down)], 1),
            (["chat", "hello", "--model", "m", "--json", "--config", str(bad_key)], 1),
            (["chat", "hello", "--model", "m", "--json", "--config", str(insecure)], 1),
            (["chat", "hello", "--model", "m", "--json", "--config", str(misspelt)], 1),
            (["health", "--json", "--config", str(in_url)], 1),
            (["chat", "   ", "--model", "m", "--json", "--config", str(good)], 1),
        ]
        try:
            for argv, code in runs:
                assert cli.main(argv) == code, argv
                out, err = capsys.readouterr()
                everything.extend([out, err])
                if "--json" in argv and code == 0:
                    for line in out.splitlines():
                        json.loads(line) if line.startswith("{") and line.endswith("}") else None
            monkeypatch.setenv("HOLYSHEEP_API_KEY", SECRET)
            monkeypatch.setenv("HOLYSHEEP_BASE_URL", "http://gw.example/v1")
            assert cli.main(["chat", "hello", "--model", "m", "--json"]) == 1  # key over plain http: refused
            out, err = capsys.readouterr()
            everything.extend([out, err])
            assert "allow_insecure_http" in err
        finally:
            for handler in logging.getLogger().handlers:
                if handler not in root_handlers:  # -vv's basicConfig, if it installed one
                    logging.getLogger().removeHandler(handler)
    assert any("DEBUG" in text or "hello" in text for text in everything)


def _sse_answer(*events: bytes, status: int = 200, headers=None) -> bytes:
    return http_response(status, b"".join(events), headers={"Content-Type": "text/event-stream", **(headers or {})})


_CHUNK = b'data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "Hi "}}]}\n\n'


def _leaky_stream_script(request):
    """A node echoing the Authorization header in every place a stream can carry an error."""
    said = request.headers.get("authorization", "").encode()
    escaped = json.dumps(said.decode(), ensure_ascii=False).replace("s", "\\u0073").encode()  # JSON-escaped key
    scenario = json.loads(request.body)["messages"][0]["content"]
    message = b'{"error": {"message": "bad key: ' + said + b'"}}'
    return {
        "error event first": _sse_answer(b"event: error\ndata: " + message + b"\n\n"),
        "error object first": _sse_answer(b'data: {"error": {"message": "key ' + said + b'", "code": 401}}\n\n'),
        "escaped error first": _sse_answer(b'data: {"error": {"message": ' + escaped + b'}}\n\n'),
        "error event midway": _sse_answer(_CHUNK, b"event: error\ndata: " + message + b"\n\n"),
        "garbage line first": _sse_answer(b"Authorization: " + said + b"\n\n"),
        "garbage line midway": _sse_answer(_CHUNK, b"Authorization: " + said + b"\n\n"),
        "not json first": _sse_answer(b"data: " + said + b"\n\n"),
        "not json midway": _sse_answer(_CHUNK, b"data: " + said + b"\n\n"),
        "key in the text, then cut": _sse_answer(
            _CHUNK.replace(b"Hi ", said), b"data: {]\n\n"),
        "error status, key in the request id": http_response(
            503, b"busy", headers={"x-request-id": said.decode()}),
        "error status, cut inside the key": http_response(
            500, b"x" * (64 * 1024 - 20) + said, headers={"Content-Type": "text/plain"}),
    }[scenario]


def test_a_node_echoing_the_key_inside_a_stream_does_not_leak_it(everything):
    with ScriptedServer(_leaky_stream_script) as server:
        with Client(api_key=SECRET, nodes=[{"id": "echo", "base_url": server.base_url}], max_retries=0,
                    health_check_interval_s=None, breaker=None, eject_after_failures=1000) as client:
            errors = {}
            for scenario in ("error event first", "error object first", "escaped error first",
                             "error event midway", "garbage line first", "garbage line midway",
                             "not json first", "not json midway", "key in the text, then cut",
                             "error status, key in the request id", "error status, cut inside the key"):
                with pytest.raises(HolySheepError) as info:
                    client.chat_completion([{"role": "user", "content": scenario}], model="m",
                                           stream=True).read_text()
                errors[scenario] = info.value
                everything.extend(_exception_texts(info.value))
    assert {name: type(exc).__name__ for name, exc in errors.items()} == {
        "error event first": "AllAttemptsFailedError", "error object first": "AuthenticationError",
        "escaped error first": "AllAttemptsFailedError", "error event midway": "StreamInterruptedError",
        "garbage line first": "AllAttemptsFailedError", "garbage line midway": "StreamInterruptedError",
        "not json first": "AllAttemptsFailedError", "not json midway": "StreamInterruptedError",
        "key in the text, then cut": "StreamInterruptedError",
        "error status, key in the request id": "AllAttemptsFailedError",
        "error status, cut inside the key": "AllAttemptsFailedError"}
    # the errors still say what happened, with the key blanked out
    assert "[redacted]" in str(errors["error object first"]) and "bad key" in str(errors["error event midway"].__cause__)
    assert errors["key in the text, then cut"].partial_text == "Bearer [redacted]"


def _leaky_framing_script(request):
    """A node that puts the echoed Authorization header where the HTTP framing is parsed."""
    said = request.headers.get("authorization", "").encode()
    if json.loads(request.body or b"{}").get("messages", [{}])[0].get("content") == "status line":
        return said + b" 200 OK\r\nContent-Length: 2\r\n\r\n{}"  # not HTTP: the status line is quoted
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + said + b"\r\n")  # a chunk size that is not a number: quoted too


def test_a_node_echoing_the_key_in_its_http_framing_does_not_leak_it(everything):
    with ScriptedServer(_leaky_framing_script) as server:
        with Client(api_key=SECRET, nodes=[{"id": "echo", "base_url": server.base_url}], max_retries=0,
                    health_check_interval_s=None, breaker=None, eject_after_failures=1000) as client:
            kinds = []
            for content, stream in (("status line", False), ("status line", True), ("chunk", False), ("chunk", True)):
                with pytest.raises(HolySheepError) as info:
                    client.chat_completion([{"role": "user", "content": content}], model="m", stream=stream)
                everything.extend(_exception_texts(info.value))
                kinds.extend(a.kind for a in info.value.attempts)
    assert kinds == ["connect"] * 4


# -- every place a credential can be put ---------------------------------------------------------

# One distinctive secret per place; the middle part (without a recognisable prefix) is searched too.
PLACED = {
    "api_key": "sk-CLIENT-4d1f0b7e9a2c-LEAK",
    "node api_key": "sk-NODE-8e2a6c0f1b3d-LEAK",
    "node header": "hdr-NODE-5b9d3f7a1c0e-LEAK",
    "extra_headers": "xh-CALL-2c6e0a4f8b1d-LEAK",
    "extra_query": "xq-CALL-9f3b7d1e5a2c-LEAK",
    "path query": "pq-CALL-3e7a1c5f9b0d-LEAK",
    "base_url query": "sk-URL-1a5c9e3b7d0f-LEAK",
    "proxy password": "px-PROXY-6d0b4f8a2e1c-LEAK",
}


def _assert_no_placed_secret(texts):
    for place, secret in PLACED.items():
        core = secret.split("-")[2]
        for text in texts:
            for fragment in (secret, core):
                assert fragment not in text, (
                    f"the {place} secret leaked: ...{text[max(0, text.find(fragment) - 120):][:240]}")


@pytest.fixture
def every_record(caplog):
    """Every log record (root, holysheep_lb and urllib3 at DEBUG), formatted with its args and traceback."""
    caplog.set_level(logging.DEBUG)
    for name in ("holysheep_lb", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    texts = []
    yield texts
    records = caplog.get_records("call")
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s %(args)s")
    texts.extend(formatter.format(record) for record in records)
    assert any(r.name.startswith("urllib3") for r in records), "urllib3 logged nothing: the search would prove little"
    _assert_no_placed_secret(texts)


def test_a_url_with_a_key_in_its_query_or_in_place_of_the_url_is_never_echoed():
    key = PLACED["base_url query"]
    bad = {
        f"https://gw.example/v1?api_key={key}": "https://gw.example/v1?<query removed>",
        f"https://gw.example/v1#{key}": "https://gw.example/v1#<fragment removed>",
        f"https://gw.example/v1?api_key={key} ": "https://gw.example/v1?<query removed>",  # and a space
        f"https://u:{key}/x@gw.example/v1": "https://<credentials>@gw.example/v1",  # an unencoded "/"
        f"https://u:{key}@[::1/v1": "https://<credentials>@[::1/v1",
        f"https://gw.example:{key[:5]}/v1?k={key}": "https://gw.example:sk-UR/v1?<query removed>",  # a bad port
        key: "<not a URL>",  # the key passed where the URL goes
        f"u:{key}@gw.example/v1": "<not a URL>",
    }
    texts = []
    for url, shown in bad.items():
        with pytest.raises(ConfigError) as info:
            Client(api_key="sk-other", nodes=[{"id": "a", "base_url": url}], health_check_interval_s=None)
        assert (info.value.field, info.value.value) == ("node[a].base_url", shown), str(info.value)
        # urllib.parse's errors quote the URL: none is kept as the ConfigError's context
        assert info.value.__context__ is None and info.value.__cause__ is None, repr(info.value.__context__)
        texts.extend(_exception_texts(info.value))
    with pytest.raises(ConfigError) as info:
        Client.from_env({"HOLYSHEEP_API_KEY": "sk-other", "HOLYSHEEP_BASE_URL": f"https://gw.example/v1?key={key}"})
    assert "https://gw.example/v1?<query removed>" in str(info.value)
    texts.extend(_exception_texts(info.value))
    _assert_no_placed_secret(texts)


def test_a_header_value_latin1_cannot_encode_is_refused_without_keeping_it_in_a_chained_error():
    euro = PLACED["node header"] + "\u20ac"
    attempts = [
        lambda: Client(api_key=euro, nodes=[{"id": "a", "base_url": "https://a.example/v1"}]),
        lambda: Client(api_key="sk-other", nodes=[{"id": "a", "base_url": "https://a.example/v1",
                                                   "headers": {"X-Key": euro}}]),
        lambda: Client(api_key="sk-other", nodes=[{"id": "a", "base_url": "https://a.example/v1",
                                                   "api_key": euro}]),
        lambda: Client.from_env({"HOLYSHEEP_NODES": '[{"id": "a", "api_key": "%s"' % PLACED["node api_key"]}),
    ]
    texts = []
    for make in attempts:
        with pytest.raises(ConfigError) as info:
            make()
        assert info.value.__context__ is None, repr(info.value.__context__)  # a UnicodeEncodeError quotes the value
        texts.extend(_exception_texts(info.value))
    with Client(api_key="sk-other", nodes=[{"id": "a", "base_url": "http://127.0.0.1:9/v1"}],
                health_check_interval_s=None) as client:
        for kwargs in ({"extra_headers": {"X-Key": PLACED["extra_headers"] + "\u20ac"}},
                       {"extra_query": {"key": PLACED["extra_query"] + "\ud800"}}):
            with pytest.raises(HolySheepError) as info:
                client.chat_completion(MSGS, model="m", **kwargs)
            assert info.value.__context__ is None, repr(info.value.__context__)
            texts.extend(_exception_texts(info.value))
    _assert_no_placed_secret(texts)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_credential_from_any_place_shows_in_errors_logs_stats_or_reprs(every_record):
    """The key, a node's key and headers, a call's extra_headers and extra_query and a
    path's query, against a refused port, a node echoing the whole request with 401 and
    500 (plain and streamed), a node that never answers (timeout) and the health probe."""
    release = threading.Event()

    def echo(request):
        said = json.dumps({"error": {"message": "rejected", "path": request.path, "headers": request.headers}})
        scenario = json.loads(request.body or b"{}").get("messages", [{}])[0].get("content")
        if scenario == "hang":
            release.wait(5.0)  # the client's read timeout (0.3 s) ends the exchange first
            return b""
        status = 401 if scenario == "401" or request.path.startswith("/v1/models") else 500
        return http_response(status, said.encode(), headers={"x-request-id": request.headers.get("x-key", "")})

    node_extras = {"api_key": PLACED["node api_key"], "headers": {"X-Key": PLACED["node header"]}}
    per_call = {"extra_headers": {"X-Call-Key": PLACED["extra_headers"]},
                "extra_query": {"key": PLACED["extra_query"]}}
    caught = []

    def attempt(fn):
        try:
            result = fn()
        except HolySheepError as exc:
            caught.append(exc)
            return
        if hasattr(result, "read_text"):  # a stream whose error comes with its first chunk... or later
            try:
                result.read_text()
            except HolySheepError as exc:
                caught.append(exc)

    with ScriptedServer(echo) as server:
        refused = f"http://127.0.0.1:{_free_port()}/v1"
        everything = []
        try:
            for base_url in (refused, server.base_url):
                client = Client(api_key=PLACED["api_key"], nodes=[{"id": "n", "base_url": base_url, **node_extras}],
                                health_check_interval_s=None, max_retries=0, read_timeout_s=0.3,
                                stream_first_chunk_timeout_s=0.3, breaker=None, eject_after_failures=1000)
                with client:
                    for content in ("401", "500", "hang"):
                        for stream in (False, True):
                            attempt(lambda: client.chat_completion([{"role": "user", "content": content}], model="m",
                                                                   stream=stream, **per_call))
                    attempt(lambda: client.request("GET", f"/models?key={PLACED['path query']}"))
                    attempt(lambda: client.embeddings("x", model="e", **per_call))
                    checker = HealthChecker(client.selector, interval_s=1.0, timeout_s=1.0, unhealthy_threshold=1,
                                            healthy_threshold=1)
                    assert checker.probe(client.selector.nodes[0]) is False
                    everything.extend([repr(client), str(client), repr(client.config), json.dumps(client.stats()),
                                       repr(client.nodes()), repr(client.breakers()),
                                       json.dumps(client.cost_report(), default=repr)])
                    everything.extend(f"{n!r} {n.node!r} {n.transport!r} {n.transport.redactor!r}"
                                      for n in client.selector.nodes)
        finally:
            release.set()
        received = server.requests
    for exc in caught:
        everything.extend(_exception_texts(exc))
    every_record.extend(everything)

    # the test reached what it meant to: every secret was sent, every kind of failure happened
    sent = " ".join(f"{r.path} {json.dumps(r.headers)}" for r in received)
    for place in ("node api_key", "node header", "extra_headers", "extra_query", "path query"):
        assert PLACED[place] in sent, place
    kinds = {a.kind for e in caught for a in getattr(e, "attempts", ())} | {type(e).__name__ for e in caught}
    assert {"connect", "timeout", "status_5xx"} <= kinds and "AuthenticationError" in kinds, kinds
    assert any("?[redacted]" in text for text in everything)  # urllib3's "Max retries exceeded with url: ..."
    assert any('"X-Key": "[redacted]"' in text or "'x-key': '[redacted]'" in text for text in everything)


def test_a_proxys_credentials_never_show(every_record, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    password = PLACED["proxy password"]
    basic = base64.b64encode(f"bob:{password}".encode()).decode()

    def proxy_echo(request):  # a proxy quoting what it was sent, Proxy-Authorization included
        return http_response(407, json.dumps({"error": {"message": "who?", "headers": request.headers}}).encode())

    texts = []
    with ScriptedServer(proxy_echo) as proxy:
        for port in (_free_port(), proxy.port):
            monkeypatch.setenv("HTTP_PROXY", f"http://bob:{password}@127.0.0.1:{port}")
            with Client(api_key=PLACED["api_key"], nodes=[{"id": "n", "base_url": "http://localhost:9/v1"}],
                        health_check_interval_s=None, max_retries=0) as client:
                with pytest.raises(HolySheepError) as info:
                    client.chat_completion(MSGS, model="m")
                texts.extend(_exception_texts(info.value) + [repr(client), json.dumps(client.stats())])
        assert proxy.requests and proxy.requests[0].headers["proxy-authorization"] == f"Basic {basic}"
    every_record.extend(texts)
    for text in texts:
        assert basic not in text
    assert any("Basic [redacted]" in text for text in texts)
