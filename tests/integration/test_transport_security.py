"""Transport security on loopback: TLS verification, no redirects, capped bodies, closed sockets."""

from __future__ import annotations

import datetime
import functools
import gc
import gzip
import ipaddress
import json
import ssl
import tracemalloc
import zlib

import pytest

from holysheep_lb import Client
from holysheep_lb.config import Node
from holysheep_lb.errors import (
    AllAttemptsFailedError,
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    ConfigError,
    HolySheepError,
    ResponseTooLargeError,
    StreamInterruptedError,
)
from holysheep_lb.simulator import SimulatedGateway
from holysheep_lb.transport import Transport

from ..conftest import API_KEY, thread_count, wait_until
from .scripted_server import ScriptedServer, http_response

MSGS = [{"role": "user", "content": "hi"}]
OK_BODY = json.dumps({"object": "chat.completion", "model": "m",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}).encode()


@pytest.fixture(autouse=True)
def no_ca_from_the_environment(monkeypatch):
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


def _client(nodes, **kw):
    kw.setdefault("health_check_interval_s", None)
    kw.setdefault("max_retries", 0)
    return Client(api_key=API_KEY, nodes=nodes, **kw)


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (its own CA), as PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "holysheep-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=True, encipher_only=False, decipher_only=False), True)
            .add_extension(ski, False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return str(cert_path), context


@pytest.fixture
def tls_server(self_signed):
    with ScriptedServer(http_response(200, OK_BODY), tls=self_signed[1]) as server:
        yield server


def test_tls_verification_is_on_by_default_and_a_self_signed_node_is_a_typed_error(tls_server):
    with _client([{"id": "tls", "base_url": tls_server.base_url}]) as client:
        assert client.config.verify is True
        assert client.selector.nodes[0].transport.session.verify is True
        with pytest.raises(AllAttemptsFailedError) as info:
            client.chat_completion(MSGS, model="m")
    error = info.value.last_error
    assert isinstance(error, APIConnectionError) and not isinstance(error, APIStatusError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error) or "certificate" in str(error).lower()
    assert tls_server.requests == []  # the handshake failed: no request, no key, was sent


def test_a_ca_bundle_makes_the_self_signed_node_trusted(tls_server, self_signed):
    cert_path = self_signed[0]
    with _client([{"id": "tls", "base_url": tls_server.base_url}], verify=cert_path) as client:
        assert client.selector.nodes[0].transport.session.verify == cert_path
        assert client.chat_completion(MSGS, model="m").text == "hi"
    assert tls_server.requests[0].headers["authorization"] == f"Bearer {API_KEY}"


def test_the_environments_ca_bundle_is_used_when_verify_is_left_on(tls_server, self_signed, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", self_signed[0])
    with _client([{"id": "tls", "base_url": tls_server.base_url}]) as client:
        assert client.chat_completion(MSGS, model="m").text == "hi"


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # expected here
def test_verify_false_stays_allowed_for_a_loopback_tls_node(tls_server):
    # the refusal of verify=False is for nodes that are not this machine (tests/test_config.py)
    with _client([{"id": "tls", "base_url": tls_server.base_url}], verify=False) as client:
        assert client.selector.nodes[0].transport.session.verify is False
        assert client.chat_completion(MSGS, model="m").text == "hi"


def test_the_environment_cannot_turn_verification_off(monkeypatch):
    # requests reads REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE only when verify is True, and an
    # empty value falls back to True: verify=False comes from code only, so it is checked once
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "")
    monkeypatch.setenv("CURL_CA_BUNDLE", "")
    with _client([{"id": "remote", "base_url": "https://gw.example/v1"}]) as client:
        assert client.selector.nodes[0].transport.session.verify is True


@pytest.mark.parametrize("verify", ["", 0, None, "/no/such/bundle.pem"])
def test_a_verify_value_that_is_not_true_false_or_a_path_is_refused_before_anything_is_sent(tls_server, verify):
    # verify="" used to switch verification off: the key went to the self-signed node
    with pytest.raises(ConfigError, match="verify"):
        _client([{"id": "tls", "base_url": tls_server.base_url}], verify=verify)
    assert tls_server.requests == []


def test_transport_send_raises_a_typed_tls_error(tls_server):
    transport = Transport(Node(id="tls", base_url=tls_server.base_url), api_key=API_KEY, pool_maxsize=1,
                          max_response_bytes=1 << 20)
    try:
        with pytest.raises(APIConnectionError) as info:
            transport.send("GET", "/models", timeout_s=(2.0, 2.0))
    finally:
        transport.close()
    assert info.value.node_id == "tls"


# -- redirects ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("stream", [False, True])
def test_a_redirect_is_not_followed_so_the_key_never_reaches_the_target(status, stream):
    with ScriptedServer(http_response(200, OK_BODY)) as target:
        location = target.base_url + "/chat/completions"
        with ScriptedServer(http_response(status, b"", headers={"Location": location})) as origin:
            with _client([{"id": "origin", "base_url": origin.base_url}]) as client:
                with pytest.raises(APIStatusError) as info:
                    client.chat_completion(MSGS, model="m", stream=stream)
            assert info.value.status_code == status and not info.value.retryable
            assert len(origin.requests) == 1  # final: not retried either
        assert target.requests == []


# -- response size cap -------------------------------------------------------------------------

CAP = 64 * 1024
HUGE = 24 * 1024 * 1024


def _huge_json(framing):
    body = b'{"pad": "' + b"x" * HUGE + b'"}'
    if framing == "length":
        return http_response(200, body)
    if framing == "chunked":
        piece = b"x" * 65536
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(HUGE // len(piece)))
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks + b"0\r\n\r\n"
    return http_response(200, body, content_length=False)  # the body ends when the connection does


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_a_body_over_max_response_bytes_is_refused_without_reading_it_all(framing):
    with ScriptedServer(_huge_json(framing)) as server:
        with _client([{"id": "big", "base_url": server.base_url}], max_response_bytes=CAP) as client:
            with pytest.raises(AllAttemptsFailedError) as info:
                client.chat_completion(MSGS, model="m")
            assert isinstance(info.value.last_error, ResponseTooLargeError)
            assert client.stats()["in_flight"] == 0
        # the client hung up early: far less than the 24 MiB was ever written to it
        assert wait_until(lambda: server.sent_bytes < HUGE // 2, 5.0), server.sent_bytes


def test_a_body_at_the_cap_is_accepted():
    body = b'{"choices": [], "pad": "' + b"x" * (CAP - 26) + b'"}'
    assert len(body) == CAP
    with ScriptedServer(http_response(200, body, content_length=False)) as server:
        with _client([{"id": "n", "base_url": server.base_url}], max_response_bytes=CAP) as client:
            assert client.chat_completion(MSGS, model="m")["choices"] == []


def test_a_stream_over_the_cap_is_cut_with_a_typed_error():
    chunk = b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"y" * 1000 + b'"}}]}\n\n'
    body = chunk * 200  # ~200 kB, never a [DONE]
    with ScriptedServer(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                        + body) as server:
        with _client([{"id": "n", "base_url": server.base_url}], max_response_bytes=CAP) as client:
            stream = client.chat_completion(MSGS, model="m", stream=True)
            with pytest.raises(StreamInterruptedError) as info:
                stream.read_text()
            assert info.value.reason == "too_large" and 0 < info.value.chunks < 200
            assert client.stats()["in_flight"] == 0


# -- odd statuses and sockets --------------------------------------------------------------------


def test_an_informational_status_is_never_taken_for_an_answer():
    # found by fuzzing: "101" with a JSON body used to come back as a successful response
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(OK_BODY), OK_BODY)
    with ScriptedServer(http_response(101, chunked, headers={"Transfer-Encoding": "chunked"},
                                      content_length=False)) as server:
        with _client([{"id": "n", "base_url": server.base_url}]) as client:
            with pytest.raises(AllAttemptsFailedError) as info:
                client.chat_completion(MSGS, model="m")
    assert isinstance(info.value.last_error, APIResponseValidationError)
    assert info.value.attempts[0].kind == "invalid_response"


def test_close_closes_pooled_connections_even_while_an_error_still_holds_the_pool():
    """urllib3 >= 2.0.3 leaves cleared pools to the garbage collector: a traceback kept
    alive by a reference cycle used to keep every socket of the client open after close()."""
    with SimulatedGateway([{"id": "a", "error_rate": 1.0}, {"id": "b"}], seed=1) as gw:
        baseline = thread_count()  # one simulator thread per open connection
        gc_was_enabled = gc.isenabled()
        gc.disable()  # the collector must not do the job for close()
        try:
            client = _client(gw.client_nodes(), max_retries=1, strategy="round_robin")
            kept = []
            for _ in range(4):
                try:
                    client.chat_completion(MSGS, model="m")
                except Exception as exc:  # noqa: BLE001 - kept on purpose, with its traceback
                    kept.append(exc)
            assert thread_count() > baseline  # keep-alive connections are open
            client.close()
            assert wait_until(lambda: thread_count() == baseline, 5.0), (
                thread_count(), baseline)
        finally:
            if gc_was_enabled:
                gc.enable()


# -- proxies from the environment ---------------------------------------------------------------

PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                   "NO_PROXY", "no_proxy")
LOOPBACK_NODE = {"id": "local", "base_url": "http://127.0.0.1:9/v1"}
REMOTE_HTTPS_NODE = {"id": "remote", "base_url": "https://gw.example/v1"}


@pytest.fixture
def proxy_env(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return set_env


@pytest.mark.parametrize("env", [
    {"HTTP_PROXY": "http://proxy.example:3128"},
    {"http_proxy": "http://proxy.example:3128"},
    {"ALL_PROXY": "http://proxy.example:3128"},
    {"all_proxy": "socks5://proxy.example:1080"},
    {"HTTP_PROXY": "http://proxy.example:3128", "NO_PROXY": "other.example"},
    {"HTTP_PROXY": "proxy.example:3128"},  # no scheme: requests reads http://
])
def test_a_cleartext_proxy_for_an_http_node_is_refused_like_a_cleartext_node(proxy_env, env):
    proxy_env(**env)
    with pytest.raises(ConfigError, match="proxy would see the API key") as info:
        _client([LOOPBACK_NODE])
    assert "local" in str(info.value) and "allow_insecure_http" in str(info.value)
    _client([LOOPBACK_NODE], allow_insecure_http=True).close()


def test_the_refusal_never_shows_the_proxys_credentials(proxy_env):
    proxy_env(HTTP_PROXY="http://bob:hunter2@proxy.example:3128")
    with pytest.raises(ConfigError) as info:
        _client([LOOPBACK_NODE])
    for text in (str(info.value), repr(info.value.value), repr(info.value.args)):
        assert "hunter2" not in text and "bob" not in text
    assert "proxy.example:3128" in str(info.value)


@pytest.mark.parametrize("proxy, shown", [
    ("http://bob:hunter2@[::1", "http://<credentials>@[::1"),  # unreadable: requests would quote it per call
    ("http://bob:hunt/er2@proxy.example:3128/?token=hunter2", "http://<credentials>@proxy.example:3128/?<query "
                                                                "removed>"),
])
def test_an_odd_proxy_url_is_shown_without_its_credentials_or_query(proxy_env, proxy, shown):
    proxy_env(HTTP_PROXY=proxy)
    with pytest.raises(ConfigError) as info:
        _client([LOOPBACK_NODE])
    assert shown in str(info.value)
    for text in (str(info.value), repr(info.value.value), repr(info.value.args), repr(info.value.__context__)):
        assert "hunter2" not in text and "hunt/er2" not in text and "bob" not in text


@pytest.mark.parametrize("env, node", [
    ({"HTTPS_PROXY": "http://proxy.example:3128"}, REMOTE_HTTPS_NODE),  # CONNECT: the key stays inside TLS
    ({"ALL_PROXY": "http://proxy.example:3128"}, REMOTE_HTTPS_NODE),
    ({"HTTP_PROXY": "http://proxy.example:3128", "NO_PROXY": "127.0.0.1"}, LOOPBACK_NODE),
    ({"HTTP_PROXY": "http://localhost:3128"}, LOOPBACK_NODE),
    ({"HTTP_PROXY": "localhost:3128"}, LOOPBACK_NODE),
    ({"HTTP_PROXY": "https://proxy.example:3128"}, LOOPBACK_NODE),  # TLS up to the proxy
])
def test_proxies_that_keep_the_key_off_cleartext_hops_are_accepted(proxy_env, env, node):
    proxy_env(**env)
    _client([node]).close()


def test_a_proxy_sees_no_key_when_there_is_none(proxy_env, monkeypatch):
    monkeypatch.delenv("HOLYSHEEP_API_KEY", raising=False)
    proxy_env(HTTP_PROXY="http://proxy.example:3128")
    Client(nodes=[LOOPBACK_NODE], health_check_interval_s=None).close()


def test_a_loopback_proxy_is_allowed_and_is_the_one_requests_go_through(proxy_env):
    with ScriptedServer(http_response(200, OK_BODY)) as proxy:
        proxy_env(HTTP_PROXY=f"http://127.0.0.1:{proxy.port}")
        with _client([{"id": "n", "base_url": "http://localhost:9/v1"}]) as client:
            assert client.chat_completion(MSGS, model="m").text == "hi"
        assert proxy.requests[0].path == "http://localhost:9/v1/chat/completions"


# -- compressed bodies ---------------------------------------------------------------------------


@functools.cache
def _gzip_bomb(decompressed_bytes: int, layers: int) -> bytes:
    """``decompressed_bytes`` zero bytes gzipped ``layers`` times, built without holding them."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    data = b"".join(packer.compress(block) for _ in range(decompressed_bytes >> 20)) + packer.flush()
    for _ in range(layers - 1):
        data = gzip.compress(data, 9)
    return data


BOMB_BYTES = 64 << 20


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("stream", [False, True])
def test_a_gzip_bomb_never_grows_past_max_response_bytes_in_memory(layers, stream):
    bomb = _gzip_bomb(BOMB_BYTES, layers)
    assert len(bomb) < 128 * 1024
    encoding = ", ".join(["gzip"] * layers)
    content_type = "text/event-stream" if stream else "application/json"
    with ScriptedServer(http_response(200, bomb, headers={"Content-Encoding": encoding,
                                                          "Content-Type": content_type})) as server:
        with _client([{"id": "bomb", "base_url": server.base_url}], max_response_bytes=CAP) as client:
            tracemalloc.start()
            try:
                with pytest.raises(HolySheepError) as info:
                    if stream:
                        client.chat_completion(MSGS, model="m", stream=True).read_text()
                    else:
                        client.chat_completion(MSGS, model="m")
                _, peak_bytes = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert client.stats()["in_flight"] == 0
    error = info.value.last_error if isinstance(info.value, AllAttemptsFailedError) else info.value
    if stream:
        assert isinstance(error, (StreamInterruptedError, APIResponseValidationError)), repr(error)
    else:
        assert isinstance(error, APIResponseValidationError), repr(error)
    assert peak_bytes < 32 * CAP, f"{peak_bytes} bytes held at once for a {CAP}-byte cap"


def test_node_headers_count_as_credentials_for_the_proxy_check(proxy_env, monkeypatch):
    monkeypatch.delenv("HOLYSHEEP_API_KEY", raising=False)
    proxy_env(HTTP_PROXY="http://proxy.example:3128")
    node = {**LOOPBACK_NODE, "headers": {"X-Api-Key": "sk-in-a-header"}}
    with pytest.raises(ConfigError, match="proxy would see the API key") as info:
        Client(nodes=[node], health_check_interval_s=None)
    assert "sk-in-a-header" not in str(info.value)


def test_a_child_whose_environment_adds_a_cleartext_proxy_refuses_to_send(proxy_env):
    client = _client([LOOPBACK_NODE], max_retries=0)
    try:
        proxy_env(HTTP_PROXY="http://proxy.example:3128")  # as if the child's environment said so
        client._reset_after_fork()
        with pytest.raises(ConfigError, match="proxy would see the API key"):
            client.chat_completion([{"role": "user", "content": "hi"}], model="m")
        assert client.stats()["in_flight"] == 0
    finally:
        client.close()
