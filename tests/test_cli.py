"""Units for the ``holysheep-lb`` command: parsing, error lines, output with and without rich."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import responses

from holysheep_lb import __version__, cli
from holysheep_lb.cli_output import Output, load_rich

RICH_MODULES = ("rich", "rich.console", "rich.progress", "rich.table")


@pytest.fixture
def no_rich(monkeypatch):
    """Make ``import rich`` fail, as on a machine without the [cli] extra."""
    for name in RICH_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("HOLYSHEEP_API_KEY", "HOLYSHEEP_NODES", "HOLYSHEEP_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("holysheep-lb: error: ")
    return lines[0]


# -- output: rich and plain ----------------------------------------------------------------


def test_load_rich_returns_none_without_rich(no_rich):
    assert load_rich() is None


def test_plain_table_aligns_columns(no_rich):
    stdout = io.StringIO()
    out = Output(stdout, io.StringIO(), rich=load_rich())
    out.table("Title", ["Node", "Region", "p50"], [["a", "us-east", "5 ms"], ["bbb", "eu", None]],
              align="llr")
    assert stdout.getvalue() == (
        "Title\n"
        "Node  Region    p50\n"
        "----  -------  ----\n"
        "a     us-east  5 ms\n"
        "bbb   eu          -\n\n"
    )


def test_rich_table_has_the_same_cells():
    rich = load_rich()
    assert rich is not None  # rich is in the test extra
    stdout = io.StringIO()
    Output(stdout, io.StringIO(), rich=rich).table("Title", ["Node", "p50"], [["a", "5 ms"]])
    text = stdout.getvalue()
    assert "Title" in text and "Node" in text and "5 ms" in text
    assert "┃" in text  # drawn by rich, not by the plain fallback


def test_plain_progress_prints_one_line_per_ten_percent_when_not_a_tty(no_rich):
    stderr = io.StringIO()
    out = Output(io.StringIO(), stderr, rich=load_rich())
    with out.progress("run", 50) as tick:
        for done in range(1, 51):
            tick(done, 50)
    assert stderr.getvalue().splitlines() == [f"run  {k * 5}/50  {k * 10}%" for k in range(1, 11)]


def test_rich_progress_reports_completion():
    stderr = io.StringIO()
    out = Output(io.StringIO(), stderr, rich=load_rich())
    with out.progress("run", 20) as tick:
        for done in range(1, 21):
            tick(done, 20)
    assert "run" in stderr.getvalue() and "20/20" in stderr.getvalue()


def test_json_mode_prints_no_table_progress_or_notes():
    stdout, stderr = io.StringIO(), io.StringIO()
    out = Output(stdout, stderr, json_mode=True, rich=load_rich())
    out.table("T", ["a"], [["1"]])
    out.note("note")
    out.line("line")
    with out.progress("run", 3) as tick:
        tick(3, 3)
    out.json({"ok": True})
    assert json.loads(stdout.getvalue()) == {"ok": True}
    assert stderr.getvalue() == ""


# -- errors: one line, non-zero exit ----------------------------------------------------------


def test_missing_api_key_says_how_to_set_it(clean_env, capsys):
    code, out, err = run(["chat", "hi", "--model", "m"], capsys)
    assert code == 1 and out == ""
    line = one_error_line(err)
    assert "HOLYSHEEP_API_KEY" in line and "export HOLYSHEEP_API_KEY=" in line


def test_missing_api_key_in_json_mode_is_still_one_line_on_stderr(clean_env, capsys):
    code, out, err = run(["health", "--json"], capsys)
    assert code == 1 and out == ""
    assert "HOLYSHEEP_API_KEY" in one_error_line(err)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read --config"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"nodes": [], "api_key": "k"}', "nodes: invalid value []"),
    ('{"nodes": [{"id": "a", "base_url": "ftp://x"}], "api_key": "k"}', "base_url"),
    ('{"bogus_option": 1}', "unknown Client option"),
])
def test_bad_config_files_give_one_clear_line(tmp_path, capsys, content, message):
    path = tmp_path / "cfg.json"
    if content is not None:
        path.write_text(content)
    code, out, err = run(["chat", "hi", "--model", "m", "--config", str(path)], capsys)
    assert code == 1 and out == ""
    assert message in one_error_line(err)


def test_missing_model_is_one_line(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"nodes": [{"id": "a", "base_url": "http://127.0.0.1:9/v1"}]}))
    code, _, err = run(["chat", "hi", "--config", str(path)], capsys)
    assert code == 1
    assert "--model" in one_error_line(err)


@responses.activate
def test_authentication_error_points_at_the_key(tmp_path, capsys):
    responses.add(responses.POST, "http://127.0.0.1:9/v1/chat/completions", status=401,
                  json={"error": {"message": "invalid api key"}})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"api_key": "sk-wrong", "nodes": [{"id": "a", "base_url": "http://127.0.0.1:9/v1"}]}))
    code, _, err = run(["chat", "hi", "--model", "m", "--config", str(path)], capsys)
    assert code == 1
    line = one_error_line(err)
    assert "AuthenticationError: HTTP 401: invalid api key" in line and "check HOLYSHEEP_API_KEY" in line
    assert "sk-wrong" not in line
    assert len(responses.calls) == 1  # 401 is final: no other attempt


def test_unknown_strategy_is_one_line(capsys):
    code, _, err = run(["bench", "--strategy", "round_robin,fastest"], capsys)
    assert code == 1
    assert "unknown strategy fastest" in one_error_line(err)


@pytest.mark.parametrize("argv", [
    ["demo", "--requests", "0"],
    ["demo", "--concurrency", "x"],
    ["demo", "--strategy", "nope"],
    ["health", "--timeout", "-1"],
    [],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130_with_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_load", interrupted)
    code, out, err = run(["demo", "--requests", "5"], capsys)
    assert code == 130 and out == ""
    assert err.splitlines()[-1] == "holysheep-lb: error: interrupted"  # after the progress bar


def test_plot_without_matplotlib_fails_before_running(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    ran = []
    monkeypatch.setattr(cli, "run_load", lambda *a, **k: ran.append(1))
    code, _, err = run(["bench", "--plot", "out.png"], capsys)
    assert code == 1 and ran == []
    assert one_error_line(err) == ("holysheep-lb: error: --plot needs matplotlib: "
                                   "pip install 'holysheep-lb[plot]'")


def test_python_dash_m_runs_the_cli():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "holysheep_lb", "--version"], capture_output=True,
                          text=True, timeout=60, cwd=root)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"holysheep-lb {__version__}"


class FakeStream:
    """Stands in for the stream object of ``chat_completion(stream=True)``."""

    def __init__(self, chunks) -> None:
        self.chunks = chunks
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.closed = True

    def __iter__(self):
        return iter(self.chunks)


STREAM_CHUNKS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
    {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
    {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"total_tokens": 3}},
]


def test_stream_printing_writes_each_delta_and_closes_the_stream():
    stdout = io.StringIO()
    stream = FakeStream(STREAM_CHUNKS)
    cli._print_stream(stream, Output(stdout, io.StringIO(), rich=None))
    assert stdout.getvalue() == "Hello\n"
    assert stream.closed


def test_stream_printing_in_json_mode_is_one_chunk_per_line():
    stdout = io.StringIO()
    cli._print_stream(FakeStream(STREAM_CHUNKS), Output(stdout, io.StringIO(), json_mode=True))
    assert [json.loads(line) for line in stdout.getvalue().splitlines()] == STREAM_CHUNKS
