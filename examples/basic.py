"""One Client, one question: the answer, and which node gave it after how many attempts.

    export HOLYSHEEP_API_KEY=sk-...
    python examples/basic.py "Say hello in five words"
    python examples/basic.py --base-url https://a.example/v1 --base-url https://b.example/v1 "Hi"

Nodes come from ``--base-url`` (repeatable), else HOLYSHEEP_NODES (JSON) or
HOLYSHEEP_BASE_URL, else the public endpoint.
"""

from __future__ import annotations

import argparse
import sys

from holysheep_lb import Client, HolySheepError


def make_client(base_urls) -> Client:
    if base_urls:
        return Client(nodes=[{"id": f"node-{i}", "base_url": url} for i, url in enumerate(base_urls)])
    return Client.from_env()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Say hello in five words.")
    parser.add_argument("--model", default="deepseek-v3.2")
    parser.add_argument("--base-url", action="append", help="a node's API root; repeat for more nodes")
    args = parser.parse_args(argv)
    try:
        with make_client(args.base_url) as client:
            resp = client.chat_completion([{"role": "user", "content": args.prompt}], model=args.model)
    except HolySheepError as exc:
        print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(resp.text)
    print(f"answered by {resp.node_id} ({resp.region}) in {resp.latency_ms:.0f} ms", file=sys.stderr)
    for attempt in resp.attempts:
        print(f"  attempt: {attempt}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
