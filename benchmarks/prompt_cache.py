"""Provider prompt-cache hits by routing strategy, on the simulated gateway.

    python benchmarks/prompt_cache.py [--requests 2000] [--quick] [--json FILE]

4 nodes, each caching 40 prompt prefixes (the simulator's provider-style prompt cache,
OpenAI usage form: ``usage.prompt_tokens_details.cached_tokens``; a hit is answered in
half the time). 16 threads send chat calls drawn at random (seeded: every row sends
the same sequence) from 120 distinct system prompts of ~1,250 tokens (above the 1,024-token
minimum), each with a short user message of its own. 120 prefixes fit in the 160 entries
of the four caches only if each prompt keeps to one node; spread evenly, each node sees
all 120 and keeps the last 40 (a hit rate of about 1/3).

Rows: round_robin, least_connections and adaptive with prompt-cache affinity off
(``affinity=False``: what every strategy did before affinity existed), then the
client's defaults (adaptive + affinity), round_robin + affinity, and the defaults with a
per-call ``affinity_key`` (a row only when ``Client.chat_completion`` has such a
parameter; "n/a" otherwise). Each row gets a fresh gateway (empty caches) and client,
one warm-up pass over the 120 prompts, then the measured calls. The spend columns are
``client.cost_report()``'s: cached tokens are billed at the cached rate and the saving
against the input rate is reported beside.

Targets (default settings): hit rate >= 0.85; no node above 1.25 x the mean number of
calls; p99 no worse than round robin (affinity off); cost_report() shows the cached
tokens and the saving.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _simproc import GatewayProcess  # noqa: E402
from holysheep_lb import Client  # noqa: E402
from holysheep_lb.loadgen import LoadResult, run_load  # noqa: E402

NODES = 4
CACHE_ENTRIES = 40
PROMPTS = 120
THREADS = 16
MODEL = "gpt-4.1"
LATENCY_MS, P99_LATENCY_MS = 150, 400
PROMPT_CHARS = 5000  # ~1,250 tokens at the simulator's 4 characters a token
CHAT_PATH = "/v1/chat/completions"
#: Names a per-call affinity key may take on Client.chat_completion, first match wins.
AFFINITY_PARAMETERS = ("affinity_key", "routing_key")
_WORDS = ("latency", "gateway", "region", "token", "budget", "replica", "cache", "prefix", "stream",
          "breaker", "quota", "failover", "tenant", "invoice", "policy", "schema", "ledger", "probe")


def affinity_parameter() -> Optional[str]:
    """The keyword-only parameter of ``Client.chat_completion`` that carries a per-call
    affinity key, or None. ``**params`` does not count: it would go to the gateway."""
    parameters = inspect.signature(Client.chat_completion).parameters
    for name in AFFINITY_PARAMETERS:
        if name in parameters and parameters[name].kind is inspect.Parameter.KEYWORD_ONLY:
            return name
    return None


def system_prompts(count: int = PROMPTS, seed: int = 11) -> List[str]:
    """``count`` distinct system prompts of PROMPT_CHARS characters each."""
    rng = random.Random(seed)
    prompts = []
    for k in range(count):
        head = f"You are support assistant #{k} of tenant {rng.randrange(10**6)}. Rules follow. "
        words = [head]
        size = len(head)
        while size < PROMPT_CHARS:
            word = rng.choice(_WORDS)
            words.append(word)
            size += len(word) + 1
        prompts.append(" ".join(words)[:PROMPT_CHARS])
    return prompts


def call_plan(count: int, seed: int = 5) -> List[Tuple[int, str]]:
    """(prompt index, user message) for each measured call: uniform over the prompts."""
    rng = random.Random(seed)
    return [(rng.randrange(PROMPTS), f"Question {i}: what about the {rng.choice(_WORDS)}?") for i in range(count)]


class CacheUsage:
    """What the answers' usage says about the cache (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answers = 0
        self.hits = 0
        self.cached_tokens = 0
        self.prompt_tokens = 0

    def add(self, resp: Any) -> None:
        usage = resp.get("usage") or {}
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        with self._lock:
            self.answers += 1
            self.hits += cached > 0
            self.cached_tokens += cached
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)


def run_row(label: str, requests: int, prompts: List[str], plan: List[Tuple[int, str]],
            strategy: Optional[str] = None, affinity: Optional[str] = None,
            client_affinity: Optional[bool] = None) -> Dict[str, Any]:
    """A fresh gateway and client; one warm-up pass over every prompt, then ``requests`` calls."""
    spec = [{"id": f"n{i}", "latency_ms": LATENCY_MS, "p99_latency_ms": P99_LATENCY_MS,
             "prompt_cache_entries": CACHE_ENTRIES, "prompt_cache_usage": "openai"} for i in range(NODES)]
    options: Dict[str, Any] = {} if strategy is None else {"strategy": strategy}
    if client_affinity is not None:
        options["affinity"] = client_affinity
    with GatewayProcess(spec) as gw, Client(nodes=gw.client_nodes, **options) as client:
        usage = CacheUsage()

        def send(prompt_index: int, user: str) -> Any:
            messages = [{"role": "system", "content": prompts[prompt_index]}, {"role": "user", "content": user}]
            extra: Dict[str, Any] = {affinity: f"system-prompt-{prompt_index}"} if affinity else {}
            return client.chat_completion(messages, model=MODEL, **extra)

        warm_order = random.Random(3).sample(range(PROMPTS), PROMPTS)
        run_load(lambda i: send(warm_order[i], "warm-up"), requests=PROMPTS, concurrency=THREADS)
        gw.reset_counts()
        before = client.cost_report()["totals"]

        def measured(i: int) -> Any:
            resp = send(*plan[i])
            usage.add(resp)
            return resp

        result: LoadResult = run_load(measured, requests=requests, concurrency=THREADS, label=label)
        after = client.cost_report()["totals"]
        spend_usd = after["cost_usd"] - before["cost_usd"]
        saved_usd = after["cache_saved_usd"] - before["cache_saved_usd"]
        cached_reported = after["cached_input_tokens"] - before["cached_input_tokens"]
        affinity_stats = client.stats()["affinity"]
        stats = [gw.cache_stats(nd["id"]) for nd in gw.client_nodes]
        calls = [gw.request_count(nd["id"], CHAT_PATH) for nd in gw.client_nodes]
    r = result.summary()
    looked_up = sum(s["hits"] + s["misses"] for s in stats)
    mean_calls = sum(calls) / len(calls)
    r.update(
        hit_rate_gateway=round(sum(s["hits"] for s in stats) / looked_up, 3) if looked_up else 0.0,
        hit_rate_usage=round(usage.hits / usage.answers, 3) if usage.answers else 0.0,
        cached_token_share=round(usage.cached_tokens / usage.prompt_tokens, 3) if usage.prompt_tokens else 0.0,
        calls_per_node=calls, max_over_mean=round(max(calls) / mean_calls, 2) if mean_calls else 0.0,
        spend_usd=round(spend_usd, 4), cache_saved_usd=round(saved_usd, 4),
        cached_tokens_in_cost_report=cached_reported,
        affinity_hit_rate=affinity_stats["hit_rate"] if affinity_stats and affinity_stats["enabled"] else None,
        caller_errors=sum(r["errors"].values()),
    )
    return r


def print_table(rows: List[Dict[str, Any]], missing: List[str], requests: int) -> None:
    print(f"\n## prompt cache: {NODES} nodes x {CACHE_ENTRIES} cached prefixes, {PROMPTS} system prompts "
          f"(~{PROMPT_CHARS // 4} tokens), {THREADS} threads, {requests} calls per row after a warm-up pass\n")
    print("| configuration | hit rate (gateway) | hit rate (usage) | cached tokens | calls/node max/mean "
          "| p50 ms | p99 ms | spend USD (cost_report) | saved by the cache | affinity hit rate | caller errors |")
    print("|" + "---|" * 11)
    for r in rows:
        print(f"| {r['label']} | {r['hit_rate_gateway']:.0%} | {r['hit_rate_usage']:.0%} | "
              f"{r['cached_token_share']:.0%} | {max(r['calls_per_node'])}/"
              f"{sum(r['calls_per_node']) / len(r['calls_per_node']):.0f} = {r['max_over_mean']:.2f} | "
              f"{r['p50_ms']} | {r['p99_ms']} | {r['spend_usd']:.4f} | {r['cache_saved_usd']:.4f} | "
              f"{'-' if r['affinity_hit_rate'] is None else format(r['affinity_hit_rate'], '.0%')} | "
              f"{r['caller_errors']} |")
    for label in missing:
        print(f"| {label} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
    print("\n  spend and saving are client.cost_report()'s: cached tokens billed at the model's cached rate, "
          "the saving against its input rate; affinity hit rate: keyed calls sent to their preferred node")


def main() -> int:
    ap = argparse.ArgumentParser(description="Provider prompt-cache hits by routing strategy")
    ap.add_argument("--requests", type=int, default=2000, help="measured calls per row")
    ap.add_argument("--quick", action="store_true", help="a short run for a smoke test (numbers mean little)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    requests = min(args.requests, 100) if args.quick else args.requests
    prompts = system_prompts()
    plan = call_plan(requests)
    rows = [run_row("round_robin, affinity off", requests, prompts, plan, "round_robin", client_affinity=False),
            run_row("least_connections, affinity off", requests, prompts, plan, "least_connections",
                    client_affinity=False),
            run_row("adaptive, affinity off", requests, prompts, plan, client_affinity=False),
            run_row("defaults (adaptive + affinity)", requests, prompts, plan),
            run_row("round_robin + affinity", requests, prompts, plan, "round_robin")]
    missing = []
    affinity = affinity_parameter()
    if affinity:
        rows.append(run_row(f"default + per-call {affinity}", requests, prompts, plan, affinity=affinity))
    else:
        missing.append(f"per-call affinity key ({' / '.join(AFFINITY_PARAMETERS)}: not supported)")
    print_table(rows, missing, requests)
    by = {r["label"]: r for r in rows}
    default, rr = by["defaults (adaptive + affinity)"], by["round_robin, affinity off"]
    checks = {
        "default settings: hit rate >= 0.85": default["hit_rate_gateway"] >= 0.85,
        "default settings: no node above 1.25 x the mean number of calls": default["max_over_mean"] <= 1.25,
        "default settings: p99 no worse than round_robin": default["p99_ms"] <= rr["p99_ms"],
        "cost_report shows the cached tokens and the saving": default["cached_tokens_in_cost_report"] > 0
        and default["cache_saved_usd"] > 0,
    }
    for check, ok in checks.items():
        print(f"  [{'met' if ok else 'NOT met'}] {check}")
    quick = " --quick" if args.quick else ""
    print(f"  reproduce: python benchmarks/prompt_cache.py --requests {args.requests}{quick}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "not_run": missing, "checks": checks}, fh, indent=2, default=str)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
