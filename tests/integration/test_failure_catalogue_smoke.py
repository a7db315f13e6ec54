"""benchmarks/failure_catalogue.py end to end: two quick scenarios against the simulated gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "failure_catalogue.py"


def run(args: List[str], timeout_s: float = 60.0) -> "subprocess.CompletedProcess[str]":
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def test_two_scenarios_run_end_to_end_and_write_the_scorecard(tmp_path: Path) -> None:
    out = tmp_path / "catalogue.json"
    done = run(["--only", "S03,S10", "--time-scale", "0.1", "--configs", "default", "--json", str(out),
                "--require", "default:fail==0"])
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(out.read_text())
    config = doc["configurations"]["default"]
    rows = {r["id"]: r for r in config["rows"]}
    assert list(rows) == ["S03", "S10"]
    assert sum(config["summary"].values()) == 2 and config["summary"]["fail"] == 0
    # S03: one 500, then the same model again on the same node answers
    assert rows["S03"]["verdict"] == "pass"
    assert (rows["S03"]["metrics"]["attempts_primary"], rows["S03"]["metrics"]["attempts_fallback"]) == (2, 0)
    assert rows["S03"]["metrics"]["wall_log"][0].endswith("-> error_5xx 500")
    # S10: skipped or refused, the broken chunk never reaches the caller as a successful answer
    assert rows["S10"]["verdict"] in ("pass", "safe")
    assert {c["id"]: c["status"] for c in rows["S10"]["checks"]}["no_garbage"] == "pass"
    assert rows["S10"]["metrics"]["alive_after"] is True
    assert doc["time_scale"] == 0.1 and doc["abandoned_calls_still_running"] == 0
    assert "reproduce: python benchmarks/failure_catalogue.py --only S03,S10 --time-scale 0.1" in done.stdout
    assert "totals: pass 2" in done.stdout  # S10: the malformed event is skipped and "requirements met: default:fail==0" in done.stdout


def test_an_unmet_threshold_exits_1_and_says_which() -> None:
    done = run(["--only", "S03", "--time-scale", "0.1", "--configs", "default", "--require", "default:pass==0"])
    assert done.returncode == 1, done.stdout + done.stderr
    assert "requirements not met: default:pass==0 (measured 1)" in done.stdout


def test_harness_errors_exit_2_before_any_scenario_runs() -> None:
    refused = run(["--only", "S03", "--configs", "tuned", "--tuned", '{"read_timeout_s": "soon"}'])
    assert refused.returncode == 2
    assert "configuration 'tuned'" in refused.stderr and "read_timeout_s" in refused.stderr
    assert "totals:" not in refused.stdout  # refused before the first scenario
    unknown = run(["--only", "S03,S99"])
    assert unknown.returncode == 2 and "S99" in unknown.stderr
