"""A user's `mypy --strict` program reads answers by attribute with real types (no Any), and calls
the client the openai-python way: `stream=True` is typed by overloads, every Client option is a
typed keyword parameter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import holysheep_lb

GOOD = '''
from typing import Any, Dict, List, Optional

from holysheep_lb import APIStatusError, Client, Response
from holysheep_lb.types import ChatCompletionChunk, Embedding, ToolCall, Usage


def answer(client: Client) -> str:
    resp = client.chat_completion([{"role": "user", "content": "hi"}], model="gpt-4.1")
    assert isinstance(resp, Response)
    content: Optional[str] = resp.choices[0].message.content
    reason: str = resp.choices[0].finish_reason
    calls: Optional[List[ToolCall]] = resp.choices[0].message.tool_calls
    arguments: List[str] = [call.function.arguments for call in calls or []]
    usage: Optional[Usage] = resp.usage
    prompt_tokens: int = usage.prompt_tokens if usage is not None else 0
    ident: str = resp.id
    answered_by: Optional[str] = resp.model
    node: Optional[str] = resp.node_id
    plain: Dict[str, Any] = resp.model_dump()
    as_dict: Dict[str, Any] = resp
    return f"{content or ''}{reason}{arguments}{prompt_tokens}{ident}{answered_by}{node}{plain}{as_dict}"


def delta_text(chunk: ChatCompletionChunk) -> str:
    return "".join(choice.delta.content or "" for choice in chunk.choices)


def vector(item: Embedding) -> List[float]:
    return item.embedding


def describe(exc: APIStatusError) -> str:
    code: Optional[object] = exc.code
    kind: Optional[str] = exc.type
    param: Optional[str] = exc.param
    return f"{exc.status_code} {exc.message} {code} {kind} {param}"


MSGS = [{"role": "user", "content": "hi"}]


def openai_way(client: Client) -> str:
    resp = client.chat.completions.create(model="gpt-4.1", messages=MSGS, temperature=0.2, timeout=2.5,
                                          extra_headers={"X-Trace": "1"}, extra_query={"v": "1"},
                                          extra_body={"metadata": {"a": "b"}})
    text: Optional[str] = resp.choices[0].message.content
    stream = client.chat.completions.create(model="gpt-4.1", messages=MSGS, stream=True, timeout=(1.0, 5.0))
    with stream:
        pieces: List[str] = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    streamed: str = stream.text
    old = client.chat_completion(MSGS, "gpt-4.1", extra_headers={"X-Trace": "1"})
    old_text: Optional[str] = old.choices[0].message.content
    old_stream = client.chat_completion(MSGS, "gpt-4.1", stream=True)
    first: ChatCompletionChunk = next(old_stream)
    rest: str = old_stream.read_text()
    emb = client.embeddings.create(model="e", input=["a", "b"], timeout=3.0)
    vectors: List[List[float]] = [item.embedding for item in emb.data]
    again: Response = client.embeddings("a", model="e")
    ids: List[str] = [m.id for m in client.models.list()]
    also: List[str] = [m.id for m in client.models.list().data]
    listed: Response = client.models()
    return f"{text}{pieces}{streamed}{old_text}{first}{rest}{vectors}{again}{ids}{also}{listed}"


def build() -> Client:
    return Client(api_key="sk-x", nodes=[{"id": "a", "base_url": "http://127.0.0.1:1/v1"}], max_retries=2,
                  deadline_s=30.0, health_check_interval_s=None, strategy="round_robin", breaker=None,
                  fallbacks={"gpt-4.1": ("gpt-4.1-mini",)})
'''

BAD = '''
from holysheep_lb import Client, Response
from holysheep_lb.types import ChatCompletionChunk


def misuse(resp: Response, chunk: ChatCompletionChunk) -> None:
    count: int = resp.choices[0].message.content
    resp.choices[0].message.contnet
    len(resp.choices[0].message.content)
    chunk.choices[0].delta.bogus
    tokens: str = resp.choices[0].message.tool_calls[0].function.arguments


def misuse_client(client: Client) -> None:
    Client(health_check_interval=None)
    Client(max_retries="3")
    client.chat_completion([], model="m").read_text()
    client.chat.completions.create(model="m", messages=[], stream=True).choices
    client.chat.completions.create(model="m", messages=[], timeout="5")
'''

# (line in BAD, mypy error code) for each line that must be rejected
EXPECTED = {(7, "assignment"), (8, "attr-defined"), (9, "arg-type"), (10, "attr-defined"), (11, "index"),
            (15, "arg-type"),        # an unknown Client option
            (16, "arg-type"),        # an option of the wrong type
            (17, "attr-defined"),    # without stream=True the answer is a Response, not a stream
            (18, "attr-defined"),    # with stream=True it is a stream, not a Response
            (19, "call-overload")}   # timeout is seconds or a (connect, read) pair

CONFIG = """
[mypy]
strict = True

[mypy-holysheep_lb.*]
follow_imports = silent
"""


def test_mypy_strict_types_the_attributes_of_answers_chunks_and_errors(tmp_path):
    (tmp_path / "good.py").write_text(textwrap.dedent(GOOD))
    (tmp_path / "bad.py").write_text(textwrap.dedent(BAD))
    (tmp_path / "mypy.ini").write_text(CONFIG)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(holysheep_lb.__file__)))
    if "site-packages" not in root:  # the copy under test, not an installed one
        env["MYPYPATH"] = root
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"),
         "--show-error-codes", "--no-color-output", "--no-error-summary", "good.py", "bad.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150,
    )
    output = result.stdout + result.stderr
    errors = re.findall(r"^(\S+?\.py):(\d+): error: .*\[([a-z-]+)\]$", output, flags=re.MULTILINE)
    assert [e for e in errors if e[0] != "bad.py"] == [], output
    assert {(int(line), code) for _, line, code in errors} == EXPECTED, output
    assert result.returncode == 1, output
