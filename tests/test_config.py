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


# -- URLs: one normalised form, then every check -------------------------------------------------


@pytest.mark.parametrize("url", ["HTTP://gw.example/v1", "Http://gw.example/v1", "hTTp://GW.EXAMPLE/v1"])
def test_the_cleartext_guard_does_not_depend_on_the_case_of_the_scheme(url):
    with pytest.raises(ConfigError, match="allow_insecure_http"):
        Client(api_key=API_KEY, nodes=[{"id": "a", "base_url": url}], health_check_interval_s=None)


def test_base_urls_are_normalised_to_a_lower_case_scheme_and_host():
    assert Node(id="a", base_url="HTTPS://GW.Example:8443/V1/").base_url == "https://gw.example:8443/V1"
    assert Node(id="a", base_url="HTTP://[::1]:8080/v1").base_url == "http://[::1]:8080/v1"
    assert Node(id="a", base_url="Http://LocalHost:8080/v1").base_url == "http://localhost:8080/v1"


def test_an_upper_case_loopback_url_is_still_loopback(monkeypatch):
    monkeypatch.delenv("HOLYSHEEP_API_KEY", raising=False)
    Client(nodes=[{"id": "a", "base_url": "HTTP://LOCALHOST:1/v1"}], health_check_interval_s=None).close()


@pytest.mark.parametrize("url", ["https://user:hunter2pass@gw.example/v1", "https://:hunter2pass@gw.example/v1",
                                 "HTTPS://user:hunter2pass@GW.example:443/v1", "https://hunter2pass@gw.example/v1",
                                 "https://user:hunter2pass@gw.example /v1"])
def test_credentials_in_a_node_url_are_refused_without_echoing_them(url):
    with pytest.raises(ConfigError, match="credentials in the URL are not allowed") as info:
        Client(api_key=API_KEY, nodes=[{"id": "a", "base_url": url}], health_check_interval_s=None)
    assert "hunter2pass" not in str(info.value) and "hunter2pass" not in repr(info.value.value)
    assert "base_url" in str(info.value)


@pytest.mark.parametrize("url, shown, problem", [
    ("https://gw.example/v1?api_key=sk-live-123", "https://gw.example/v1?<query removed>", "query or fragment"),
    ("https://gw.example/v1#sk-live-123", "https://gw.example/v1#<fragment removed>", "query or fragment"),
    ("https://gw.example/v1?api_key=sk-live-123\n", "https://gw.example/v1?<query removed>", "whitespace"),
    ("ftp://gw.example/v1?api_key=sk-live-123", "ftp://gw.example/v1?<query removed>", "http:// or https://"),
    ("sk-live-123", "<not a URL>", "http:// or https://"),
])
def test_a_refused_base_url_is_quoted_without_its_query_or_fragment(url, shown, problem):
    with pytest.raises(ConfigError, match=problem) as info:
        Node(id="a", base_url=url)
    assert info.value.value == shown and shown in str(info.value)
    assert "sk-live-123" not in str(info.value) and info.value.__context__ is None


@pytest.mark.parametrize("field, node", [
    ("node.id", {**GOOD, "id": "a\nINFO forged log line"}),
    ("node.id", {**GOOD, "id": "a\rb"}),
    ("node.id", {**GOOD, "id": "a\x00b"}),
    ("node.id", {**GOOD, "id": "a\x1b[31mred"}),
    ("node.id", {**GOOD, "id": "a\u2028b"}),
    ("region", {**GOOD, "region": "us-east\n1"}),
    ("region", {**GOOD, "region": "eu\x7f"}),
])
def test_control_characters_in_node_ids_and_regions_are_refused(field, node):
    with pytest.raises(ConfigError, match="control") as info:
        Client(api_key=API_KEY, nodes=[node], health_check_interval_s=None)
    assert field in info.value.field
    assert "\n" not in str(info.value) and "\r" not in str(info.value) and "\x00" not in str(info.value)


def test_printable_ids_and_regions_with_spaces_and_unicode_are_accepted(make_client):
    client = make_client([{**GOOD, "id": "Zürich 1", "region": "eu central"}])
    assert client.nodes()[0]["id"] == "Zürich 1"


@pytest.mark.parametrize("url", ["http://[::1/v1", "https://a.example/v1\x00", "https://a.exa\x1bmple/v1",
                                 "https://a.example:99999/v1", "https://a.example:port/v1"])
def test_malformed_base_urls_are_config_errors(url):
    with pytest.raises(ConfigError, match="base_url"):
        Node(id="a", base_url=url)


@pytest.mark.parametrize("value", ["no", "false", 0, 1, None])
def test_allow_insecure_http_must_be_a_bool(value):
    # "no" is truthy: it would have switched the guard off
    with pytest.raises(ConfigError, match="allow_insecure_http"):
        Client(api_key=API_KEY, nodes=[GOOD], health_check_interval_s=None, allow_insecure_http=value)


# -- verify ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("verify", ["", "   ", "/no/such/ca-bundle.pem", 0, 1, None, b"/etc", ["/etc"]])
def test_verify_accepts_only_true_false_or_an_existing_path(verify):
    with pytest.raises(ConfigError) as info:
        Client(api_key=API_KEY, nodes=[GOOD], health_check_interval_s=None, verify=verify)
    assert info.value.field == "verify"


def test_verify_takes_a_bundle_file_or_directory_as_str_or_pathlike(make_client, tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not checked here")
    for verify in (True, False, str(bundle), bundle, tmp_path):
        client = make_client([LOOPBACK_TLS], verify=verify)  # verify=False is refused for GOOD (below)
        expected = verify if isinstance(verify, bool) else str(verify)
        assert client.config.verify == expected and type(client.config.verify) is type(expected)


LOOPBACK_TLS = {"id": "local", "base_url": "https://127.0.0.1:8443/v1"}
NODE_KEY = "sk-node-only-key-0123456789"
HEADER_SECRET = "gw-header-secret-0123456789"


@pytest.mark.parametrize("client_key, node", [
    (API_KEY, GOOD),  # the client's key
    ("", {**GOOD, "api_key": NODE_KEY}),  # the node's own key only
    ("", {**GOOD, "headers": {"X-Gateway-Key": HEADER_SECRET}}),  # node headers only
])
def test_verify_false_to_a_remote_node_with_credentials_is_refused_without_showing_them(client_key, node):
    # a man in the middle completes an unverified handshake and reads the Authorization header
    with pytest.raises(ConfigError) as info:
        Client(api_key=client_key, nodes=[node], health_check_interval_s=None, verify=False)
    error = info.value
    assert isinstance(error, ValueError) and error.field == "verify" and error.value is False
    text = str(error)
    assert text.startswith("verify:") and "node a (https://a.example/v1)" in text
    assert "verifies no certificate" in text and "CA bundle" in text and "allow_insecure_http=True" in text
    shown = text + repr(error.args) + repr(error.value) + repr(error.allowed)
    for secret in (API_KEY, NODE_KEY, HEADER_SECRET):
        assert secret not in shown


def test_verify_false_names_the_remote_node_among_loopback_ones():
    with pytest.raises(ConfigError, match=r"node a \(https://a\.example/v1\)") as info:
        Client(api_key=API_KEY, nodes=[LOOPBACK_TLS, GOOD], health_check_interval_s=None, verify=False)
    assert info.value.field == "verify"


@pytest.mark.parametrize("nodes, kw", [
    ([GOOD], {"allow_insecure_http": True}),  # accepted on a trusted network
    ([LOOPBACK_TLS], {}),
    ([{"id": "v6", "base_url": "https://[::1]:8443/v1"}, {"id": "name", "base_url": "https://localhost/v1"}], {}),
    ([GOOD], {"api_key": ""}),  # nothing secret is sent
])
def test_verify_false_is_allowed_on_loopback_without_credentials_or_with_allow_insecure_http(make_client, nodes, kw):
    client = make_client(nodes, verify=False, **kw)
    assert client.config.verify is False
    assert all(node.transport.session.verify is False for node in client.selector.nodes)


def test_a_ca_bundle_path_to_a_remote_node_with_the_key_is_allowed(make_client, tmp_path):
    bundle = tmp_path / "private-ca.pem"
    bundle.write_text("not checked here")
    client = make_client([GOOD], verify=str(bundle))
    assert client.selector.nodes[0].transport.session.verify == str(bundle)


# -- unknown options: the closest name, never the value --------------------------------------------


@pytest.mark.parametrize("name, suggestion", [
    ("apikey", "api_key"), ("API_KEY", "api_key"), ("apiKey", "api_key"), ("key", "api_key"),
    ("token", "api_key"), ("health_check_interval", "health_check_interval_s"),
    ("max_retrys", "max_retries"), ("readtimeout", "read_timeout_s"), ("Verify", "verify"),
])
def test_an_unknown_option_names_the_closest_one_and_never_its_value(name, suggestion):
    value = "sk-misspelt-VALUE-9f8e7d"
    with pytest.raises(ConfigError) as info:
        Client(api_key=API_KEY, nodes=[GOOD], health_check_interval_s=None, **{name: value})
    text = str(info.value)
    assert f"did you mean `{suggestion}`?" in text and name in text
    assert value not in text and value not in repr(info.value.args) and info.value.value != value
    assert "connect_timeout_s" not in text or suggestion == "connect_timeout_s"  # no list of every option
    assert len(text) < 200


def test_an_unknown_option_with_nothing_close_points_to_the_documentation():
    with pytest.raises(ConfigError, match="ClientConfig") as info:
        Client(api_key=API_KEY, nodes=[GOOD], health_check_interval_s=None, zzzz=1)
    assert "zzzz" in str(info.value) and len(str(info.value)) < 200


@pytest.mark.parametrize("kwargs, suggestion", [
    ({"nodes": [{**GOOD, "baseurl": "https://b.example/v1"}]}, "base_url"),
    ({"nodes": [{**GOOD, "apikey": "sk-node"}]}, "api_key"),
    ({"breaker": {"failmax": 3}}, "fail_max"),
    ({"node_breakers": {"reset_timeout": 3}}, "reset_timeout_s"),
    ({"model_breakers": {"m": {"success_treshold": 2}}}, "success_threshold"),
    ({"model_rate_limits": {"m": {"request_per_minute": 5}}}, "requests_per_minute"),
    ({"cache": {"max_size": 5}}, "maxsize"),
    ({"cache": {"ttl": 5}}, "ttl_s"),
    ({"budget": {"daily": 5}}, "daily_usd"),
    ({"budget": {"per_model": {"m": {"monthly": 5}}}}, "monthly_usd"),
])
def test_unknown_keys_of_nested_options_name_the_closest_key(kwargs, suggestion):
    kwargs.setdefault("nodes", [GOOD])
    with pytest.raises(ConfigError) as info:
        Client(api_key=API_KEY, health_check_interval_s=None, **kwargs)
    assert f"did you mean `{suggestion}`?" in str(info.value)
    assert "sk-node" not in str(info.value)


@pytest.mark.parametrize("kwargs", [
    {"api_key": [API_KEY]}, {"api_key": (API_KEY,)}, {"api_key": {"key": API_KEY}}, {"api_key": API_KEY.encode()},
    {"nodes": [{**GOOD, "api_key": [API_KEY]}]}, {"nodes": [{**GOOD, "headers": {"api-key": [API_KEY]}}]},
    {"nodes": [{**GOOD, "headers": [("api-key", API_KEY)]}]}, {"nodes": {**GOOD, "api_key": API_KEY}},
])
def test_a_key_of_the_wrong_type_is_never_echoed(kwargs):
    kwargs.setdefault("api_key", "sk-other")
    kwargs.setdefault("nodes", [GOOD])
    with pytest.raises(ConfigError) as info:
        Client(health_check_interval_s=None, **kwargs)
    for text in (str(info.value), repr(info.value.value), repr(info.value.args)):
        assert API_KEY not in text and "SECRET" not in text


def test_from_mapping_with_a_misspelt_key_never_echoes_it():
    with pytest.raises(ConfigError, match="did you mean `api_key`") as info:
        Client.from_mapping({"apiKey": API_KEY, "nodes": [GOOD], "health_check_interval_s": None})
    assert API_KEY not in str(info.value) and info.value.value != API_KEY
    with pytest.raises(ConfigError) as info:
        Client.from_mapping([("api_key", API_KEY)])  # type: ignore[arg-type]
    assert API_KEY not in str(info.value) and API_KEY not in repr(info.value.value)
