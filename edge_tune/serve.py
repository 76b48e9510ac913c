"""`edge-tune serve`: one base, many task patches, many clients, over HTTP (aiohttp: asyncio, one small
package with its own client, no framework layer; its RSS cost is in BENCHMARKS.md).

Cross-request batching: requests that arrive while a pass runs join the next one. After a pass of several
requests (GATHER_MIN_REQUESTS) the next one also waits, at most the profile's `serve_window_ms` after that
pass ended, until as many requests are queued as were then in play (those it answered, whose clients send
again, and those queued behind it): a steady load then runs as one pass for all its clients instead of two
groups taking turns, each group's HTTP traffic competing with the other's compute for the cores. After a
smaller pass a request is answered at once (few clients: waiting only idled the cores). Up to
`serve_max_batch` sentences of any patches then go to `PatchBank.predict(texts, patches=...)` in one call,
which runs them packed (no matmul sees padding) and mixes row-mixable methods (LoRA, head) by row in one
pass and groups the rest per patch. Passes run one at a time on one worker thread, each with the profile's
threads; the event loop only parses, queues and answers.

A request is answered wholly under one version of each patch: loading, replacing (the watched folder,
`POST /v1/patches`) and unloading take the bank's lock, which every pass holds. The queue is bounded in
sentences: when full, 503 with Retry-After. A patch load that would take the process over the profile's
budget is refused. Every error is a 4xx/5xx with `{"error": "<one line>"}`."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .bank import PatchBank
from .errors import EdgeTuneError
from .memory import affordable_tensor_cache_mb
from .profiles import DeviceProfile, load_profile
from .rss import current_rss_mb, peak_rss_mb, set_tensor_cache_slack, tensor_cache_slack_set_by_env

log = logging.getLogger("edge_tune")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
GATHER_MIN_REQUESTS = 3  # a pass of fewer requests than this: the next one does not wait for the window


@dataclass(frozen=True)
class ServeConfig:
    """What `edge-tune serve` runs with: one field per flag. None: the profile's value."""

    patches: str  # folder of .patch files, loaded at start under their file names (stem)
    profile: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    batching: bool = True  # off: one request per pass (the comparison the load tool makes)
    window_ms: float | None = None
    max_batch: int | None = None  # sentences in one pass
    queue_sentences: int = 512  # queued sentences at most; beyond, 503
    max_texts: int = 64  # sentences in one request
    max_chars: int = 2000  # characters in one sentence
    max_body_kb: int = 1024  # request body (a patch upload included)
    read_timeout_s: float = 5.0  # a client slower than this to send its body gets 408
    watch_s: float = 0.0  # poll the patches folder every this many seconds (0: off)
    token_file: str | None = None  # bearer token the patch-management endpoints require
    threads: int | None = None  # compute threads at most (None: the profile's)


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


@dataclass
class _Pending:
    texts: list[str]
    patches: list[str]
    future: asyncio.Future
    arrived: float


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, v: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.bounds)
        for i, b in enumerate(self.bounds):
            if v <= b:
                self.counts[i] += 1
        self.total, self.n = self.total + v, self.n + 1

    def lines(self, name: str) -> list[str]:
        counts = self.counts or [0] * len(self.bounds)
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.bounds, counts, strict=True)]
        return out + [
            f'{name}_bucket{{le="+Inf"}} {self.n}',
            f"{name}_sum {self.total}",
            f"{name}_count {self.n}",
        ]


class Service:
    """The bank, the queue and the batcher behind the HTTP routes."""

    def __init__(self, cfg: ServeConfig, bank: PatchBank | None = None):
        self.cfg = cfg
        self.profile: DeviceProfile = load_profile(cfg.profile)
        self.folder = Path(cfg.patches).resolve()
        if not self.folder.is_dir():
            raise EdgeTuneError("no such folder", cfg.patches, "pass --patches DIR holding .patch files")
        self.window_s = (self.profile.serve_window_ms if cfg.window_ms is None else cfg.window_ms) / 1000
        self.max_batch = cfg.max_batch or self.profile.serve_max_batch
        self.token = None
        if cfg.token_file:
            try:
                self.token = Path(cfg.token_file).read_text().strip()
            except (OSError, UnicodeDecodeError) as e:
                raise EdgeTuneError(
                    f"cannot read the token file ({e.__class__.__name__})", cfg.token_file
                ) from None
            if not self.token:
                raise EdgeTuneError("the token file is empty", cfg.token_file)
        # Every torch op of the service runs on this one thread, loading included: a second thread's OpenMP
        # team made every pass ~2.5x slower (bank.py, Concurrency).
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="edge_tune_pass")
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.queued = 0  # sentences waiting
        self.requests: dict[str, int] = {}  # by status code
        self.latency = _Histogram(LATENCY_BUCKETS_S)
        self.pass_rows = _Histogram(BATCH_BUCKETS)
        self.pass_time = _Histogram(LATENCY_BUCKETS_S)  # seconds a pass computes (busy = its sum / uptime)
        self.seen: dict[str, tuple[int, int]] = {}  # watched file -> (mtime_ns, size) last loaded or refused
        # The patch answering requests that name none. The service's own: a pass for a named patch activates
        # that one in the bank, and it must not become the default for everyone after.
        self.default: str | None = None
        try:
            self.bank = bank or self.pool.submit(PatchBank.from_profile, cfg.profile).result()
            self.pool.submit(self._load_folder).result()
            self.pool.submit(self._spend_headroom_on_tensor_cache).result()
        except BaseException:  # a base or patch refused at start: no pass thread left behind
            self.pool.shutdown(wait=False)
            raise

    def _spend_headroom_on_tensor_cache(self) -> None:
        """Slack for the tensor cache (rss.py) from the budget's headroom once the folder is loaded, unless
        $EDGE_TUNE_TENSOR_CACHE_MB says: each pass has its own token count, so its tensors' sizes seldom
        recur exactly, and with no slack most of them fault fresh pages in."""
        if not tensor_cache_slack_set_by_env():
            set_tensor_cache_slack(
                affordable_tensor_cache_mb(self.profile.memory_budget_mb - current_rss_mb())
            )

    # -- patches -------------------------------------------------------------------------------------
    def _load_folder(self) -> None:
        for path in sorted(self.folder.glob("*.patch")):
            try:
                self.load_file(path)
            except RequestError as e:  # at start, a refused patch stops the service: say which and why
                raise EdgeTuneError(str(e), path) from None
        if self.bank.patches and self.default is None:
            self.activate(sorted(self.bank.patches)[0])

    def activate(self, name: str) -> None:
        """Make `name` the patch answering requests that name none (on the pass thread)."""
        self.bank.activate(name)
        self.default = name

    def unload(self, name: str) -> None:
        """Forget patch `name` (on the pass thread); requests that name none get 409 if it was the default."""
        self.bank.unload(name)
        if self.default == name:
            self.default = None

    def load_file(self, path: Path, name: str | None = None) -> str:
        """Load (or replace) a patch under `name` (default: the file's stem), within the budget."""
        name = name or path.stem
        size_mb = path.stat().st_size / 2**20
        old = self.bank.patches.get(name)
        after = current_rss_mb() + size_mb - (old.nbytes() / 2**20 if old else 0)
        if after > self.profile.memory_budget_mb:
            raise RequestError(507, f"loading {name!r} ({size_mb:.1f} MB) would take the service to "
                                    f"{after:.0f} MB of its {self.profile.memory_budget_mb} MB budget")  # fmt: skip
        try:
            loaded = self.bank.load(path, name=name)
        except EdgeTuneError as e:
            raise RequestError(422, f"refused patch: {e}") from None
        st = path.stat()
        self.seen[str(path)] = (st.st_mtime_ns, st.st_size)
        if self.default is None:
            self.activate(loaded)
        return loaded

    def rescan(self) -> list[str]:
        """Load the folder's new or replaced patch files; a refused one is logged and kept out until it
        changes again. Returns the names loaded."""
        loaded = []
        for path in sorted(self.folder.glob("*.patch")):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if self.seen.get(str(path)) == (st.st_mtime_ns, st.st_size):
                continue
            self.seen[str(path)] = (st.st_mtime_ns, st.st_size)
            try:
                loaded.append(self.load_file(path))
            except (RequestError, OSError) as e:
                log.warning("warning: %s: %s", path.name, e)
        return loaded

    # -- predictions ---------------------------------------------------------------------------------
    async def predict(self, texts: list[str], patches: list[str]) -> list:
        if self.queued + len(texts) > self.cfg.queue_sentences:
            raise RequestError(503, f"queue full ({self.queued} sentences waiting)", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        item = _Pending(texts, patches, loop.create_future(), loop.time())
        self.queued += len(texts)
        self.queue.put_nowait(item)
        return await item.future

    async def batcher(self) -> None:
        """Gather requests into passes (waiting at most the window after the last pass), one at a time."""
        loop = asyncio.get_running_loop()
        # requests the last pass answered, when it ended (loop time), and how many requests were then in play
        # (answered, or queued): the clients the next pass waits for
        last, ended, expected = 0, 0.0, 0
        while True:
            batch = [await self.queue.get()]
            rows = len(batch[0].texts)
            # The window buys a bigger pass only where requests already come together (module docstring;
            # BENCHMARKS.md, Serving).
            deadline = max(batch[0].arrived, ended) + (self.window_s if last >= GATHER_MIN_REQUESTS else 0.0)
            while self.cfg.batching and rows < self.max_batch:
                try:
                    if not self.queue.empty():
                        item = self.queue.get_nowait()
                    elif len(batch) >= expected or deadline <= loop.time():
                        break
                    else:
                        item = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except TimeoutError:
                    break
                batch.append(item)
                rows += len(item.texts)
            self.queued -= rows
            self.pass_rows.observe(rows)
            try:
                results = await loop.run_in_executor(self.pool, self._run, batch)
            except Exception as e:  # a failed pass fails its requests, never the batcher
                log.exception("a pass failed")
                results = [RequestError(500, f"internal error: {e.__class__.__name__}: {e}")] * len(batch)
            last, ended, expected = len(batch), loop.time(), len(batch) + self.queue.qsize()
            for item, r in zip(batch, results, strict=True):
                if not item.future.done():
                    (item.future.set_exception if isinstance(r, Exception) else item.future.set_result)(r)

    def _run(self, batch: list[_Pending]) -> list:
        texts = [t for item in batch for t in item.texts]
        patches = [p for item in batch for p in item.patches]
        t0 = time.perf_counter()
        try:
            preds = self.bank.predict(texts, patches=patches)
        except EdgeTuneError:  # a patch unloaded since its request was checked: answer each alone
            return [self._run_one(item) for item in batch]
        finally:
            self.pass_time.observe(time.perf_counter() - t0)
        out, i = [], 0
        for item in batch:
            out.append(preds[i : i + len(item.texts)])
            i += len(item.texts)
        return out

    def _run_one(self, item: _Pending):
        try:
            return self.bank.predict(item.texts, patches=item.patches)
        except EdgeTuneError as e:
            return RequestError(404, str(e))

    def metrics(self) -> str:
        sizes = self.bank.memory_bytes()
        lines = [f'edge_tune_requests_total{{code="{c}"}} {n}' for c, n in sorted(self.requests.items())]
        errors = sum(n for c, n in self.requests.items() if not c.startswith("2"))
        lines += [f"edge_tune_errors_total {errors}", f"edge_tune_queue_sentences {self.queued}"]
        lines += self.pass_rows.lines("edge_tune_pass_sentences")
        lines += self.pass_time.lines("edge_tune_pass_seconds")
        lines += self.latency.lines("edge_tune_request_latency_seconds")
        lines += [f"edge_tune_patches_loaded {len(sizes)}"]
        lines += [f'edge_tune_patch_bytes{{patch="{n}"}} {b}' for n, b in sorted(sizes.items())]
        lines += [f"edge_tune_peak_rss_mb {peak_rss_mb():.1f}",
                  f"edge_tune_memory_budget_mb {self.profile.memory_budget_mb}"]  # fmt: skip
        return "\n".join(lines) + "\n"
