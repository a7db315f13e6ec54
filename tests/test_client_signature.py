"""Client.__init__ lists every ClientConfig option, with the same type and default: they cannot drift."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from holysheep_lb import Client, ClientConfig, ConfigError

from .conftest import API_KEY

# keyword parameters of Client that are objects the client works with, not ClientConfig options
NOT_OPTIONS = {"retry", "observers", "clock", "sleep", "rand", "wall_clock"}


def _config_fields():
    return {f.name: f for f in dataclasses.fields(ClientConfig) if f.name not in ("nodes", "api_key")}


def _client_params():
    params = inspect.signature(Client.__init__).parameters
    return {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in NOT_OPTIONS}


def test_every_config_option_is_a_keyword_parameter_of_client_and_nothing_else():
    missing = set(_config_fields()) - set(_client_params())
    assert not missing, f"add these ClientConfig options to Client.__init__ (same type and default): {missing}"
    assert set(_client_params()) == set(_config_fields()), "Client.__init__ has options ClientConfig lacks"
    params = inspect.signature(Client.__init__).parameters
    assert list(params)[:3] == ["self", "api_key", "nodes"]
    assert params["api_key"].annotation == "Optional[str]" and params["api_key"].default is None
    assert params["unknown"].kind is inspect.Parameter.VAR_KEYWORD  # refused, with a "did you mean"


def test_each_parameter_has_the_type_and_the_default_of_its_option():
    fields, params = _config_fields(), _client_params()
    for name, f in fields.items():
        p = params[name]
        assert p.annotation == f.type, f"Client.__init__'s {name} must be typed {f.type} as in ClientConfig"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert p.default == default, f"Client.__init__'s {name} must default to {default!r} as in ClientConfig"


def test_the_defaults_build_the_same_config_as_the_dataclass(make_client):
    client = make_client(None, health_check_interval_s=10.0)
    plain = ClientConfig(nodes=client.config.nodes, api_key=API_KEY)
    for name in _config_fields():
        if name == "prices":  # a PriceTable has no ==: the same table, built twice
            assert client.config.prices.models() == plain.prices.models()
        elif name == "model_capabilities":  # nor has a CapabilityTable: the same (empty) user entries
            assert repr(client.config.model_capabilities) == repr(plain.model_capabilities) == "CapabilityTable(user=[])"
        else:
            assert getattr(client.config, name) == getattr(plain, name), name


@pytest.mark.parametrize("given, meant", [
    ("health_check_interval", "health_check_interval_s"),
    ("deadline", "deadline_s"),
    ("maxRetries", "max_retries"),
])
def test_an_unknown_option_names_the_closest_one_and_never_its_value(given, meant):
    with pytest.raises(ConfigError) as info:
        Client(api_key=API_KEY, **{given: "sk-value-never-shown"})
    assert f"did you mean `{meant}`?" in str(info.value) and "sk-value-never-shown" not in str(info.value)


def test_options_given_by_mapping_still_work_and_unknown_keys_still_fail():
    client = Client.from_mapping({"api_key": API_KEY, "max_retries": 1, "health_check_interval_s": None})
    try:
        assert client.config.max_retries == 1
    finally:
        client.close()
    with pytest.raises(ConfigError, match="did you mean `max_retries`"):
        Client.from_mapping({"api_key": API_KEY, "max_retry": 1})
