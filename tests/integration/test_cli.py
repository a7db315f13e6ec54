"""The ``holysheep-lb`` commands against the simulated gateway, with small numbers."""

from __future__ import annotations

import json
import sys

import pytest

from holysheep_lb import cli

RICH_MODULES = ("rich", "rich.console", "rich.progress", "rich.table")
SEED_NODE_IDS = ["us-east-1", "eu-west-1", "ap-southeast-1", "ap-northeast-1"]


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory([{"id": "a", "region": "us-east"}, {"id": "b", "region": "eu-west"}], seed=3)


@pytest.fixture
def env_nodes(monkeypatch, gateway):
    """Point ``Client.from_env`` at the simulator (loopback needs no API key)."""
    monkeypatch.delenv("HOLYSHEEP_API_KEY", raising=False)
    monkeypatch.delenv("HOLYSHEEP_BASE_URL", raising=False)
    monkeypatch.setenv("HOLYSHEEP_NODES", json.dumps(gateway.client_nodes()))
    return gateway


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- demo ------------------------------------------------------------------------------------


def test_demo_json_measures_single_node_and_balanced(capsys):
    code, out, err = run(["demo", "--requests", "24", "--concurrency", "8", "--json"], capsys)
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["command"] == "holysheep-lb demo --requests 24 --concurrency 8 --strategy adaptive --seed 1"
    assert [n["id"] for n in report["nodes"]] == SEED_NODE_IDS
    single, balanced = report["single_node"], report["balanced"]
    assert single["calls"] == balanced["calls"] == 24
    assert list(single["node_share"]) == ["ap-northeast-1"]  # no balancing, no retries
    assert single["attempts_per_call"] == 1.0
    assert sum(single["errors"].values()) == round(single["error_rate"] * 24)
    assert balanced["error_rate"] == 0.0  # the 5xx are absorbed by failover
    assert set(balanced["node_share"]) <= set(SEED_NODE_IDS)
    assert abs(sum(balanced["node_share"].values()) - 1.0) < 0.01
    for run_ in (single, balanced):
        assert run_["p50_ms"] <= run_["p95_ms"] <= run_["p99_ms"]
        assert run_["throughput_rps"] > 0


@pytest.mark.parametrize("with_rich", [True, False], ids=["rich", "plain"])
def test_demo_prints_the_seed_table_and_the_command(monkeypatch, capsys, with_rich):
    if not with_rich:
        for name in RICH_MODULES:
            monkeypatch.setitem(sys.modules, name, None)
    code, out, err = run(["demo", "--requests", "20", "--concurrency", "10", "--strategy",
                          "least_connections", "--seed", "5"], capsys)
    assert code == 0
    for label in ("p50 latency", "p95 latency", "p99 latency", "Throughput", "Errors seen by callers",
                  "Single node (ap-northeast-1)", "Balanced (4 nodes, least_connections)",
                  "Share of answered calls per node", *SEED_NODE_IDS):
        assert label in out
    assert out.rstrip().splitlines()[-1] == (
        "Reproduce: holysheep-lb demo --requests 20 --concurrency 10 --strategy least_connections --seed 5")
    assert ("┃" in out) is with_rich
    assert "20/20" in err  # progress of both runs went to stderr
    if not with_rich:
        assert "single node  20/20  100%" in err and "balanced  20/20  100%" in err


# -- chat ------------------------------------------------------------------------------------


def test_chat_prints_the_answer(env_nodes, capsys):
    code, out, err = run(["chat", "hello there", "--model", "gpt-4.1"], capsys)
    assert code == 0
    assert out == "[gpt-4.1] Echo: hello there\n"
    assert "1 attempt(s)" in err


def test_chat_json_carries_routing_metadata(env_nodes, capsys):
    env_nodes.configure("a", fault="refuse")
    code, out, _ = run(["chat", "hi", "--model", "m", "--json", "--system", "be brief"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["response"]["choices"][0]["message"]["content"] == "[m] Echo: hi"
    assert report["node_id"] in ("a", "b")
    assert report["attempts"][-1].startswith("b: HTTP 200")


def test_chat_reads_the_prompt_from_stdin_and_the_config_file(gateway, tmp_path, monkeypatch, capsys):
    path = tmp_path / "holysheep.json"
    path.write_text(json.dumps({"nodes": gateway.client_nodes(), "default_model": "deepseek-v3.2"}))
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("from stdin"))
    code, out, _ = run(["chat", "-", "--config", str(path)], capsys)
    assert code == 0
    assert out == "[deepseek-v3.2] Echo: from stdin\n"


def test_chat_when_every_node_is_down_is_one_line(env_nodes, capsys):
    env_nodes.configure("a", fault="refuse")
    env_nodes.configure("b", fault="refuse")
    code, out, err = run(["chat", "hi", "--model", "m"], capsys)
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("holysheep-lb: error: AllAttemptsFailedError: ")


def test_chat_stream_prints_deltas_as_they_arrive(env_nodes, capsys):
    code, out, _ = run(["chat", "one two three", "--model", "gpt-4.1", "--stream"], capsys)
    assert code == 0
    assert out == "[gpt-4.1] Echo: one two three\n"
    code, out, _ = run(["chat", "one two three", "--model", "gpt-4.1", "--stream", "--json"], capsys)
    chunks = [json.loads(line) for line in out.splitlines()]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text == "[gpt-4.1] Echo: one two three"


# -- health ----------------------------------------------------------------------------------


def test_health_table_and_exit_code(env_nodes, capsys):
    code, out, _ = run(["health"], capsys)
    assert code == 0
    assert "GET /models on each node" in out
    assert out.count(" up ") == 2
    assert env_nodes.request_count("a", "/v1/models") == 1
    assert env_nodes.request_count("b", "/v1/models") == 1


def test_health_json_reports_a_down_node_and_exits_1(env_nodes, capsys):
    env_nodes.configure("b", fault="refuse")
    code, out, _ = run(["health", "--json", "--timeout", "2"], capsys)
    assert code == 1
    nodes = {n["node"]: n for n in json.loads(out)["nodes"]}
    assert nodes["a"]["status"] == "up" and nodes["a"]["latency_ms"] > 0 and nodes["a"]["error"] is None
    assert nodes["b"]["status"] == "down" and nodes["b"]["latency_ms"] is None
    assert nodes["b"]["error"].startswith("APIConnectionError")
    assert [nodes["a"]["region"], nodes["b"]["region"]] == ["us-east", "eu-west"]


# -- bench -----------------------------------------------------------------------------------


def test_bench_on_the_simulator_with_a_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    code, out, err = run(["bench", "--requests", "20", "--concurrency", "5", "--strategy",
                          "round_robin,adaptive", "--strategy", "weighted", "--plot", str(png),
                          "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["target"] == "simulator"
    assert [s["label"] for s in report["strategies"]] == ["round_robin", "adaptive", "weighted"]
    assert all(s["calls"] == 20 and s["error_rate"] == 0.0 for s in report["strategies"])
    round_robin = report["strategies"][0]["node_share"]
    assert sorted(round_robin) == sorted(SEED_NODE_IDS)  # a rotation reaches every node
    assert report["command"].endswith("--strategy round_robin,adaptive,weighted --seed 1")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bench_against_configured_nodes_prints_tables(gateway, tmp_path, capsys):
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps({"nodes": gateway.client_nodes()}))
    code, out, _ = run(["bench", "--config", str(path), "--requests", "12", "--concurrency", "3",
                        "--strategy", "least_connections", "--model", "gpt-4.1"], capsys)
    assert code == 0
    assert "nodes from --config" in out
    assert "least_connections" in out and "0.00%" in out
    assert gateway.request_count("a", "/v1/chat/completions") + gateway.request_count(
        "b", "/v1/chat/completions") == 12
    assert out.rstrip().splitlines()[-1].endswith(f"--config {path}")
