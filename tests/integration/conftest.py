"""Fixtures for tests against the simulated gateway on 127.0.0.1."""

from __future__ import annotations

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
