"""The one helper that blanks the API key in errors built from server-sent bytes."""

import pytest

from holysheep_lb import APIResponseValidationError, InternalServerError
from holysheep_lb.redaction import NO_REDACTION, REDACTED, Redactor
from holysheep_lb.streaming import SSEEvent, SSEParser, decode_event

KEY = "sk-live-0123456789abcdef"


def test_the_key_is_blanked_in_bytes_text_json_and_a_body_cut_inside_it():
    redact = Redactor(KEY)
    assert redact.raw(f"a {KEY} b {KEY}".encode()) == b"a [redacted] b [redacted]"
    assert redact.text(f"Bearer {KEY}") == "Bearer [redacted]"
    assert redact.value({"error": {KEY: [f"x{KEY}", 3, None]}}) == {"error": {REDACTED: ["x[redacted]", 3, None]}}
    # a body read up to a cap may stop inside the key: its start is blanked too
    assert redact.body(b"oops Bearer " + KEY[:10].encode()) == "oops Bearer [redacted]"
    assert redact.body(b'{"error": {"message": "\\u0073k-live-0123456789abcdef"}}') == {"error": {"message": REDACTED}}
    assert KEY not in repr(redact) and bool(redact) and not NO_REDACTION
    assert NO_REDACTION.body(b"plain") == "plain"


def test_stream_decoding_quotes_server_bytes_only_redacted():
    redact = Redactor(KEY)
    with pytest.raises(InternalServerError) as info:
        decode_event(SSEEvent("error", '{"error": {"message": "bad key %s"}}' % KEY), "n", redact=redact)
    assert KEY not in str(info.value) and KEY not in repr(info.value.body)
    with pytest.raises(APIResponseValidationError) as info:
        decode_event(SSEEvent(None, f"Bearer {KEY}"), "n", redact=redact)
    assert KEY not in str(info.value) and info.value.__context__ is None  # no JSONDecodeError holding the data
    with pytest.raises(APIResponseValidationError) as info:
        SSEParser(redact=redact).feed(f"Authorization: Bearer {KEY}\n".encode())
    assert KEY not in str(info.value) and "[redacted]" in str(info.value)
    with pytest.raises(APIResponseValidationError) as info:
        SSEParser(redact=redact).feed(b"data: \xff " + KEY.encode() + b"\n")
    assert KEY not in str(info.value) and info.value.__context__ is None


def test_a_deeply_nested_error_body_is_cut_not_walked_to_the_end():
    deep = b"[" * 900 + b"]" * 900  # decodable, but walking (or re-encoding) it could exhaust the stack
    body = Redactor(KEY).body(deep)
    depth = 0
    while isinstance(body, list):
        body, depth = body[0], depth + 1
    assert (depth, body) == (32, "[nested too deep]")
