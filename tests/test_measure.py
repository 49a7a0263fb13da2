"""Measurement utilities: timer, peak memory, cache accounting, quantiles."""

from __future__ import annotations

import math
import time

import pytest
import torch
from tokenbench.measure import (
    Timer,
    cache_bytes,
    cache_lengths,
    measured_repeats,
    median_spread,
    p50,
    p90,
    peak_memory,
    quantile,
    summarize_repeats,
)


def test_timer_cpu_measures_a_sleep() -> None:
    timer = Timer("cpu")
    assert not timer.cuda
    with timer.region() as r:
        time.sleep(0.05)
    assert 45 <= r.ms < 1000
    a = timer.stamp()
    time.sleep(0.02)
    b = timer.stamp()
    assert 15 <= timer.elapsed_ms(a, b) < 1000


@pytest.mark.gpu
def test_timer_cuda_uses_events() -> None:
    timer = Timer("cuda")
    assert timer.cuda
    x = torch.randn(2048, 2048, device="cuda")
    with timer.region() as r:
        for _ in range(10):
            x = x @ x / 2048
    assert isinstance(r.start, torch.cuda.Event)
    assert r.ms > 0


def test_cache_bytes_and_lengths_match_the_tensors() -> None:
    from transformers import DynamicCache

    cache = DynamicCache()
    shapes = [(2, 3, 7, 8), (2, 3, 5, 8)]
    for i, shape in enumerate(shapes):
        cache.update(torch.randn(shape), torch.randn(shape, dtype=torch.float64)[..., :4].float(), i)
    expected = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert cache_bytes(cache) == expected == (6 * 7 * 8 + 6 * 7 * 4 + 6 * 5 * 8 + 6 * 5 * 4) * 4
    assert cache_lengths(cache) == [7, 5]
    # the cache is measured as it is now: replacing a layer's tensors changes the count
    cache.layers[0].keys = cache.layers[0].keys[:, :, :2].half()
    assert cache_bytes(cache) == expected - 2 * 3 * 7 * 8 * 4 + 2 * 3 * 2 * 8 * 2
    legacy = ((torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)),)
    assert cache_bytes(legacy) == 2 * 64 * 4 and cache_lengths(legacy) == [4]
    assert cache_bytes(None) == 0 and cache_lengths(DynamicCache()) == []


def test_quantiles() -> None:
    vals = list(range(1, 11))
    assert p50(vals) == 5.5
    assert p90(vals) == pytest.approx(9.1)
    assert quantile(vals, 0.0) == 1 and quantile(vals, 1.0) == 10
    assert p50([3.0]) == p90([3.0]) == 3.0
    assert math.isnan(p50([]))
    with pytest.raises(ValueError):
        quantile(vals, 1.5)


def test_median_spread_and_summarize_repeats() -> None:
    assert median_spread([3.0, 1.0, 2.0]) == (2.0, 2.0)
    out = summarize_repeats([{"a": 1.0, "b": None}, {"a": 3.0, "b": None}, {"a": 2.0, "b": None}])
    assert out == {"a": 2.0, "a_spread": 2.0, "b": None}
    assert summarize_repeats([{"a": 1.5}]) == {"a": 1.5}  # one repeat: no spread key


def test_peak_memory_cpu_sees_an_allocation() -> None:
    with peak_memory("cpu") as m:
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        del x
    if m.peak_allocated is None:
        pytest.skip("/proc/self/clear_refs not writable here")
    assert m.peak_allocated >= 48 * 1024 * 1024
    assert m.peak_reserved is None
    assert set(m.as_dict()) == {"peak_allocated", "peak_reserved"}


def test_measured_repeats_warms_up_untimed_and_keeps_the_worst_peaks() -> None:
    calls = []
    results, peaks = measured_repeats(lambda: calls.append(len(calls)) or len(calls), "cpu", repeats=3, warmup=2)
    assert calls == [0, 1, 2, 3, 4] and results == [3, 4, 5]  # 2 warm-up calls, then the 3 measured ones
    assert set(peaks) == {"peak_allocated", "peak_reserved"}
    results, _ = measured_repeats(lambda: "x", "cpu", repeats=0)
    assert results == ["x"]  # at least one measured run
