"""The tensor cache (cpp_ext/cpu_allocator.cpp): freed large tensors are reused, results do not change, and
live + cached memory never exceeds the high-water mark plus the configured slack."""

import random
import resource
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from edge_tune import rss
from edge_tune.kernels import fallback_reason, load_kernels
from edge_tune.rss import TENSOR_CACHE_ENV, start_tensor_cache, tensor_cache_slack_mb, tensor_cache_stats

LOADED = load_kernels()
needs_kernels = pytest.mark.skipif(not LOADED, reason=f"C++ kernels off: {fallback_reason()}")
MB = 2**20


@pytest.fixture
def cache(monkeypatch):
    """Reconfigures the process-wide cache for one test and restores the default afterwards."""

    def configure(value: str) -> None:
        monkeypatch.setenv(TENSOR_CACHE_ENV, value)
        start_tensor_cache()

    yield configure
    monkeypatch.delenv(TENSOR_CACHE_ENV, raising=False)
    start_tensor_cache()


def test_slack_env(monkeypatch, capsys):
    monkeypatch.delenv(TENSOR_CACHE_ENV, raising=False)
    assert tensor_cache_slack_mb() == 0.0
    monkeypatch.setenv(TENSOR_CACHE_ENV, "32")
    assert tensor_cache_slack_mb() == 32.0
    monkeypatch.setenv(TENSOR_CACHE_ENV, "OFF")
    assert tensor_cache_slack_mb() is None
    monkeypatch.setattr(rss, "_warned_slack", set())
    for bad in ("-1", "lots", "nan", "inf"):
        monkeypatch.setenv(TENSOR_CACHE_ENV, bad)
        assert tensor_cache_slack_mb() == 0.0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and TENSOR_CACHE_ENV in err
        assert tensor_cache_slack_mb() == 0.0 and capsys.readouterr().err == ""  # said once per value


@needs_kernels
def test_freed_blocks_are_reused_and_small_ones_are_not_cached(cache):
    cache("0")
    x = torch.ones(512, 1024)  # 2 MB
    ptr = x.data_ptr()
    del x
    before = tensor_cache_stats()
    assert before["cached_mb"] == pytest.approx(2.0)
    y = torch.empty(512, 1024)
    assert y.data_ptr() == ptr
    assert tensor_cache_stats()["hits"] == before["hits"] + 1
    small = torch.ones(100)  # under 64 KB: the replaced allocator's, never cached
    del small
    assert tensor_cache_stats()["cached_mb"] == 0.0


def _page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@needs_kernels
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="blocks are resized with Linux's mremap")
def test_a_miss_that_must_give_memory_back_recycles_resident_pages(cache):
    """At slack 0 a request of a size not cached reuses a cached block's pages instead of faulting in new
    ones: the head of a larger block serves it and the tail stays cached; a smaller block grows in place."""
    cache("0")
    x = torch.ones(1024, 1024)  # 4 MB, faulted in
    ptr = x.data_ptr()
    del x
    before = _page_faults()
    y = torch.empty(512, 1024).fill_(1.0)  # 2 MB: no block of that size is cached
    assert y.data_ptr() == ptr and _page_faults() - before < 64  # a fresh 2 MB mapping: 512 faults
    assert tensor_cache_stats()["cached_mb"] == pytest.approx(2.0)
    z = torch.empty(512, 1024)  # the tail, an exact fit
    assert z.data_ptr() == ptr + 2 * MB
    del y, z
    cache("0")
    x = torch.ones(512, 1024)  # 2 MB, faulted in; the high-water mark is 2 MB + this file's small tensors
    peak = tensor_cache_stats()["peak_live_mb"]
    del x
    before = _page_faults()
    w = torch.full((768, 1024), 2.0)  # 3 MB: the 2 MB block grows, only its new 1 MB faults in
    assert _page_faults() - before < 256 + 64  # a fresh 3 MB mapping: 768 faults
    s = tensor_cache_stats()
    assert s["cached_mb"] == 0 and s["live_mb"] + s["cached_mb"] <= max(peak, s["live_mb"]) + 1e-9
    assert bool((w == 2.0).all())


@needs_kernels
@pytest.mark.parametrize("slack_mb", [0, 3])
def test_live_plus_cached_never_exceeds_the_high_water_mark_plus_slack(cache, slack_mb):
    cache(str(slack_mb))
    rng = random.Random(slack_mb)
    held = []
    for _ in range(400):
        if held and rng.random() < 0.45:
            held.pop(rng.randrange(len(held)))
        else:
            held.append(torch.empty(rng.choice([16, 48, 64, 200, 1000]) * 1024 // 4))
        s = tensor_cache_stats()
        assert s["live_mb"] + s["cached_mb"] <= s["peak_live_mb"] + slack_mb + 1e-9
    assert tensor_cache_stats()["hits"] > 0


@needs_kernels
def test_results_are_bit_identical_with_the_cache_on_and_off(cache):
    """Training-shaped work (including GELU, whose kernel frees through raw_deallocate) gives the same bits."""
    torch.manual_seed(0)
    x, w = torch.randn(256, 384), torch.randn(1536, 384, requires_grad=True)

    def run():
        outs = []
        for _ in range(3):
            y = F.gelu(F.linear(x, w)).sum()
            (g,) = torch.autograd.grad(y, w)
            outs.append((y.detach().clone(), g))
        return outs

    cache("off")
    ref = run()
    cache("0")
    got = run()
    assert tensor_cache_stats()["hits"] > 0
    for (a, ga), (b, gb) in zip(ref, got, strict=True):
        assert torch.equal(a, b) and torch.equal(ga, gb)


@needs_kernels
def test_threads_allocating_at_once_keep_their_data(cache):
    cache("1")
    errors = []

    def worker(seed):
        for i in range(200):
            t = torch.full((64 * 1024,), float(seed * 1000 + i))  # 256 KB
            torch.ops.aten.relu_(t)  # some work between fill and check
            if not bool((t == seed * 1000 + i).all()):
                errors.append((seed, i))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@needs_kernels
def test_off_stops_caching_and_frees_what_it_held(cache):
    cache("0")
    torch.empty(1024 * 1024)  # freed at once
    assert tensor_cache_stats()["cached_mb"] > 0
    cache("off")
    s = tensor_cache_stats()
    assert s["on"] == 0 and s["cached_mb"] == 0
    hits = s["hits"]
    torch.empty(1024 * 1024)  # freed at once
    torch.empty(1024 * 1024)
    assert tensor_cache_stats()["hits"] == hits


@needs_kernels
@pytest.mark.parametrize("entry_point", [True, False])
def test_a_fresh_process_runs_with_the_cache_on_where_an_entry_point_asks(entry_point):
    """The cache replaces torch's CPU allocator: on in a process whose entry point applied the process
    settings (adapt, train, PatchBank, the CLI), before or after the kernels load; off in a process that only
    imported edge_tune and loaded the kernels (a library must not swap its host's allocator)."""
    code = (
        "import torch; from edge_tune.kernels import load_kernels; from edge_tune import rss;"
        f"{'rss.apply_process_settings();' if entry_point else ''}"
        "load_kernels(); [torch.ones(1 << 20).sum() for _ in range(3)]; s = rss.tensor_cache_stats();"
        "print(s['on'], s['hits'] >= 2)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == (["1", "True"] if entry_point else ["0", "False"])


def test_a_run_sets_its_planned_slack_unless_the_env_does(monkeypatch):
    """adapt hands the slack its plan chose to rss.set_tensor_cache_slack; the env, where set, wins."""
    monkeypatch.delenv(TENSOR_CACHE_ENV, raising=False)
    try:
        rss.set_tensor_cache_slack(12)
        assert tensor_cache_slack_mb() == 12.0
        assert "slack 12.0 MB" in rss.tensor_cache_summary()
        monkeypatch.setenv(TENSOR_CACHE_ENV, "3")
        assert tensor_cache_slack_mb() == 3.0
    finally:
        monkeypatch.delenv(TENSOR_CACHE_ENV, raising=False)
        rss.set_tensor_cache_slack(0)
