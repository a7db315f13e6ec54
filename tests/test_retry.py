import email.utils

import pytest
from requests.structures import CaseInsensitiveDict

from holysheep_lb.retry import RetryPolicy, parse_retry_after, parse_should_retry

NOW = 1_700_000_000.0


def _h(**kw):
    return CaseInsensitiveDict({k.replace("_", "-"): v for k, v in kw.items()})


@pytest.mark.parametrize(
    "headers, expected",
    [
        (_h(retry_after="2"), 2.0),
        (_h(retry_after="0"), 0.0),
        (_h(retry_after="1.5"), 1.5),
        (_h(retry_after=" 7 "), 7.0),
        (_h(retry_after_ms="250"), 0.25),
        (_h(retry_after_ms="250", retry_after="9"), 0.25),   # -ms wins
        (_h(retry_after_ms="junk", retry_after="9"), 9.0),   # garbage -ms falls through
        (_h(retry_after="-5"), None),                        # negative: ignored
        (_h(retry_after="nan"), None),
        (_h(retry_after="inf"), None),
        (_h(retry_after="soon"), None),
        (_h(retry_after=""), None),
        (_h(retry_after="9" * 400), None),                   # absurd length
        (_h(retry_after=email.utils.formatdate(NOW + 30, usegmt=True)), 30.0),
        (_h(retry_after=email.utils.formatdate(NOW - 30, usegmt=True)), 0.0),  # date in the past
        (_h(retry_after="Wed, 99 Foo 2015 07:28:00 GMT"), None),
        (_h(), None),
    ],
)
def test_retry_after_table(headers, expected):
    got = parse_retry_after(headers, now=lambda: NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1.0 if expected >= 1 else 1e-9)


@pytest.mark.parametrize("raw, expected", [("true", True), ("FALSE", False), ("maybe", None), (None, None)])
def test_should_retry_header(raw, expected):
    assert parse_should_retry(_h(x_should_retry=raw) if raw is not None else _h()) is expected


def test_full_jitter_backoff_bounds_and_cap():
    policy = RetryPolicy(max_retries=5, backoff_base_s=0.1, backoff_cap_s=0.5)
    assert policy.backoff_s(1, rand=lambda: 1.0) == pytest.approx(0.1)
    assert policy.backoff_s(2, rand=lambda: 1.0) == pytest.approx(0.2)
    assert policy.backoff_s(3, rand=lambda: 1.0) == pytest.approx(0.4)
    assert policy.backoff_s(4, rand=lambda: 1.0) == pytest.approx(0.5)  # capped
    assert policy.backoff_s(9, rand=lambda: 0.5) == pytest.approx(0.25)
    assert policy.backoff_s(3, rand=lambda: 0.0) == 0.0                 # full jitter reaches 0
