"""Cost-aware routing: 200 mixed prompts through ``model="auto"`` vs always ``gpt-4.1``.

Runs on the simulated gateway (loopback, no API key, no cost); token counts are the
gateway's ``usage``. Prints each run's spend, the share of calls per model and the
savings, and returns them as a dict.

    python examples/cost_routing.py [--prompts 200] [--threads 8] [--seed 2026]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from holysheep_lb import Client  # noqa: E402
from holysheep_lb.pricing import DEFAULT_PRICES  # noqa: E402
from holysheep_lb.simulator import SimulatedGateway  # noqa: E402

Call = Tuple[List[Dict[str, str]], Dict[str, Any]]

_COUNTRIES = ["France", "Kenya", "Peru", "Japan", "Norway", "Chile", "Egypt", "Canada"]
_PHRASES = ["good morning", "where is the station", "thank you very much", "see you tomorrow"]
_TOPICS = ["the sky is blue", "bread rises", "tides happen", "ice floats", "leaves change colour"]
_FUNC = ("```python\ndef total(items):\n    s = 0\n    for i in range(len(items)):\n"
         "        s = s + items[i]['price'] * items[i]['qty']\n    return s\n```")
_REPORT = ("Quarterly operations report. Revenue grew in three regions while costs in logistics rose "
           "because of fuel prices and a new warehouse lease. Customer churn fell slightly. ")


def mixed_workload(n: int = 200, seed: int = 2026) -> List[Call]:
    """``n`` chat calls in realistic proportions: most simple, some code, a few long or expert."""
    rng = random.Random(seed)
    kinds = (["trivia"] * 30 + ["translate"] * 15 + ["classify"] * 10 + ["explain"] * 15
             + ["code"] * 15 + ["long_doc"] * 10 + ["expert"] * 5)
    calls: List[Call] = []
    for i in range(n):
        kind = rng.choice(kinds)
        if kind == "trivia":
            calls.append(([{"role": "user", "content": f"What is the capital of {rng.choice(_COUNTRIES)}? ({i})"}],
                          {}))
        elif kind == "translate":
            calls.append(([{"role": "user", "content": f"Translate '{rng.choice(_PHRASES)}' into Spanish. ({i})"}],
                          {"max_tokens": 32}))
        elif kind == "classify":
            calls.append(([{"role": "system", "content": "Answer with one word."},
                           {"role": "user", "content": f"Classify the sentiment of review #{i}: 'arrived late, "
                                                       "but works great'"}], {"max_tokens": 4}))
        elif kind == "explain":
            calls.append(([{"role": "user", "content": f"Explain why {rng.choice(_TOPICS)}, for a curious "
                                                       f"twelve-year-old. ({i})"}], {"max_tokens": 400}))
        elif kind == "code":
            calls.append(([{"role": "user", "content": f"Refactor this function and explain the change ({i}):\n"
                                                       + _FUNC}], {"max_tokens": 800}))
        elif kind == "long_doc":
            doc = _REPORT * rng.randint(60, 120)
            task = rng.choice(["Summarise this report", "Analyse the trade-offs behind the risks in this report"])
            calls.append(([{"role": "user", "content": f"{task} ({i}):\n{doc}"}], {"max_tokens": 600}))
        else:
            calls.append(([{"role": "user", "content": "Prove step by step that the sum of the first n odd "
                                                       f"numbers is n squared, then generalise it. ({i})"}],
                          {"max_tokens": 2000}))
    return calls


def run(gw: SimulatedGateway, model: str, workload: Sequence[Call], threads: int) -> Dict[str, Any]:
    """Send every call with ``model``; the client's cost report, priced against gpt-4.1."""
    with Client(nodes=gw.client_nodes(), health_check_interval_s=None) as client:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda call: client.chat_completion(call[0], model=model, **call[1]), workload))
        return client.cost_report(baseline_model="gpt-4.1")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    workload = mixed_workload(args.prompts, args.seed)
    with SimulatedGateway([{"id": "us", "region": "us"}, {"id": "eu", "region": "eu"}], seed=args.seed) as gw:
        results = {label: run(gw, model, workload, args.threads) for label, model in
                   (("auto", "auto"), ("gpt-4.1", "gpt-4.1"))}
    print(f"{len(workload)} prompts, simulated gateway usage, prices per 1M tokens (input/output): "
          + ", ".join(f"{m} {p.input_usd_per_mtok:.2f}/{p.output_usd_per_mtok:.2f}" for m, p in DEFAULT_PRICES.items()))
    models = list(DEFAULT_PRICES)
    print(f"{'run':<10}{'spend USD':>12}{'in tokens':>11}{'out tokens':>11}  " + "".join(f"{m:>19}" for m in models))
    for label, report in results.items():
        shares = [report["by_model"].get(m, {}).get("share_of_requests", 0.0) for m in models]
        totals = report["totals"]
        print(f"{label:<10}{totals['cost_usd']:>12.6f}{totals['input_tokens']:>11}{totals['output_tokens']:>11}  "
              + "".join(f"{s:>19.1%}" for s in shares))
    auto, fixed = results["auto"]["totals"]["cost_usd"], results["gpt-4.1"]["totals"]["cost_usd"]
    print(f"auto spent {auto / fixed:.1%} of always-gpt-4.1 (saved ${fixed - auto:.6f}); the ledger's own "
          f"estimate of the same tokens at gpt-4.1 prices: saved ${results['auto']['baseline']['savings_usd']:.6f}")
    print("reproduce: python examples/cost_routing.py " + " ".join(
        f"--{k} {v}" for k, v in (("prompts", args.prompts), ("threads", args.threads), ("seed", args.seed))))
    return results


if __name__ == "__main__":
    main()
