"""A cron job: answer every prompt of a file (one per line) on a thread pool, then report.

    export HOLYSHEEP_API_KEY=sk-...
    python examples/cron_batch.py prompts.txt --workers 8 > answers.tsv

Prints one line per prompt, in file order (``ok``/``FAIL``, node, prompt, answer or
error), then a summary on stderr: calls, errors, latency percentiles, per-node traffic,
tokens and cost. Exits 1 if any prompt failed, so cron reports it. Ctrl-C stops cleanly.
Nodes come from ``--base-url`` (repeatable), else HOLYSHEEP_NODES or HOLYSHEEP_BASE_URL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from holysheep_lb import Client, HolySheepError


def read_prompts(path: str):
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


def make_client(base_urls) -> Client:
    if base_urls:
        return Client(nodes=[{"id": f"node-{i}", "base_url": url} for i, url in enumerate(base_urls)])
    return Client.from_env()


def one_line(text) -> str:
    return " ".join(str(text).split())


def report(client: Client, results, elapsed_s: float) -> None:
    out = sys.stderr
    stats = client.stats()
    failed = sum(isinstance(r, HolySheepError) for r in results)
    lat = stats["latency"]
    print(f"{len(results)} prompts in {elapsed_s:.1f} s: {len(results) - failed} ok, {failed} failed", file=out)
    if lat["count"]:
        print(f"latency p50 {lat['p50_ms']:.0f} ms, p95 {lat['p95_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms",
              file=out)
    for node_id, node in stats["nodes"].items():
        errors = sum(node["failures"].values())
        print(f"  {node_id}: {node['requests']} requests, {node['retries']} retries, {errors} errors", file=out)
    usage = [r.get("usage") or {} for r in results if not isinstance(r, HolySheepError)]
    print(f"tokens: {sum(u.get('prompt_tokens', 0) for u in usage)} prompt, "
          f"{sum(u.get('completion_tokens', 0) for u in usage)} completion", file=out)
    if hasattr(client, "cost_report"):  # spend ledger, when this version of the client has it
        print("cost: " + json.dumps(client.cost_report(), default=str, sort_keys=True), file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts_file")
    parser.add_argument("--model", default="deepseek-v3.2")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--base-url", action="append", help="a node's API root; repeat for more nodes")
    args = parser.parse_args(argv)
    try:
        prompts = read_prompts(args.prompts_file)
    except OSError as exc:
        print(f"cannot read {args.prompts_file}: {exc.strerror}", file=sys.stderr)
        return 2
    requests = [{"messages": [{"role": "user", "content": p}], "model": args.model} for p in prompts]
    step = max(1, len(requests) // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            print(f"... {done}/{total}", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        with make_client(args.base_url) as client:
            results = client.map(requests, max_workers=args.workers, on_progress=progress)
            for prompt, result in zip(prompts, results):
                if isinstance(result, HolySheepError):
                    print(f"FAIL\t-\t{prompt}\t{type(result).__name__}: {one_line(result)}")
                else:
                    print(f"ok\t{result.node_id}\t{prompt}\t{one_line(result.text)}")
            report(client, results, time.monotonic() - started)
    except HolySheepError as exc:  # e.g. a bad setting
        print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: calls not started were cancelled", file=sys.stderr)
        return 130
    return 1 if any(isinstance(r, HolySheepError) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
