import random
import sys

import pytest

from holysheep_lb.stats import LatencyHistogram


def test_percentiles_are_within_bucket_resolution():
    h = LatencyHistogram()
    for ms in range(1, 1001):
        h.record(float(ms))
    assert h.count == 1000
    assert h.percentile(50) == pytest.approx(500, rel=0.05)
    assert h.percentile(95) == pytest.approx(950, rel=0.05)
    assert h.percentile(99) == pytest.approx(990, rel=0.05)
    assert h.percentile(100) == 1000.0


def test_empty_and_extreme_samples():
    h = LatencyHistogram()
    assert h.percentile(50) is None
    h.record(0.0)
    h.record(10_000_000.0)  # beyond the last bucket
    assert h.percentile(50) == pytest.approx(0.1)
    assert h.percentile(100) == 10_000_000.0


def test_memory_is_fixed_whatever_the_sample_count():
    h = LatencyHistogram()
    size_before = sys.getsizeof(h._counts)
    rng = random.Random(1)
    for _ in range(200_000):
        h.record(rng.lognormvariate(4, 1))
    assert sys.getsizeof(h._counts) == size_before
    assert h.count == 200_000
