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


GENAI_BOUNDS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)


def test_cumulative_counts_are_exact_up_to_one_bucket_width():
    h = LatencyHistogram()
    rng = random.Random(7)
    samples = [rng.lognormvariate(6, 2) for _ in range(20_000)]  # 0.1 ms .. minutes
    for ms in samples:
        h.record(ms)
    counts = h.cumulative_counts(GENAI_BOUNDS_S)
    assert counts == sorted(counts)
    for bound_s, got in zip(GENAI_BOUNDS_S, counts):
        at_most = sum(1 for ms in samples if ms <= bound_s * 1000.0)
        # a sample is counted under a bound only if it is below it, and always once
        # it is one bucket width (4%) below it
        surely = sum(1 for ms in samples if ms * 1.04 <= bound_s * 1000.0)
        assert surely <= got <= at_most


def test_cumulative_counts_on_whole_buckets_are_exact():
    h = LatencyHistogram()
    for ms in (5.0, 15.0, 15.0, 30.0, 700.0):
        h.record(ms)
    assert h.cumulative_counts([0.01, 0.02, 0.04, 0.5, 1.0]) == [1, 3, 4, 4, 5]


def test_cumulative_counts_of_an_empty_histogram_are_zero():
    assert LatencyHistogram().cumulative_counts(GENAI_BOUNDS_S) == [0] * len(GENAI_BOUNDS_S)


def test_cumulative_counts_place_overflow_samples_by_the_maximum():
    h = LatencyHistogram()
    h.record(1.0)
    h.record(10_000_000.0)  # ~2.8 h: the overflow bucket has no upper edge
    assert h.cumulative_counts([81.92, 9_999.0, 10_000.0]) == [1, 1, 2]


@pytest.mark.parametrize("bounds", [[0.02, 0.01], [0.01, 0.01], [0.0, 1.0], [-1.0], [float("nan")],
                                    [float("inf")], [True], ["1"]])
def test_cumulative_counts_reject_bad_bounds(bounds):
    with pytest.raises(ValueError, match="bounds_s"):
        LatencyHistogram().cumulative_counts(bounds)
