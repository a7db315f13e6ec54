"""The one helper that blanks secrets in errors built from server-sent bytes, and the one
that shows a URL without its credentials, query or fragment."""

import base64
import logging

import pytest

from holysheep_lb import APIResponseValidationError, InternalServerError
from holysheep_lb.redaction import (
    MIN_SECRET_CHARS,
    NO_REDACTION,
    REDACTED,
    Redactor,
    install_log_filter,
    proxy_secrets,
    set_current,
)
from holysheep_lb.streaming import SSEEvent, SSEParser, decode_event
from holysheep_lb.urls import redact_url

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


# -- several secrets: node headers, a call's own headers and query, a proxy's credentials -------

HEADER_SECRET = "hdr-0123456789"
QUERY_SECRET = "q/s+cret=value"  # percent-encoded on the wire


def test_the_key_always_counts_and_other_values_from_eight_characters_on():
    redact = Redactor("k3y", others=[HEADER_SECRET, "gzip", "1234567", "12345678", None])
    assert redact.text(f"k3y {HEADER_SECRET} gzip 1234567 12345678") == \
        "[redacted] [redacted] gzip 1234567 [redacted]"
    assert MIN_SECRET_CHARS == 8
    assert "k3y" not in repr(redact) and HEADER_SECRET not in repr(redact)


def test_a_secret_inside_another_is_blanked_with_it_and_any_secret_cut_at_the_end_is_blanked():
    redact = Redactor(KEY, others=["0123456789", HEADER_SECRET])
    assert redact.text(f"a {KEY} b") == "a [redacted] b"  # not "sk-live-[redacted]abcdef"
    assert redact.raw(b"body ends with hdr-01234", cut=True) == b"body ends with [redacted]"
    assert redact.value({"h": [f"x-api-key: {HEADER_SECRET}"]}) == {"h": ["x-api-key: [redacted]"]}
    assert redact.found_in(ValueError(ValueError(HEADER_SECRET)))
    assert not redact.found_in(ValueError("nothing here"))


def test_a_requests_redactor_adds_its_query_and_its_own_header_values():
    node = Redactor(KEY, others=[HEADER_SECRET])
    assert node.for_request("/chat/completions") is node  # the common case allocates nothing
    assert node.for_request("/chat/completions", ("short",)) is node
    encoded = "q%2Fs%2Bcret%3Dvalue"
    call = node.for_request(f"/chat/completions?token={encoded}&n=1", ["xh-EXTRA-HEADER"])
    assert call is not node
    said = (f"url: /v1/chat/completions?token={encoded}&n=1; echoed token={encoded} and {QUERY_SECRET}; "
            f"xh-EXTRA-HEADER {HEADER_SECRET} {KEY}")
    assert call.text(said) == ("url: /v1/chat/completions?[redacted]; echoed token=[redacted] and [redacted]; "
                               "[redacted] [redacted] [redacted]")
    assert node.text(said).count("[redacted]") == 2  # the node's own redactor is unchanged


def test_a_proxys_credentials_are_secrets_in_every_form_an_error_may_quote():
    secrets = proxy_secrets(["http://bob:p%40ss-word-9@proxy.example:3128", "http://proxy.example:8080"])
    redact = Redactor(None, others=secrets)
    basic = base64.b64encode(b"bob:p@ss-word-9").decode()
    said = f"http://bob:p%40ss-word-9@proxy.example:3128 p@ss-word-9 Basic {basic} proxy.example:8080"
    assert redact.text(said) == "[redacted] [redacted] Basic [redacted] proxy.example:8080"
    assert proxy_secrets(["http://proxy.example:3128"]) == []


def test_urllib3_records_are_redacted_only_while_one_of_our_requests_is_sent(caplog):
    install_log_filter()
    install_log_filter()  # idempotent
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    assert sum(f is not None and type(f).__name__ == "_RedactingFilter" for f in urllib3_log.filters) == 1
    caplog.set_level(logging.DEBUG, logger="urllib3")
    url = f"/v1/chat/completions?key={HEADER_SECRET}"
    set_current(Redactor(KEY).for_request(url))
    try:
        urllib3_log.debug('%s://%s:%s "%s %s %s" %s %s', "http", "127.0.0.1", 80, "POST", url, "HTTP/1.1", 500, 0)
        logging.getLogger("urllib3.util.retry").debug("Incremented Retry for (url='%s'): %r", url, "Retry(total=0)")
    finally:
        set_current(None)
    urllib3_log.debug("someone else's request: %s", url)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ['http://127.0.0.1:80 "POST /v1/chat/completions?[redacted] HTTP/1.1" 500 0',
                        "Incremented Retry for (url='/v1/chat/completions?[redacted]'): 'Retry(total=0)'",
                        f"someone else's request: {url}"]


# -- URLs in messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("url, shown", [
    ("https://gw.example/v1?api_key=sk-live-123", "https://gw.example/v1?<query removed>"),
    ("https://gw.example/v1#sk-live-123", "https://gw.example/v1#<fragment removed>"),
    ("https://user:sk-live-123@gw.example/v1", "https://<credentials>@gw.example/v1"),
    ("https://u:sk/live?1#2@gw.example/v1?k=3", "https://<credentials>@gw.example/v1?<query removed>"),
    ("http://bob:hunter2@proxy.example:3128", "http://<credentials>@proxy.example:3128"),
    ("HTTPS://gw.example:99999/v1", "HTTPS://gw.example:99999/v1"),
    ("redis://:pw@cache:6379/0?password=x", "redis://<credentials>@cache:6379/0?<query removed>"),
    ("/models?api_key=sk-live-123", "/models?<query removed>"),
    ("sk-live-123", "<not a URL>"),  # a key passed where the URL goes
    ("user:sk-live-123@gw.example/v1", "<not a URL>"),
    ("//user:sk-live-123@gw.example/v1", "<not a URL>"),
    ("u:sk-live-123@h://x", "<not a URL>"),
    ("", "<not a URL>"),
])
def test_redact_url_shows_a_url_without_user_information_query_or_fragment(url, shown):
    assert redact_url(url) == shown
    assert redact_url(url, scheme_only=True) == (shown.partition("://")[0] + "://..." if "://" in shown
                                                 else "<not a URL>")
