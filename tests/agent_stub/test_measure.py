"""The generic measuring helpers the simulator and the benchmarks share."""

from __future__ import annotations

import importlib.util
import os
import resource
import sys

import pytest

from agent_stub.measure import cache_missing_sniffio, percentiles, raise_fd_limit, rss_bytes


def test_percentiles_are_nearest_rank() -> None:
    assert percentiles([]) == {"count": 0}
    assert percentiles(float(n) for n in range(100, 0, -1)) == {
        "count": 100,
        "min": 1.0,
        "p50": 50.0,
        "p90": 90.0,
        "p99": 99.0,
        "max": 100.0,
        "mean": 50.5,
    }
    assert percentiles([0.123456]) == {
        "count": 1,
        "min": 0.1235,
        "p50": 0.1235,
        "p90": 0.1235,
        "p99": 0.1235,
        "max": 0.1235,
        "mean": 0.1235,
    }


def test_rss_bytes_of_this_process_and_of_none() -> None:
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc here")
    assert rss_bytes() > 1024 * 1024
    assert rss_bytes(os.getpid()) > 0
    assert rss_bytes(2**22 + 1) == 0  # beyond Linux's pid_max: no such process


def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = raise_fd_limit()
    assert limit >= soft
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == (hard if hard != resource.RLIM_INFINITY else soft)


def test_a_missing_sniffio_is_remembered_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = sys.modules.pop("sniffio", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    try:
        cache_missing_sniffio()
        assert "sniffio" in sys.modules and sys.modules["sniffio"] is None
        with pytest.raises(ImportError):
            import sniffio  # noqa: F401
    finally:
        sys.modules.pop("sniffio", None)
        if saved is not None:
            sys.modules["sniffio"] = saved
