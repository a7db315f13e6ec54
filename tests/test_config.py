import json

import pytest

from holysheep_lb import Client, ConfigError, Node
from holysheep_lb.config import DEFAULT_BASE_URL

from .conftest import API_KEY

GOOD = {"id": "a", "base_url": "https://a.example/v1"}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"nodes": []}, "nodes"),
        ({"nodes": [GOOD, GOOD]}, "nodes"),
        ({"nodes": [{**GOOD, "weight": 0}]}, "weight"),
        ({"nodes": [{**GOOD, "weight": -1}]}, "weight"),
        ({"nodes": [{**GOOD, "base_url": "ftp://a.example/v1"}]}, "base_url"),
        ({"nodes": [{**GOOD, "base_url": "https://a.example /v1"}]}, "base_url"),
        ({"nodes": [{**GOOD, "base_url": "not a url"}]}, "base_url"),
        ({"nodes": [{**GOOD, "headers": {"X-Team": "a\r\nX-Evil: 1"}}]}, "headers"),
        ({"nodes": [{**GOOD, "bogus": 1}]}, "nodes[0]"),
        ({"nodes": [{"id": "a"}]}, "base_url"),
        ({"nodes": [GOOD], "read_timeout_s": -1}, "read_timeout_s"),
        ({"nodes": [GOOD], "connect_timeout_s": 0}, "connect_timeout_s"),
        ({"nodes": [GOOD], "deadline_s": float("nan")}, "deadline_s"),
        ({"nodes": [GOOD], "max_retries": -1}, "max_retries"),
        ({"nodes": [GOOD], "pool_maxsize": 0}, "pool_maxsize"),
        ({"nodes": [GOOD], "strategy": "fastest"}, "strategy"),
        ({"nodes": [GOOD], "no_such_option": 1}, "no_such_option"),
        ({"nodes": "https://a.example/v1"}, "nodes"),
    ],
)
def test_invalid_settings_raise_config_error_naming_the_field(kwargs, field):
    kwargs.setdefault("api_key", API_KEY)
    kwargs.setdefault("health_check_interval_s", None)
    with pytest.raises(ConfigError) as info:
        Client(**kwargs)
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)
    assert API_KEY not in str(info.value)


def test_node_is_frozen_and_hides_its_key():
    node = Node(id="a", base_url="https://a.example/v1/", api_key="sk-node-secret", headers={"X-A": "1"})
    assert node.base_url == "https://a.example/v1"  # trailing slash dropped
    assert "sk-node-secret" not in repr(node)
    with pytest.raises(Exception):
        node.weight = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        node.headers["X-B"] = "2"  # type: ignore[index]
    assert hash(node) == hash(Node(id="a", base_url="https://a.example/v1"))


def test_default_node_is_the_public_endpoint(make_client):
    client = make_client()
    assert [n["base_url"] for n in client.nodes()] == [DEFAULT_BASE_URL]


def test_missing_api_key_for_remote_node_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("HOLYSHEEP_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="HOLYSHEEP_API_KEY"):
        Client(nodes=[GOOD], health_check_interval_s=None)


def test_loopback_nodes_need_no_key(monkeypatch):
    monkeypatch.delenv("HOLYSHEEP_API_KEY", raising=False)
    Client(nodes=[{"id": "a", "base_url": "http://127.0.0.1:1/v1"}], health_check_interval_s=None).close()


def test_key_over_plain_http_to_remote_host_is_refused():
    with pytest.raises(ConfigError, match="allow_insecure_http"):
        Client(api_key=API_KEY, nodes=[{"id": "a", "base_url": "http://gw.example/v1"}],
               health_check_interval_s=None)
    Client(api_key=API_KEY, nodes=[{"id": "a", "base_url": "http://gw.example/v1"}],
           health_check_interval_s=None, allow_insecure_http=True).close()


def test_from_env_reads_key_and_nodes_json():
    env = {
        "HOLYSHEEP_API_KEY": API_KEY,
        "HOLYSHEEP_NODES": json.dumps([{"id": "us", "region": "us-east", "base_url": "https://us.example/v1"},
                                       {"id": "eu", "region": "eu-west", "base_url": "https://eu.example/v1",
                                        "weight": 2}]),
    }
    with Client.from_env(env, health_check_interval_s=None) as client:
        assert [(n["id"], n["region"], n["weight"]) for n in client.nodes()] == [
            ("us", "us-east", 1.0), ("eu", "eu-west", 2.0)]
        assert client.config.api_key == API_KEY


def test_from_env_base_url_and_bad_json():
    with Client.from_env({"HOLYSHEEP_API_KEY": API_KEY, "HOLYSHEEP_BASE_URL": "https://x.example/v1"},
                         health_check_interval_s=None) as client:
        assert client.nodes()[0]["base_url"] == "https://x.example/v1"
    with pytest.raises(ConfigError, match="HOLYSHEEP_NODES"):
        Client.from_env({"HOLYSHEEP_API_KEY": API_KEY, "HOLYSHEEP_NODES": "[{oops"})


def test_from_mapping_like_django_settings():
    settings = {"api_key": API_KEY, "nodes": [GOOD], "strategy": "round_robin", "max_retries": 1,
                "health_check_interval_s": None}
    with Client.from_mapping(settings) as client:
        assert client.config.max_retries == 1
    with pytest.raises(ConfigError, match="max_retrys"):
        Client.from_mapping({**settings, "max_retrys": 2})


@pytest.mark.parametrize("kwargs", [
    {"api_key": API_KEY + "\n"},
    {"api_key": API_KEY + "\u00e9\u4e2d"},
    {"nodes": [{**GOOD, "api_key": API_KEY + "\r\n"}]},
    {"nodes": [{**GOOD, "headers": {"api-key": API_KEY + "\n"}}]},
])
def test_config_errors_never_echo_secrets(kwargs):
    kwargs.setdefault("api_key", "sk-other")
    kwargs.setdefault("nodes", [GOOD])
    with pytest.raises(ConfigError) as info:
        Client(health_check_interval_s=None, **kwargs)
    assert API_KEY not in str(info.value) and "<redacted>" in str(info.value)


def test_bad_nodes_json_is_not_echoed():
    raw = '[{"id": "a", "base_url": "https://a.example/v1", "api_key": "%s"' % API_KEY  # truncated JSON
    with pytest.raises(ConfigError, match="HOLYSHEEP_NODES") as info:
        Client.from_env({"HOLYSHEEP_NODES": raw})
    assert API_KEY not in str(info.value)


def test_node_headers_stay_out_of_reprs(make_client):
    client = make_client([{**GOOD, "headers": {"api-key": "azure-secret-123"}}])
    assert "azure-secret-123" not in repr(client.config) and "azure-secret-123" not in repr(client)
