"""The 16 Failover Bench scenarios run against holysheep_lb on the simulated gateway: a scorecard.

Each scenario gets a fresh one-node gateway serving the catalogue's models and a fresh
Client configured with the scenario's fallback (``fallbacks={primary: [fb-ok]}``; S14:
``fb-ok-noprefill``). The call is a stream, consumed as a caller would (iterate the
chunks, join the delta contents, catch every exception), on a worker thread abandoned at
the scenario's ``max_wall_s``: a hang is a result, and the harness never hangs. The
gateway's request log gives the provider's view; a healthy ``fb-ok`` call through the
same client afterwards gives ``alive_after``. S15 sends its sequence (20 requests 4 s
apart across a 60 s outage; ``--fast``: the catalogue's fast sequence). Scoring lives in
``_failure_scoring.py`` (catalogue, check kinds, verdict rules).

Two configurations, one row each:

* ``default``: as a new user would configure it: one node, one fallback model,
  ``read_timeout_s=30``, ``max_retries=2``, everything else the library's default;
* ``tuned``: the default plus ``TUNED_PRESET`` (or ``--tuned '{"option": value}'``).

``--time-scale X`` multiplies the fault durations (hang, slow first token, stall, outage,
sequence interval), the thresholds and wall caps bound to them, and every duration
option of the client (timeouts, deadline, breaker reset, ejection, health-check interval);
Retry-After (2 s), backoff, the no-hammer windows and chunk pacing (15 ms) stay real.
A published figure is a run at 1.0 (about 5 minutes per configuration).

    python benchmarks/failure_catalogue.py [--only S06,S07] [--time-scale 0.1] [--fast]
        [--configs default,tuned] [--tuned '{"read_timeout_s": 10}'] [--json out.json]
        [--require "default:pass>=13,fail==0"]

Exit status: 0, also when scenarios fail; 1 when a --require threshold is unmet;
2 on a harness error (bad arguments, a client option the Client refuses, a crash).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from _failure_scoring import (  # noqa: E402
    CATALOGUE_SOURCE,
    METHODOLOGY_VERSION,
    SUCCESS,
    CallResult,
    CheckResult,
    Metrics,
    Scenario,
    SeqItem,
    is_complete,
    measure,
    measure_sequence,
    parse_requirements,
    score,
    select,
    summarise,
    unmet,
)

from holysheep_lb import Client, HolySheepError, Response, StreamRestartedError, __version__  # noqa: E402
from holysheep_lb.config import BreakerSettings, ClientConfig  # noqa: E402
from holysheep_lb.simulator import SimModel, SimNode, SimulatedGateway, failover_bench_models, reply_text  # noqa: E402
from holysheep_lb.simulator.catalogue import PROMPT  # noqa: E402

MESSAGES: List[Dict[str, str]] = [{"role": "user", "content": PROMPT}]
#: A new user's configuration: one node, one fallback (set per scenario), these two options.
DEFAULT_OPTIONS: Dict[str, Any] = {"read_timeout_s": 30.0, "max_retries": 2}
#: Options added to the default for the tuned row: a 10 s time-to-first-token limit, the
#: knowledge that the simulator's healthy model continues an assistant prefill, and a
#: larger-context model for the one whose context window S12 overflows.
TUNED_PRESET: Dict[str, Any] = {"first_token_timeout_s": 10.0, "model_capabilities": {"fb-ok": {"prefill": True}},
                                "context_window_fallbacks": {"fb-s12-context-length": ["fb-ok"]}}
#: Client options that are durations and follow --time-scale.
SCALED_OPTIONS = ("connect_timeout_s", "read_timeout_s", "deadline_s", "stream_first_chunk_timeout_s",
                  "first_token_timeout_s",
                  "stream_stall_timeout_s", "ejection_base_s", "ejection_max_s", "slow_start_s",
                  "health_check_interval_s", "health_check_timeout_s", "hedge_delay_s")
#: Set by the harness for every scenario, so not accepted in a configuration.
HARNESS_OPTIONS = frozenset({"nodes", "fallbacks", "api_key", "clock", "sleep", "rand", "wall_clock"})
TIMED_FAULTS = ("hang", "slow_first_token", "stream_stall", "flap")
CHUNK_DELAY_MS = 15.0  # the benchmark's pacing between tokens
ALIVE_MAX_WALL_S = 10.0
STOP_TIMEOUT_S = 5.0  # bounds the gateway's shutdown and the wait for abandoned calls


class HarnessError(Exception):
    """The harness itself could not run (not a scenario's failure)."""


# -- configurations -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Configuration:
    name: str
    options: Dict[str, Any]  # as given, before scaling
    note: str


def configurations(names: Sequence[str], tuned_json: Optional[str]) -> List[Configuration]:
    """The configurations to run, in order; the tuned row says when it equals the default."""
    tuned = TUNED_PRESET if tuned_json is None else _parse_options(tuned_json)
    known = {
        "default": Configuration("default", dict(DEFAULT_OPTIONS),
                                 "a new user's setup: one node, a fallback model, read_timeout_s=30, max_retries=2"),
        "tuned": Configuration("tuned", {**DEFAULT_OPTIONS, **tuned}, (
            f"--tuned {json.dumps(tuned, sort_keys=True)}" if tuned_json is not None
            else "built-in preset" if tuned else
            "built-in preset, empty today: identical to the default configuration")),
    }
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise HarnessError(f"--configs: unknown configuration(s) {', '.join(unknown) or '(none)'}; "
                           f"known: {', '.join(known)}")
    return [known[n] for n in names]


def _parse_options(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise HarnessError(f"--tuned: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise HarnessError(f"--tuned: must be a JSON object of Client options, got {type(value).__name__}")
    reserved = sorted(HARNESS_OPTIONS & set(value))
    if reserved:
        raise HarnessError(f"--tuned: {', '.join(reserved)} cannot be set: the harness sets them per scenario")
    return value


def scaled_options(options: Mapping[str, Any], factor: float) -> Dict[str, Any]:
    """``options`` with every duration (given or the library's default) times ``factor``."""
    if factor == 1.0:
        return dict(options)
    defaults = {f.name: f.default for f in dataclasses.fields(ClientConfig)}
    out = dict(options)
    for name in SCALED_OPTIONS:
        value = options.get(name, defaults[name])
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value * factor
    breaker = options.get("breaker", defaults["breaker"])
    settings = BreakerSettings.from_value("breaker", breaker)
    if settings is not None:
        out["breaker"] = {**dataclasses.asdict(settings), "reset_timeout_s": settings.reset_timeout_s * factor}
    return out


def validate(config: Configuration, factor: float) -> None:
    """Build (and close) a Client from the configuration: a refused option is a harness error."""
    node = {"id": "check", "base_url": "http://127.0.0.1:9/v1"}
    options = {**scaled_options(config.options, factor), "health_check_interval_s": None}
    try:
        Client(nodes=[node], fallbacks={"a": ["b"]}, **options).close()
    except (HolySheepError, TypeError, ValueError) as exc:
        raise HarnessError(f"configuration {config.name!r}: {exc}") from None


# -- one call, as a caller makes it -------------------------------------------------------------------


class Abandoned:
    """Worker threads of calls abandoned at their wall cap; joined (bounded) at the end."""

    def __init__(self) -> None:
        self.threads: List[threading.Thread] = []

    def join(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` in all; return how many are still running."""
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.threads = [t for t in self.threads if t.is_alive()]
        return len(self.threads)


def guarded(call: Callable[[], CallResult], max_wall_s: float, abandoned: Abandoned) -> CallResult:
    """Run ``call`` on a daemon thread; past ``max_wall_s`` it is a hang and the thread is left behind."""
    box: List[CallResult] = []
    done = threading.Event()
    started = time.monotonic()

    def work() -> None:
        try:
            box.append(call())
        finally:
            done.set()

    worker = threading.Thread(target=work, name="failure-catalogue-call", daemon=True)
    worker.start()
    if not done.wait(max_wall_s):
        abandoned.threads.append(worker)
        return CallResult("hang", time.monotonic() - started, error=f"no result within {max_wall_s:g}s")
    if not box:  # call() catches Exception; only a BaseException gets here
        return CallResult("error", time.monotonic() - started, error="the call ended without a result", clean=False)
    return box[0]


def _failure(exc: Exception, started: float, content: str) -> CallResult:
    return CallResult("error", time.monotonic() - started, content=content,
                      error=f"{type(exc).__name__}: {exc}"[:300], clean=isinstance(exc, HolySheepError))


def stream_call(client: Client, model: str) -> CallResult:
    """One streamed chat completion, read to its end: the caller's view."""
    started = time.monotonic()
    parts: List[str] = []
    reported: Optional[str] = None
    usage: Optional[Dict[str, Any]] = None
    try:
        stream = client.chat_completion(MESSAGES, model=model, stream=True)
        if isinstance(stream, Response):
            return CallResult("error", time.monotonic() - started, clean=False,
                              error="stream=True returned a Response, not a stream")
        try:
            chunk: Dict[str, Any]
            for _restart in range(10):  # the documented protocol: a restart discards what was read
                try:
                    for chunk in stream:
                        if isinstance(chunk.get("model"), str) and chunk["model"]:
                            reported = chunk["model"]
                        if isinstance(chunk.get("usage"), dict):
                            usage = dict(chunk["usage"])
                        for choice in chunk.get("choices") or ():
                            delta = choice.get("delta") if isinstance(choice, dict) else None
                            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                                parts.append(delta["content"])
                    break
                except StreamRestartedError:
                    parts, reported, usage = [], None, None
        finally:
            stream.close()
    except Exception as exc:  # the caller's view: every failure is a finding
        return _failure(exc, started, "".join(parts))
    return CallResult(SUCCESS, time.monotonic() - started, content="".join(parts), reported_model=reported,
                      usage=usage)


def plain_call(client: Client, model: str) -> CallResult:
    """One non-streamed chat completion (the alive probe)."""
    started = time.monotonic()
    try:
        resp = client.chat_completion(MESSAGES, model=model)
        if not isinstance(resp, Response):
            return CallResult("error", time.monotonic() - started, clean=False, error="a stream, not a Response")
        content = resp["choices"][0]["message"]["content"] or ""
    except Exception as exc:
        return _failure(exc, started, "")
    return CallResult(SUCCESS, time.monotonic() - started, content=content, reported_model=resp.get("model"))


# -- scenarios --------------------------------------------------------------------------------------


def gateway_models(factor: float, *, fast: bool) -> Dict[str, SimModel]:
    """The catalogue's models with their fault durations times ``factor``."""
    return {name: dataclasses.replace(m, fault_duration_s=m.fault_duration_s * factor)
            if m.fault in TIMED_FAULTS else m for name, m in failover_bench_models(fast=fast).items()}


def canonical(sc: Scenario) -> Tuple[str, str]:
    return reply_text(sc.model, MESSAGES), reply_text(sc.fallback_model, MESSAGES)


def run_scenario(sc: Scenario, options: Mapping[str, Any], models: Mapping[str, SimModel],
                 abandoned: Abandoned) -> Metrics:
    """Run one scenario on a fresh gateway and client; the metrics of both views."""
    gw = SimulatedGateway([SimNode("fb", chunk_delay_ms=CHUNK_DELAY_MS)], models=dict(models), seed=0).start()
    client: Optional[Client] = None
    try:
        client = Client(nodes=gw.client_nodes(), fallbacks={sc.model: [sc.fallback_model]}, **options)
        bound = client
        gw.reset_counts()  # arms the faults (S15's outage starts now)
        if sc.sequence is None:
            result = guarded(lambda: stream_call(bound, sc.model), sc.max_wall_s, abandoned)
            m = measure(sc, result, gw.request_log(), canonical(sc))
        else:
            m = _run_sequence(sc, bound, gw, models[sc.model].fault_duration_s, abandoned)
        alive = guarded(lambda: plain_call(bound, "fb-ok"), ALIVE_MAX_WALL_S, abandoned)
        m.alive_after = alive.outcome == SUCCESS and is_complete(alive.content, [reply_text("fb-ok", MESSAGES)])
        m.alive_error = None if m.alive_after else (alive.error or "the answer was not the canonical text")
        return m
    finally:
        gw.stop(timeout_s=STOP_TIMEOUT_S)  # releases held requests, so abandoned calls end
        if client is not None:
            client.close()


def _run_sequence(sc: Scenario, client: Client, gw: SimulatedGateway, down_s: float,
                  abandoned: Abandoned) -> Metrics:
    assert sc.sequence is not None
    seq = sc.sequence
    texts = canonical(sc)
    t0 = time.monotonic()
    items: List[SeqItem] = []
    for i in range(seq.count):
        wait_s = t0 + i * seq.interval_s - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)  # the sequence's pace is part of the scenario
        sent_s = time.monotonic() - t0
        cap_s = min(seq.per_request_max_wall_s, sc.max_wall_s - sent_s)
        if cap_s <= 0:  # the scenario's own cap ran out: an unsent request counts as a hang
            result = CallResult("hang", 0.0, error=f"not sent: the scenario's {sc.max_wall_s:g}s ran out")
        else:
            result = guarded(lambda: stream_call(client, sc.model), cap_s, abandoned)
        items.append(SeqItem(i, sent_s, result, is_complete(result.content, texts)))
    return measure_sequence(sc, items, gw.request_log(), texts, down_s=down_s, elapsed_s=time.monotonic() - t0)


# -- output -----------------------------------------------------------------------------------------


def _failed(checks: Sequence[CheckResult]) -> str:
    shown = [f"{c.id}{' (advisory)' if c.severity == 'advisory' and c.status == 'fail' else ''}"
             f"{' (info)' if c.status == 'info' else ''}: {c.detail}" for c in checks if c.status in ("fail", "info")]
    return "; ".join(shown) or "-"


def row(sc: Scenario, verdict: str, m: Metrics, checks: Sequence[CheckResult]) -> Dict[str, Any]:
    """One scenario's result, JSON-ready."""
    metrics = {k: v for k, v in dataclasses.asdict(m).items() if k != "seq_items"}
    if m.seq_items:
        metrics["seq_items"] = [{"i": it.index, "t_sent_s": round(it.t_sent_s, 3), "outcome": it.result.outcome,
                                 "complete": it.complete, "elapsed_s": round(it.result.elapsed_s, 3),
                                 "reported_model": it.result.reported_model, "error": it.result.error}
                                for it in m.seq_items]
    return {"id": sc.id, "title": sc.title, "model": sc.model, "fallback_model": sc.fallback_model,
            "ideal": sc.ideal, "mode": sc.mode, "max_wall_s": sc.max_wall_s, "verdict": verdict,
            "checks": [dataclasses.asdict(c) for c in checks], "metrics": metrics}


def print_table(config: Configuration, options: Mapping[str, Any], rows: Sequence[Dict[str, Any]]) -> None:
    print(f"\n## {config.name}: {config.note}")
    print(f"options: {json.dumps(options, sort_keys=True)}")
    print(f"{'id':<4} {'title':<36} {'verdict':<8} {'wall s':>7} {'p/f':>6}  failed checks / reason")
    for r in rows:
        m = r["metrics"]
        note = _failed([CheckResult(**c) for c in r["checks"]])
        if not r["reason"].startswith("failed:") and (r["verdict"] in ("safe", "fail") or note == "-"):
            reason = r["reason"] if len(r["reason"]) <= 100 else r["reason"][:99] + "…"
            note = reason + ("" if note == "-" else f" | {note}")
        if r["mode"] == "sequence":
            note = (f"{m['seq_served_during_down']}/{m['seq_requests_during_down']} served in outage, back on "
                    f"primary {_signed(m['seq_recovered_after_s'])} | {note}")
        print(f"{r['id']:<4} {r['title'][:36]:<36} {r['verdict']:<8} {m['elapsed_s']:>7.1f} "
              f"{m['attempts_primary']:>3}/{m['attempts_fallback']:<2}  {note}")
    totals = summarise(r["verdict"] for r in rows)
    print("totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))


def _signed(value: Optional[float]) -> str:
    return "never" if value is None else f"{value:+.1f}s"


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--only", help="comma-separated scenario ids, e.g. S06,S07")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="multiply fault durations and client timeouts (default 1.0: the published profile)")
    ap.add_argument("--fast", action="store_true",
                    help="the catalogue's fast profile (shorter faults, S15's fast sequence); not for publication")
    ap.add_argument("--configs", default="default,tuned", help="configurations to run (default: default,tuned)")
    ap.add_argument("--tuned", help="JSON object of Client options added to the default for the tuned row")
    ap.add_argument("--json", dest="json_path", help="write machine-readable results to this file")
    ap.add_argument("--require", action="append", default=[],
                    help='thresholds such as "default:pass>=13,fail==0"; exit 1 when one is unmet')
    args = ap.parse_args(argv)
    if not (args.time_scale > 0 and args.time_scale <= 10):
        ap.error(f"--time-scale: must be > 0 and <= 10, got {args.time_scale:g}")
    try:
        args.scenarios = select(args.only.split(",") if args.only is not None else None)
        args.requirements = [r for text in args.require for r in parse_requirements(text)]
        args.configurations = configurations([c.strip() for c in args.configs.split(",") if c.strip()], args.tuned)
    except (ValueError, HarnessError) as exc:
        ap.error(str(exc))
    return args


def run(args: argparse.Namespace, command: str) -> Dict[str, Any]:
    factor = args.time_scale
    for config in args.configurations:
        validate(config, factor)
    models = gateway_models(factor, fast=args.fast)
    scenarios = [sc.scaled(factor, fast=args.fast) for sc in args.scenarios]
    abandoned = Abandoned()
    profile = "fast" if args.fast else "full"
    print(f"Failover Bench catalogue v{METHODOLOGY_VERSION} ({CATALOGUE_SOURCE}) on the simulated gateway")
    print(f"holysheep_lb {__version__}; profile {profile}, time scale {factor:g}; one node, "
          f"{CHUNK_DELAY_MS:g} ms between chunks; 19-chunk answer (cut after 12, stall after 6, malformed after 3)")
    print(f"$ {command}")
    doc: Dict[str, Any] = {"catalogue": CATALOGUE_SOURCE, "methodology": METHODOLOGY_VERSION,
                           "holysheep_lb": __version__, "profile": profile, "time_scale": factor,
                           "command": command, "configurations": {}}
    for config in args.configurations:
        options = scaled_options(config.options, factor)
        rows = []
        for sc in scenarios:
            m = run_scenario(sc, options, models, abandoned)
            verdict, reason, checks = score(sc, m)
            rows.append({**row(sc, verdict, m, checks), "reason": reason})
            print(f"  {config.name} {sc.id} {verdict:<7} {m.elapsed_s:6.1f}s", file=sys.stderr, flush=True)
        doc["configurations"][config.name] = {"note": config.note, "options": options, "rows": rows,
                                              "summary": summarise(r["verdict"] for r in rows)}
        print_table(config, options, rows)
    print("\ntotals (pass / partial / safe / fail):")
    for config in args.configurations:
        s = doc["configurations"][config.name]["summary"]
        counts = " / ".join(f"{s[v]:>2}" for v in ("pass", "partial", "safe", "fail"))
        print(f"  {config.name:<8} {counts}   {config.note}")
    left = abandoned.join(STOP_TIMEOUT_S)
    doc["abandoned_calls_still_running"] = left
    if left:
        print(f"note: {left} abandoned call(s) still running at exit (daemon threads)")
    print(f"\nreproduce: {command}")
    return doc


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/failure_catalogue.py " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    try:
        doc = run(args, command.strip())
        if args.json_path:
            with open(args.json_path, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=2, default=str)
        summaries = {name: c["summary"] for name, c in doc["configurations"].items()}
        missed = unmet(args.requirements, summaries)
    except (HarnessError, ValueError, OSError) as exc:
        print(f"failure_catalogue: harness error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # a crash of the harness itself is not a scenario's result
        traceback.print_exc()
        print("failure_catalogue: harness error (see the traceback above)", file=sys.stderr)
        return 2
    if missed:
        print("requirements not met: " + "; ".join(missed))
        return 1
    if args.requirements:
        print("requirements met: " + ", ".join(str(r) for r in args.requirements))
    return 0


if __name__ == "__main__":
    sys.exit(main())
