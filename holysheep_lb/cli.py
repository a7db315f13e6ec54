"""``holysheep-lb``: the demo, chat, health and bench commands.

    holysheep-lb demo                      simulated 4-region gateway: single node vs balanced
    holysheep-lb chat "Hello" --model M    one call against the configured nodes
    holysheep-lb health                    probe each node's /models
    holysheep-lb bench --plot out.png      compare the routing strategies
    holysheep-lb metrics --simulate        the Prometheus metrics a client exposes

Nodes come from ``HOLYSHEEP_API_KEY`` and ``HOLYSHEEP_NODES``/``HOLYSHEEP_BASE_URL``, or
from ``--config file.json`` (a JSON object of Client options). Every command takes
``--json``. Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._version import __version__
from .client import Client
from .config import API_KEY_ENV, BASE_URL_ENV, NODES_ENV
from .errors import AuthenticationError, ConfigError, HolySheepError
from .health import HealthChecker
from .cli_output import Output, load_rich
from .loadgen import LoadResult, run_load, seed_regions
from .response import Response
from .selection import STRATEGIES
from .simulator import SimulatedGateway

__all__ = ["main", "build_parser"]

log = logging.getLogger(__name__)

SINGLE_NODE_ID = "ap-northeast-1"  # the seed's "single node": heavy tail and ~2% 5xx
SIM_MODEL = "deepseek-v3.2"
SIM_API_KEY = "sk-simulated-gateway"  # never send the user's real key, even to loopback
DEMO_DEFAULTS = {"requests": 3000, "concurrency": 32, "strategy": "adaptive", "seed": 1}
BENCH_DEFAULTS = {"requests": 1000, "concurrency": 32, "seed": 1}
METRICS_SIMULATED_REQUESTS = 20  # calls to the simulator cost nothing; to real nodes they are opt-in
SEED_CLAIMS = ("The seed article claimed p50 142 -> 38 ms, p95 487 -> 89 ms, p99 1,243 -> 156 ms, "
               "850 -> 3,200 req/s, 2.3% -> 0.12% errors; the table above is measured.")


class CLIError(Exception):
    """A problem with the command line or its inputs, shown as one line."""


# -- entry point ---------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 usage, 130 Ctrl-C)."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    out = Output(sys.stdout, sys.stderr, json_mode=args.json, rich=load_rich())
    try:
        return args.handler(args, out)
    except CLIError as exc:
        out.error(str(exc))
    except ConfigError as exc:
        out.error(_missing_key_message() if exc.field == "api_key" and exc.value is None else str(exc))
    except AuthenticationError as exc:
        out.error(f"{type(exc).__name__}: {exc}; check {API_KEY_ENV} (or \"api_key\" in --config)")
    except HolySheepError as exc:
        out.error(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        out.error("interrupted")
        return 130
    return 1


def _missing_key_message() -> str:
    return (f"no API key: set the {API_KEY_ENV} environment variable "
            f"(export {API_KEY_ENV}=sk-...) or put \"api_key\" in the --config file")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log to stderr (-v info, -vv debug)")
    nodes = argparse.ArgumentParser(add_help=False)
    nodes.add_argument("--config", metavar="FILE",
                       help=f"JSON object of Client options (default: {API_KEY_ENV} and "
                            f"{NODES_ENV} or {BASE_URL_ENV} from the environment)")
    load = argparse.ArgumentParser(add_help=False)
    load.add_argument("--concurrency", type=_positive_int, metavar="N", help="caller threads")
    load.add_argument("--seed", type=int, help="random seed of the simulator and the client")

    parser = argparse.ArgumentParser(
        prog="holysheep-lb",
        description="Client-side load balancing and failover for OpenAI-compatible gateways.")
    parser.add_argument("--version", action="version", version=f"holysheep-lb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", parents=[common, load],
                       help="simulated 4-region gateway: one node vs balanced (no key, no network)")
    p.add_argument("--requests", type=_positive_int, metavar="N",
                   help="measured calls per run (after 2 x concurrency warm-up calls)")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), help="strategy of the balanced run")
    p.set_defaults(handler=cmd_demo, **DEMO_DEFAULTS)

    p = sub.add_parser("chat", parents=[common, nodes], help="send one chat completion")
    p.add_argument("prompt", help="the user message ('-' reads it from stdin)")
    p.add_argument("--model", help="model id (default: \"default_model\" from --config)")
    p.add_argument("--system", help="a system message sent before the prompt")
    p.add_argument("--max-tokens", type=_positive_int, metavar="N")
    p.add_argument("--stream", action="store_true", help="print the answer as it arrives")
    p.set_defaults(handler=cmd_chat)

    p = sub.add_parser("health", parents=[common, nodes], help="probe GET /models on every node")
    p.add_argument("--timeout", type=_positive_float, default=5.0, metavar="SECONDS",
                   help="per-node probe timeout (default 5)")
    p.set_defaults(handler=cmd_health)

    p = sub.add_parser("bench", parents=[common, nodes, load],
                       help="compare routing strategies on the simulator or on --config nodes")
    p.add_argument("--requests", type=_positive_int, metavar="N",
                   help="measured calls per strategy (on the simulator after 2 x concurrency warm-up calls)")
    p.add_argument("--strategy", action="append", metavar="NAME",
                   help=f"repeat or comma-separate; default all: {', '.join(STRATEGIES)}")
    p.add_argument("--model", help=f"model id (default {SIM_MODEL} on the simulator)")
    p.add_argument("--max-tokens", type=_positive_int, default=16, metavar="N")
    p.add_argument("--plot", metavar="PNG", help="draw latency CDFs and percentiles (needs matplotlib)")
    p.set_defaults(handler=cmd_bench, **BENCH_DEFAULTS)

    p = sub.add_parser("metrics", parents=[common, nodes],
                       help="print the client's Prometheus metrics, optionally after a few calls")
    p.add_argument("--requests", type=_non_negative_int, metavar="N",
                   help=f"chat calls to send first (default 0; {METRICS_SIMULATED_REQUESTS} with --simulate)")
    p.add_argument("--concurrency", type=_positive_int, default=4, metavar="N", help="caller threads (default 4)")
    p.add_argument("--model", help=f"model id (default: \"default_model\" from --config; {SIM_MODEL} with --simulate)")
    p.add_argument("--simulate", action="store_true",
                   help="use the built-in simulated 4-region gateway (no key, no network)")
    p.set_defaults(handler=cmd_metrics)
    return parser


# -- shared helpers -------------------------------------------------------------------------


def _load_client(args: argparse.Namespace, **defaults: Any) -> Client:
    """A Client from ``--config`` or the environment; the config file wins over ``defaults``."""
    if not args.config:
        return Client.from_env(**defaults)
    try:
        with open(args.config, encoding="utf-8") as fh:
            mapping = json.load(fh)
    except OSError as exc:
        raise CLIError(f"cannot read --config {args.config}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CLIError(f"--config {args.config} is not valid JSON: {exc}") from None
    if not isinstance(mapping, dict):
        raise CLIError(f"--config {args.config} must hold a JSON object of Client options")
    return Client.from_mapping({**defaults, **mapping})


def _model(args: argparse.Namespace, client: Client, default: Optional[str] = None) -> str:
    model = args.model or client.config.default_model or default
    if model is None:
        raise CLIError("no model: pass --model NAME (or set \"default_model\" in the --config file)")
    return model


def _chat_call(client: Client, label: str, model: str,
               max_tokens: Optional[int] = None) -> Callable[[int], Any]:
    params: Dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}

    def call(i: int) -> Any:
        return client.chat_completion([{"role": "user", "content": f"{label}: request {i}"}],
                                      model=model, **params)

    return call


def _drive(client: Client, label: str, out: Output, *, requests: int, concurrency: int,
           model: str, max_tokens: Optional[int] = None,
           warm_up: bool = True) -> Tuple[LoadResult, Dict[str, Any]]:
    """``requests`` chat calls over ``concurrency`` threads with a progress bar.

    ``warm_up`` first sends ``2 × concurrency`` unmeasured calls (connections, first
    latency samples), so each run is measured in its steady state, whatever ran before.
    """
    call = _chat_call(client, label, model, max_tokens)
    if warm_up:
        run_load(call, requests=2 * concurrency, concurrency=concurrency)
    attempts_before = _attempts(client)
    with out.progress(label, requests) as tick:
        result = run_load(call, requests=requests, concurrency=concurrency, label=label,
                          on_progress=tick)
    summary = result.summary()
    attempts = _attempts(client) - attempts_before
    summary["attempts_per_call"] = round(attempts / result.calls, 3) if result.calls else None
    return result, summary


def _attempts(client: Client) -> int:
    return sum(n["requests"] for n in client.stats()["nodes"].values())


def _ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f} ms" if value < 10 else f"{value:,.0f} ms"


def _pct(rate: float) -> str:
    return f"{rate * 100:.2f}%"


def _times(before: Optional[float], after: Optional[float], *, lower_is_better: bool) -> str:
    if not before or not after:
        return "-"
    ratio = before / after if lower_is_better else after / before
    word = ("lower" if lower_is_better else "higher") if ratio >= 1 else "worse"
    return f"{ratio:.1f}x {word}" if ratio >= 1 else f"{1 / ratio:.1f}x {word}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _share(summary: Dict[str, Any], node_id: str) -> str:
    share = summary["node_share"].get(node_id)
    return "-" if share is None else f"{share * 100:.1f}%"


def _sim_client(nodes: List[Dict[str, Any]], *, seed: Optional[int], concurrency: int,
                **options: Any) -> Client:
    return Client(api_key=SIM_API_KEY, nodes=nodes, pool_maxsize=max(32, concurrency),
                  rand=random.Random(seed).random, **options)


# -- demo -------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    """The seed's table, measured on a simulated 4-region gateway: no key, no network."""
    command = (f"holysheep-lb demo --requests {args.requests} --concurrency {args.concurrency} "
               f"--strategy {args.strategy} --seed {args.seed}")
    specs = seed_regions()
    with SimulatedGateway(specs, seed=args.seed) as gateway:
        nodes = gateway.client_nodes()
        runs = [
            ("single node", dict(nodes=[n for n in nodes if n["id"] == SINGLE_NODE_ID], max_retries=0)),
            ("balanced", dict(nodes=nodes, strategy=args.strategy)),
        ]
        summaries = []
        for label, options in runs:
            with _sim_client(seed=args.seed, concurrency=args.concurrency, **options) as client:
                summaries.append(_drive(client, label, out, requests=args.requests,
                                        concurrency=args.concurrency, model=SIM_MODEL)[1])
    single, balanced = summaries
    if out.json_mode:
        out.json({"command": command, "requests": args.requests, "concurrency": args.concurrency,
                  "strategy": args.strategy, "seed": args.seed, "nodes": specs,
                  "single_node": single, "balanced": balanced})
        return 0
    rows = [
        [f"p{q} latency", _ms(single[f"p{q}_ms"]), _ms(balanced[f"p{q}_ms"]),
         _times(single[f"p{q}_ms"], balanced[f"p{q}_ms"], lower_is_better=True)]
        for q in (50, 95, 99)
    ]
    rows.append(["Throughput", f"{single['throughput_rps']:,.0f} req/s",
                 f"{balanced['throughput_rps']:,.0f} req/s",
                 _times(single["throughput_rps"], balanced["throughput_rps"], lower_is_better=False)])
    rows.append(["Errors seen by callers", _pct(single["error_rate"]), _pct(balanced["error_rate"]),
                 "all absorbed" if single["error_rate"] and not balanced["error_rate"]
                 else _times(single["error_rate"], balanced["error_rate"], lower_is_better=True)])
    rows.append(["Attempts per call", f"{single['attempts_per_call']:.3f}",
                 f"{balanced['attempts_per_call']:.3f}", ""])
    out.table(f"{args.requests} calls over {args.concurrency} threads, simulated gateway",
              ["", f"Single node ({SINGLE_NODE_ID})", f"Balanced (4 nodes, {args.strategy})", "Change"],
              rows)
    out.table("Share of answered calls per node", ["Node", "Region", "Single node", "Balanced"],
              [[s["id"], s["region"], _share(single, s["id"]), _share(balanced, s["id"])] for s in specs],
              align="llrr")
    out.line(SEED_CLAIMS)
    out.line(f"Reproduce: {command}")
    return 0


# -- chat -------------------------------------------------------------------------------------


def cmd_chat(args: argparse.Namespace, out: Output) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise CLIError("the prompt is empty")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": prompt})
    params: Dict[str, Any] = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}
    with _load_client(args, health_check_interval_s=None) as client:
        model = _model(args, client)
        if args.stream:
            _print_stream(client.chat_completion(messages, model=model, stream=True, **params), out)
            return 0
        resp = client.chat_completion(messages, model=model, **params)
    assert isinstance(resp, Response)  # for the type checker: not a stream, stream was not asked for
    if out.json_mode:
        latency_ms = None if resp.latency_ms is None else round(resp.latency_ms, 1)
        out.json({"response": dict(resp), "node_id": resp.node_id, "region": resp.region,
                  "model": resp.model, "latency_ms": latency_ms,
                  "request_id": resp.request_id, "attempts": [str(a) for a in resp.attempts]})
        return 0
    out.line(resp.text if resp.text is not None else json.dumps(dict(resp)))
    out.note(f"[{resp.model} via {resp.node_id} ({resp.region}), {len(resp.attempts)} attempt(s), "
             f"{resp.latency_ms:.0f} ms]")
    return 0


def _print_stream(stream: Any, out: Output) -> None:
    """Print each chunk's ``delta.content`` as it arrives (``--json``: one chunk per line)."""
    with stream:
        for chunk in stream:
            if out.json_mode:
                out.json(dict(chunk), indent=None)
                continue
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    out.write(text)
    if not out.json_mode:
        out.write("\n")


# -- health -----------------------------------------------------------------------------------


def cmd_health(args: argparse.Namespace, out: Output) -> int:
    """Probe every node once; exit 1 when any node failed its probe."""
    with _load_client(args, health_check_interval_s=None) as client:
        checker = HealthChecker(client.selector, interval_s=args.timeout, timeout_s=args.timeout,
                                unhealthy_threshold=1, healthy_threshold=1)
        checker.probe_all()
        nodes = client.nodes()
    report = [{"node": n["id"], "region": n["region"], "base_url": n["base_url"],
               "status": "up" if n["last_probe_ok"] else "down",
               "latency_ms": n["probe_latency_ms"] if n["last_probe_ok"] else None,
               "error": n["last_probe_error"]} for n in nodes]
    if out.json_mode:
        out.json({"nodes": report})
    else:
        out.table("GET /models on each node", ["Node", "Region", "Status", "Latency", "Error"],
                  [[r["node"], r["region"], r["status"], _ms(r["latency_ms"]), _clip(r["error"] or "", 60)]
                   for r in report], align="lllrl")
    return 0 if all(r["status"] == "up" for r in report) else 1


# -- bench ------------------------------------------------------------------------------------


def _strategies(values: Optional[List[str]]) -> List[str]:
    if not values:
        return list(STRATEGIES)
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise CLIError(f"unknown strategy {unknown[0] if unknown else '(none)'}; "
                       f"choose from {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def _load_figure() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CLIError("--plot needs matplotlib: pip install 'holysheep-lb[plot]'") from None
    return Figure


def cmd_bench(args: argparse.Namespace, out: Output) -> int:
    """Each strategy on the same nodes, one after another, with the same load."""
    strategies = _strategies(args.strategy)
    figure_class = _load_figure() if args.plot else None  # fail before the long run
    command = (f"holysheep-lb bench --requests {args.requests} --concurrency {args.concurrency} "
               f"--strategy {','.join(strategies)} --seed {args.seed}"
               + (f" --config {args.config}" if args.config else ""))
    results: List[LoadResult] = []
    summaries: List[Dict[str, Any]] = []
    node_ids: List[str] = []

    def run(client: Client, name: str) -> None:
        with client:
            if not node_ids:
                node_ids.extend(n.id for n in client.selector.nodes)
            model = _model(args, client, default=None if args.config else SIM_MODEL)
            result, summary = _drive(client, name, out, requests=args.requests,
                                     concurrency=args.concurrency, model=model,
                                     max_tokens=args.max_tokens, warm_up=not args.config)
        results.append(result)
        summaries.append(summary)

    if args.config:
        for name in strategies:
            run(_load_client(args, strategy=name, pool_maxsize=max(32, args.concurrency)), name)
    else:
        with SimulatedGateway(seed_regions(), seed=args.seed) as gateway:
            for name in strategies:
                run(_sim_client(gateway.client_nodes(), seed=args.seed, concurrency=args.concurrency,
                                strategy=name), name)
    if args.plot:
        _plot(figure_class, args.plot, results)
    if out.json_mode:
        out.json({"command": command, "target": "config" if args.config else "simulator",
                  "requests": args.requests, "concurrency": args.concurrency, "seed": args.seed,
                  "strategies": summaries, "plot": args.plot})
        return 0
    out.table(f"{args.requests} calls per strategy over {args.concurrency} threads, "
              f"{'nodes from --config' if args.config else 'simulated 4-region gateway'}",
              ["Strategy", "p50", "p95", "p99", "Throughput", "Errors", "Attempts/call"],
              [[s["label"], _ms(s["p50_ms"]), _ms(s["p95_ms"]), _ms(s["p99_ms"]),
                f"{s['throughput_rps']:,.0f} req/s", _pct(s["error_rate"]),
                f"{s['attempts_per_call']:.3f}"] for s in summaries])
    out.table("Share of answered calls per node", ["Strategy"] + node_ids,
              [[s["label"]] + [_share(s, n) for n in node_ids] for s in summaries])
    if args.plot:
        out.line(f"Plot written to {args.plot}")
    out.line(f"Reproduce: {command}")
    return 0


def _plot(figure_class: Any, path: str, results: Sequence[LoadResult]) -> None:
    """Latency CDF per strategy (log scale) next to p50/p95/p99 bars, saved as an image."""
    fig = figure_class(figsize=(11, 4.5), layout="constrained")
    cdf, bars = fig.subplots(1, 2)
    width = 0.8 / max(1, len(results))
    for i, result in enumerate(results):
        ordered = sorted(result.latencies_ms)
        if ordered:
            cdf.step(ordered, [(k + 1) / len(ordered) for k in range(len(ordered))], where="post",
                     label=result.label)
        values = [result.pct(q) or 0.0 for q in (50, 95, 99)]
        bars.bar([x + i * width for x in range(3)], values, width, label=result.label)
    cdf.set_xscale("log")
    cdf.set_xlabel("latency seen by callers (ms, log scale)")
    cdf.set_ylabel("share of calls")
    cdf.set_title("Latency CDF")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend()
    bars.set_xticks([x + width * (len(results) - 1) / 2 for x in range(3)], ["p50", "p95", "p99"])
    bars.set_ylabel("ms")
    bars.set_title("Latency percentiles")
    bars.legend()
    try:
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot write --plot {path}: {exc}") from None


# -- metrics ----------------------------------------------------------------------------------


def cmd_metrics(args: argparse.Namespace, out: Output) -> int:
    """The Prometheus text exposition (``--json``: the families as data) of a client,
    after ``--requests`` chat calls."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest

        from .contrib.prometheus import HolySheepCollector, families_as_json
    except ImportError:
        raise CLIError("metrics needs prometheus_client: pip install 'holysheep-lb[prometheus]'") from None
    if args.simulate and args.config:
        raise CLIError("--simulate and --config do not go together: --simulate brings its own nodes")
    requests = args.requests if args.requests is not None else (METRICS_SIMULATED_REQUESTS if args.simulate else 0)

    def measure(client: Client) -> None:
        if requests:
            model = _model(args, client, default=SIM_MODEL if args.simulate else None)
            with out.progress("calls", requests) as tick:
                result = run_load(_chat_call(client, "metrics", model), requests=requests,
                                  concurrency=min(args.concurrency, requests), on_progress=tick)
            if result.errors:
                out.note(f"{sum(result.errors.values())} of {requests} calls failed: "
                         + ", ".join(f"{name} x{n}" for name, n in sorted(result.errors.items())))
        collector = HolySheepCollector(client)
        if out.json_mode:
            out.json({"metrics": families_as_json(collector.collect())})
            return
        registry = CollectorRegistry()
        registry.register(collector)
        out.write(generate_latest(registry).decode("utf-8"))

    if args.simulate:
        with SimulatedGateway(seed_regions(), seed=1) as gateway:
            with _sim_client(gateway.client_nodes(), seed=1, concurrency=args.concurrency,
                             health_check_interval_s=None) as client:
                measure(client)
        return 0
    with _load_client(args, health_check_interval_s=None) as client:
        measure(client)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
