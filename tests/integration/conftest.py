"""Fixtures for tests against the simulated gateway on 127.0.0.1."""

from __future__ import annotations

import os
import shutil

import pytest

from holysheep_lb.simulator import SimulatedGateway


@pytest.fixture
def gateway_factory():
    made = []

    def factory(nodes, **kw) -> SimulatedGateway:
        gw = SimulatedGateway(nodes, seed=kw.pop("seed", 7), **kw).start()
        made.append(gw)
        return gw

    yield factory
    for gw in made:
        gw.stop()


@pytest.fixture
def four_nodes(gateway_factory):
    return gateway_factory([
        {"id": "a", "region": "us-east"},
        {"id": "b", "region": "eu-west"},
        {"id": "c", "region": "ap-southeast"},
        {"id": "d", "region": "ap-northeast"},
    ])


@pytest.fixture(scope="module")
def redis_binary() -> str:
    """The redis-server to start; the Redis tests skip without one, and fail under CI."""
    from tests.redis_server import (
        INSTALL_HINT,  # needs redis-py, which the Redis tests skip without
    )

    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{INSTALL_HINT}. CI is set, so the Redis tests must run, not skip")
        pytest.skip(INSTALL_HINT)
    return binary


@pytest.fixture(scope="module")
def redis_server(redis_binary):
    from tests.redis_server import RedisServer

    with RedisServer(redis_binary) as server:
        yield server
