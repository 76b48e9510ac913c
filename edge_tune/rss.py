"""This process's memory: peak and current RSS (MB), and giving back what it holds resident but does not
use (trim_resident_memory), so that a training process's peak is its working set."""

from __future__ import annotations

import contextlib
import os
import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started, in MB: VmHWM of /proc/self/status.
    Not getrusage's ru_maxrss: Linux carries that across fork+exec, so a process started by a large parent
    (pytest, a benchmark driver) would report the parent's peak as its own."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


def current_rss_mb() -> float:
    """Resident set size now, in MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except OSError:
        return peak_rss_mb()


MMAP_THRESHOLD_ENV = "EDGE_TUNE_MMAP_THRESHOLD_KB"  # allocations above this many KB are mmap'd (default 64)


def mmap_threshold_bytes() -> int:
    """The threshold limit_heap_growth sets: $EDGE_TUNE_MMAP_THRESHOLD_KB (KB) or 64 KB. A value that is not a
    positive whole number is ignored, with one line on stderr (an entry point's setting: it must not raise)."""
    raw = os.environ.get(MMAP_THRESHOLD_ENV, "64")
    try:
        kb = int(raw)
        if kb <= 0:
            raise ValueError
    except ValueError:
        print(f"edge_tune: ignoring {MMAP_THRESHOLD_ENV}={raw!r} (want a positive number of KB); using 64",
              file=sys.stderr)  # fmt: skip
        kb = 64
    return kb * 1024


def limit_heap_growth(mmap_threshold: int | None = None) -> bool:
    """Serve allocations above `mmap_threshold` bytes (default mmap_threshold_bytes()) with mmap, returned to
    the OS on free. glibc otherwise raises its threshold as large blocks are freed and keeps activations'
    memory in the heap: measured here, peak RSS of a BitFit step (batch 32) fell from 735 MB to 546 MB. The
    price is speed: every large tensor's pages fault in fresh. A LoRA step (16 x 64) measured 475 ms at 64 KB
    and 291 ms at 2048 KB, whose peak RSS was ~110 MB higher (398 vs 288 MB). The memory plan assumes 64 KB.
    Returns False where glibc is absent."""
    threshold = mmap_threshold if mmap_threshold is not None else mmap_threshold_bytes()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, threshold))
    except (OSError, AttributeError):
        return False


_settings_applied = False

# How long libgomp's idle OpenMP workers spin before they sleep, in spin iterations (its default is 300,000,
# a few ms). A short sentence's pass leaves the worker idle between its ~40 parallel GEMMs while one thread
# runs the ops between them; a worker spinning through those slowed them: a one-sentence pass 1.78-1.84 ms
# in whole runs at the default against 1.15-1.22 at 30,000 (2-core EPYC VNNI); the training step did not
# change (123-136 ms either way), a 16-sentence pass was ~4% faster.
OPENMP_SPIN_COUNT = "30000"


def set_openmp_spin() -> bool:
    """GOMP_SPINCOUNT=OPENMP_SPIN_COUNT unless the user set it or OMP_WAIT_POLICY. libgomp reads it once,
    when torch loads it: True if that is still to come (torch not imported yet), else nothing is changed."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
    return True


def apply_process_settings() -> None:
    """The process-wide settings a training or serving process runs with, applied by the entry points
    (`adapt`, `train`, `PatchBank`, the CLI), never by `import edge_tune`: glibc's mmap threshold
    (limit_heap_growth: it slowed PEFT's step ~1.5x in the same process), HF_HUB_OFFLINE=1 (nothing here
    downloads; interop code is told so), TOKENIZERS_PARALLELISM=false, the tensor cache as torch's CPU allocator once the kernels load
    (start_tensor_cache), and OpenMP's spin (set_openmp_spin: only where torch is not loaded yet; the
    CLI sets it before it imports torch). Idempotent."""
    global _settings_applied
    if _settings_applied:
        return
    _settings_applied = True
    set_openmp_spin()
    limit_heap_growth()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # One tokenizer thread: the rayon pool's per-thread heaps keep ~2.3 MB after tokenizing SST-2, which a
    # 400 MB device misses more than the second or two a parallel encode saves. A user's setting wins.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _tensor_cache_ops() is not None:  # the kernels loaded before this: start the cache now
        start_tensor_cache()


def process_settings_applied() -> bool:
    return _settings_applied


TENSOR_CACHE_ENV = "EDGE_TUNE_TENSOR_CACHE_MB"  # "off", or MB the tensor cache may add to the peak
_warned_slack: set[str] = set()
_chosen_slack_mb = 0.0  # the slack a run planned for itself (set_tensor_cache_slack), where the env is unset


def tensor_cache_slack_set_by_env() -> bool:
    return os.environ.get(TENSOR_CACHE_ENV) is not None


def tensor_cache_slack_mb() -> float | None:
    """How many MB the tensor cache (cpp_ext/cpu_allocator.cpp) may hold beyond the process's own high-water
    mark: $EDGE_TUNE_TENSOR_CACHE_MB; where unset, what the run chose (set_tensor_cache_slack; `edge-tune
    train` spends spare budget on it), else 0 (reuse only what the peak already needed). None for "off".
    A bad value is ignored with one line on stderr."""
    if not tensor_cache_slack_set_by_env():
        return _chosen_slack_mb
    raw = os.environ[TENSOR_CACHE_ENV].strip().lower()
    if raw == "off":
        return None
    try:
        mb = float(raw)
        if not mb >= 0 or mb == float("inf"):
            raise ValueError
        return mb
    except ValueError:
        if raw not in _warned_slack:  # plan, start and doctor all read it: say so once per value
            _warned_slack.add(raw)
            print(
                f"edge_tune: ignoring {TENSOR_CACHE_ENV}={raw!r} (want MB >= 0, or 'off'); using 0",
                file=sys.stderr,
            )
        return 0.0


def _tensor_cache_ops():
    """torch.ops.edge_tune where the compiled kernels (and with them the cache's ops) are loaded, else None.
    Never imports torch: this module is also used before it is."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch.ops.edge_tune, "tensor_cache_configure"):
        return None
    return torch.ops.edge_tune


def start_tensor_cache() -> bool:
    """Install the compiled tensor cache as torch's CPU allocator with tensor_cache_slack_mb() of slack, or
    stop it for "off"; empties it either way. Freed tensors of 64 KB and more are then reused instead of
    mapped and faulted in afresh: a LoRA step (16 x 64, 2 threads) measured 650 ms without, ~440 ms at
    0 MB (same peak RSS for that fixed-shape step; a run whose batch shapes vary measured +18 MB, see the
    README), ~375 ms at 64 MB (+25 MB peak). Needs the kernels loaded (kernels.load_kernels calls this
    once apply_process_settings has run); returns whether the cache is on."""
    ops = _tensor_cache_ops()
    if ops is None:
        return False
    slack = tensor_cache_slack_mb()
    ops.tensor_cache_configure(-1 if slack is None else int(slack * 2**20))
    return slack is not None


def set_tensor_cache_slack(slack_mb: float) -> None:
    """The slack a run planned for itself (memory.with_tensor_cache), applied now if the cache runs, else
    when the kernels load. $EDGE_TUNE_TENSOR_CACHE_MB, where set, wins."""
    global _chosen_slack_mb
    _chosen_slack_mb = float(slack_mb)
    start_tensor_cache()


def tensor_cache_stats() -> dict[str, float]:
    """The tensor cache's counters: hits, misses (allocations of 64 KB and more), cached_mb, live_mb,
    peak_live_mb, on (1/0). Empty where the kernels are not loaded."""
    ops = _tensor_cache_ops()
    if ops is None:
        return {}
    hits, misses, cached, live, peak, on = ops.tensor_cache_stats()
    mb = 2**20
    return {"hits": hits, "misses": misses, "cached_mb": cached / mb, "live_mb": live / mb,
            "peak_live_mb": peak / mb, "on": on}  # fmt: skip


def tensor_cache_summary() -> str:
    """One line for `edge-tune doctor`: on or off, the slack, and the counters so far."""
    s = tensor_cache_stats()
    state = "on" if s.get("on") else "off (kernels not loaded)" if not s else "off"
    slack = tensor_cache_slack_mb()
    counts = f", {s['hits']} hits / {s['misses']} misses" if s else ""
    return f"{state}, slack {'-' if slack is None else slack} MB ({TENSOR_CACHE_ENV}){counts}"


def _empty_tensor_cache() -> None:
    stats = tensor_cache_stats()
    if stats.get("on"):
        start_tensor_cache()  # frees what it holds and restarts its high-water mark from what is live


MADV_PAGEOUT = 21  # Linux >= 5.4


def trim_resident_memory() -> float:
    """Give back what this process holds resident but does not use: the pages of read-only file mappings
    (the shared libraries' code and constants: torch maps libtorch_cpu.so whole and its import leaves
    70-120 MB of it resident, more where the page cache holds the file in large folios, as right after pip
    wrote it, and training runs little of it), and the free memory glibc keeps in its heaps (malloc_trim:
    ~3 MB after tokenizing SST-2). Code pages still in use fault back in on their next touch, so what stays
    is the working set; nothing is written anywhere (the pages are clean copies of files). Returns the MB
    freed; 0 where madvise(MADV_PAGEOUT) (Linux >= 5.4) and glibc are unavailable. The tensor cache is
    emptied too, and its high-water mark restarts from here."""
    _empty_tensor_cache()
    if not sys.platform.startswith("linux"):
        return 0.0
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        before = current_rss_mb()
        with open("/proc/self/maps") as f:
            maps = [line.split() for line in f]
        for m in maps:
            # file-backed and not writable: clean pages, never dirty copies that would need swap
            if len(m) >= 6 and m[5].startswith("/") and "w" not in m[1]:
                lo, hi = (int(x, 16) for x in m[0].split("-"))
                libc.madvise(lo, hi - lo, MADV_PAGEOUT)
        libc.malloc_trim(0)
        return max(0.0, before - current_rss_mb())
    except (OSError, AttributeError, ValueError):
        return 0.0


def reset_peak_rss() -> bool:
    """Restart this process's peak RSS (VmHWM) from its current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
