"""Hypothesis strategies for hostile HTTP answers: status lines, headers, framing, bodies, SSE.

A drawn :class:`Answer` knows the bytes to put on the wire and whether it is *clean*
(a valid status line, sane headers, honest framing), so a test can demand the exact
outcome of a clean answer and merely a typed one of the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import List, Optional, Tuple

from hypothesis import strategies as st

CAP_BYTES = 64 * 1024  # max_response_bytes of the clients under fuzz

_HEADER_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\r\n")
header_text = st.text(_HEADER_CHARS, max_size=80)
json_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)

GARBAGE_STATUS_LINES = [b"HTTP/1.1 abc Nope", b"ICY 200 OK", b"HTTP/1.1", b"", b"\x00\xff\xfe garbage",
                        b"HTTP/1.1 2000 Too Big", b"HTTP/1.1 -1 Negative"]
RETRY_AFTER = st.one_of(
    st.integers(-10**15, 10**15).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["Fri, 31 Dec 9999 23:59:59 GMT", "Wed, 21 Oct 2015 07:28:00 GMT", "Mon, 99 Foo 2024 99:99:99 GMT",
                     "0", "-1", "1e309", "nan", "inf", " 5 ", "5s", "", "0x10", "1" * 40]),
    header_text,
)


@dataclass
class Answer:
    """One scripted HTTP answer and what a correct client must make of it."""

    status: int
    status_line_ok: bool
    headers: List[Tuple[str, str]]
    headers_ok: bool
    body: bytes
    body_kind: str
    framing: str
    wire: bytes

    @property
    def clean(self) -> bool:
        """Parseable head, honest framing and no content coding: the outcome is exact."""
        return (self.status_line_ok and self.headers_ok and 200 <= self.status <= 599
                and self.status not in (204, 304) and self.framing in ("length", "chunked", "close"))

    @property
    def truncated(self) -> bool:
        return (self.status_line_ok and self.headers_ok and 200 <= self.status <= 599
                and self.status not in (204, 304) and self.framing in ("short_length", "chunked_truncated"))

    def __repr__(self) -> str:
        names = [k for k, _ in self.headers if not k.startswith("X-Filler")]
        return (f"Answer(status={self.status}, line_ok={self.status_line_ok}, headers={names} "
                f"(+{len(self.headers) - len(names)} fillers, ok={self.headers_ok}), body={self.body_kind} "
                f"{len(self.body)} B {self.body[:60]!r}, framing={self.framing}, head={self.wire[:200]!r})")

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints falsifying examples with this
        printer.text(repr(self))

    def json_object(self) -> Optional[dict]:
        try:
            data = json.loads(self.body)
        except (ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None


def completion(text: str) -> dict:
    return {"id": "chatcmpl-fuzz", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


@st.composite
def json_bodies(draw) -> Tuple[str, bytes]:
    """(kind, body): the bodies a JSON endpoint may get back, good and bad."""
    kind = draw(st.sampled_from(["completion", "no_choices", "array", "scalar", "truncated_json", "invalid",
                                 "non_utf8", "huge", "deep", "empty", "error_object"]))
    if kind == "completion":
        body = json.dumps(completion(draw(json_text)), ensure_ascii=draw(st.booleans())).encode("utf-8")
    elif kind == "no_choices":
        body = json.dumps({"id": "x", "object": "chat.completion", "model": draw(json_text)}).encode()
    elif kind == "array":
        body = json.dumps([completion("a"), draw(json_text)]).encode()
    elif kind == "scalar":
        body = json.dumps(draw(st.one_of(st.integers(), json_text, st.none(), st.booleans()))).encode()
    elif kind == "truncated_json":
        full = json.dumps(completion(draw(json_text))).encode()
        body = full[: draw(st.integers(0, len(full) - 1))]
    elif kind == "invalid":
        body = draw(st.binary(max_size=200))
    elif kind == "non_utf8":
        body = b'{"choices": "' + draw(st.binary(min_size=1, max_size=50)) + b'\xff\xfe"}'
    elif kind == "huge":
        size = draw(st.integers(CAP_BYTES + 1, 4 * CAP_BYTES))
        body = b'{"pad": "' + b"x" * size + b'"}'
    elif kind == "deep":
        depth = draw(st.integers(1000, 20000))
        body = b"[" * depth + b"]" * depth
    elif kind == "error_object":
        body = json.dumps({"error": {"message": draw(json_text), "type": "server_error",
                                     "code": draw(st.one_of(st.none(), st.integers(-5, 700), json_text))}}).encode()
    else:
        body = b""
    return kind, body


@st.composite
def sse_bodies(draw) -> Tuple[str, bytes, Optional[str]]:
    """(kind, body, expected text): an event stream, clean (expected text given) or broken."""
    pieces = draw(st.lists(json_text, min_size=1, max_size=5))
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    events = [b"data: " + json.dumps({"object": "chat.completion.chunk", "model": "m", "choices": [
        {"index": 0, "delta": {"content": p}, "finish_reason": None}]}).encode() + eol + eol for p in pieces]
    faults = draw(st.lists(st.sampled_from(["no_data_prefix", "half_json", "no_done", "non_utf8", "error_event",
                                            "array_data", "keepalive", "bom", "random_bytes"]),
                           max_size=2, unique=True))
    if "keepalive" in faults:
        events.insert(draw(st.integers(0, len(events))), b": keepalive" + eol + eol)
    at = draw(st.integers(0, len(events)))
    if "no_data_prefix" in faults:
        events.insert(at, b"this is not an sse field" + eol + eol)
    if "half_json" in faults:
        events.insert(at, b'data: {"choices": [{"delta": {"content": "ha' + eol + eol)
    if "non_utf8" in faults:
        events.insert(at, b"data: \xff\xfe\xfd" + eol + eol)
    if "error_event" in faults:
        events.insert(at, b"event: error" + eol + b'data: {"error": {"message": "overloaded", "code": 529}}'
                      + eol + eol)
    if "array_data" in faults:
        events.insert(at, b"data: [1, 2, 3]" + eol + eol)
    if "random_bytes" in faults:
        events.insert(at, draw(st.binary(max_size=60)))
    if "no_done" not in faults:
        events.append(b"data: [DONE]" + eol + eol)
    body = b"".join(events)
    if "bom" in faults:
        body = b"\xef\xbb\xbf" + body
    benign = set(faults) <= {"keepalive", "bom"}
    return ("sse:" + ",".join(sorted(faults)) if faults else "sse"), body, ("".join(pieces) if benign else None)


def _frame(body: bytes, framing: str, draw) -> Tuple[List[str], bytes]:
    """(framing headers, framed body)."""
    if framing == "length":
        return [f"Content-Length: {len(body)}"], body
    if framing == "short_length":  # declares more than it sends, then closes
        return [f"Content-Length: {len(body) + draw(st.integers(1, 1000))}"], body
    if framing == "garbage_length":
        return [f"Content-Length: {draw(st.sampled_from(['abc', '-5', '1.5', '', '99999999999999999999']))}"], body
    if framing in ("chunked", "chunked_truncated", "chunked_garbage"):
        size = draw(st.integers(1, 4096))
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        out = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
        if framing == "chunked":
            out += b"0\r\n\r\n"
        elif framing == "chunked_garbage":
            out = b"zz\r\n" + out
        return ["Transfer-Encoding: chunked"], out
    return [], body  # "close": the end of the body is the end of the connection


@st.composite
def answers(draw, *, stream: bool = False) -> Answer:
    """A whole HTTP answer: status line, headers, framing and body."""
    if draw(st.integers(0, 19)) == 0:
        status_line, status, status_line_ok = draw(st.sampled_from(GARBAGE_STATUS_LINES)), 0, False
    else:
        status = draw(st.one_of(st.sampled_from([200, 200, 200, 201, 204, 301, 307, 400, 401, 403, 404, 408, 409,
                                                 422, 429, 500, 502, 503, 504]), st.integers(100, 599)))
        status_line, status_line_ok = f"HTTP/1.1 {status} {draw(header_text)}".encode("latin-1"), True
    if stream:
        kind, body, _ = draw(sse_bodies())
        content_type = draw(st.sampled_from(["text/event-stream", "text/event-stream; charset=utf-8", None]))
    else:
        kind, body = draw(json_bodies())
        content_type = draw(st.sampled_from(["application/json", "text/html", None, "application/json; charset=x"]))
    headers: List[Tuple[str, str]] = []
    headers_ok = True
    if content_type:
        headers.append(("Content-Type", content_type))
    if draw(st.booleans()):
        headers.append(("Retry-After", draw(RETRY_AFTER)))
    if draw(st.integers(0, 3)) == 0:
        headers.append(("retry-after-ms", draw(RETRY_AFTER)))
    if draw(st.integers(0, 3)) == 0:
        headers.append(("x-should-retry", draw(st.sampled_from(["true", "false", "TRUE", "maybe", ""]))))
    if draw(st.booleans()):
        headers.append(("x-request-id", draw(header_text)))
    extra = draw(st.integers(0, 20)) if draw(st.integers(0, 9)) else draw(st.integers(90, 150))
    headers += [(f"X-Filler-{i}", "v") for i in range(extra)]
    if len(headers) + 3 > 100:  # http.client refuses more than 100 header lines
        headers_ok = False
    if draw(st.integers(0, 9)) == 0:
        size = draw(st.integers(1000, 100_000))
        headers.append(("X-Huge", "h" * size))
        headers_ok = headers_ok and size < 60_000
    if draw(st.integers(0, 14)) == 0:
        headers.append(("Content-Encoding", draw(st.sampled_from(["gzip", "deflate", "br", "zstd", "bogus"]))))
        headers_ok = False
    framing = draw(st.sampled_from(["length", "length", "chunked", "close", "short_length", "garbage_length",
                                    "chunked_truncated", "chunked_garbage"]))
    frame_headers, framed = _frame(body, framing, draw)
    head = [status_line] + [f"{k}: {v}".encode("latin-1") for k, v in headers]
    head += [h.encode("latin-1") for h in frame_headers] + [b"Connection: close"]
    wire = b"\r\n".join(head) + b"\r\n\r\n" + framed
    return Answer(status, status_line_ok, headers, headers_ok, body, kind, framing, wire)
