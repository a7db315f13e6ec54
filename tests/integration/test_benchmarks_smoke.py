"""The routing benchmarks run end to end at a tiny scale (``--quick``), against 127.0.0.1.

They check that every scenario runs, prints its table, its targets and the command that
reproduces it; whether today's client meets the targets is what the full runs report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(tmp_path: Path, script: str, *args: str) -> Dict[str, Any]:
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json", str(out), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150, check=False)
    # exit 1 = ran, some target not met (normal at this scale); anything else is a crash
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return {"stdout": proc.stdout, "json": json.loads(out.read_text())}


def target_lines(stdout: str) -> List[str]:
    return re.findall(r"^  \[(?:met|NOT met)\] (.+)$", stdout, flags=re.M)


def labels(rows: List[Dict[str, Any]]) -> List[str]:
    return [r["label"] for r in rows]


def test_hang_scenario_measures_each_second_while_a_node_hangs_under_load(tmp_path):
    run = run_benchmark(tmp_path, "strategies.py", "--scenario", "hang")
    rows = run["json"]["hang"]["rows"]
    assert labels(rows) == ["round_robin", "least_connections", "adaptive"]
    for row in rows:
        assert row["hang_window"] != "never"  # the node did hang mid-run
        assert len(row["per_second"]) >= 2 and 0.0 <= row["worst_ratio"]
    assert target_lines(run["stdout"]) == ["adaptive: 0 caller errors",
                                           "adaptive: no second below 90% of the median throughput"]
    assert "reproduce: python benchmarks/strategies.py --requests 2000 --scenario hang --quick" in run["stdout"]


ORACLE = "oracle (threads = capacity)"  # what perfect routing reaches on this machine


def test_capacity_scenario_compares_with_and_without_weights_at_two_latencies(tmp_path):
    run = run_benchmark(tmp_path, "strategies.py", "--scenario", "capacity")
    tables = {}
    for row in run["json"]["capacity"]["rows"]:
        tables.setdefault(row["table"], []).append(row["label"])
        assert row["steady_rps"] > 0
    assert tables == {
        "weights = capacities, 50 ms": [ORACLE, "round_robin", "weighted", "least_connections", "adaptive"],
        "no weights, 50 ms": [ORACLE, "round_robin", "least_connections", "adaptive"],
        "no weights, 200 ms": [ORACLE, "round_robin", "least_connections", "adaptive"],
    }
    targets = target_lines(run["stdout"])
    assert len(targets) == 7 and sum("of the oracle" in t for t in targets) == 3, targets
    for row in run["json"]["capacity"]["rows"]:  # both windows measured, against the ideal and the oracle
        assert row["learning_rps"] > 0 and row["of_oracle"] > 0 and len(row["per_second"]) == 2
    assert "ideal 160 req/s" in run["stdout"] and "ideal 640 req/s" in run["stdout"]


def test_quotas_scenario_counts_the_gateways_own_429s(tmp_path):
    run = run_benchmark(tmp_path, "strategies.py", "--scenario", "quotas")
    rows = run["json"]["quotas"]["rows"]
    assert labels(rows) == ["round_robin, quota headers ignored", "round_robin", "adaptive"]
    for row in rows:
        assert row["offered"] == 30 and row["calls"] == 30
        assert sorted(row["server_429s_by_node"]) == ["q0", "q1", "q2", "q3"]
        assert row["server_429s"] == sum(row["server_429s_by_node"].values())
    assert target_lines(run["stdout"]) == ["adaptive: 0 server-side 429s", "adaptive: 0 caller errors"]


def test_prompt_cache_benchmark_reports_hits_from_the_gateway_and_from_usage(tmp_path):
    run = run_benchmark(tmp_path, "prompt_cache.py")
    rows = run["json"]["rows"]
    assert labels(rows) == ["round_robin, affinity off", "least_connections, affinity off", "adaptive, affinity off",
                            "defaults (adaptive + affinity)", "round_robin + affinity",
                            "default + per-call affinity_key"]
    for row in rows:
        assert 0.0 < row["hit_rate_gateway"] <= 1.0
        assert row["hit_rate_usage"] == pytest.approx(row["hit_rate_gateway"], abs=0.05)
        assert sum(row["calls_per_node"]) >= 100 and row["spend_usd"] > 0 and row["cache_saved_usd"] > 0
        assert row["cached_tokens_in_cost_report"] > 0
    assert len(target_lines(run["stdout"])) == 4
    assert "reproduce: python benchmarks/prompt_cache.py --requests 2000 --quick" in run["stdout"]
