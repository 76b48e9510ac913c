"""The job every runtime in compare_peers runs, defined once: data arrays, learning rates and schedule,
timing and memory measurement. Plain numpy + stdlib, so that it imports in every peer's own venv."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# per method, the same for every runtime (edge_tune's defaults); full fine-tuning trains its new head at HEAD_LR
LR = {"head": 2e-3, "bitfit": 1e-2, "lora": 2e-3, "ia3": 1e-2, "adapter": 5e-3, "prefix": 1e-2, "prompt": 3e-2,
      "ptuning": 1e-2, "partial": 5e-5, "full": 5e-5}  # fmt: skip
HEAD_LR = 2e-3
PROMPT_TOKENS, REPARAM = 16, 128  # prefix / prompt / P-tuning virtual tokens; their MLP's hidden width
WARMUP = 0.06  # fraction of steps with a linear warmup, then linear decay to 0
MAX_GRAD_NORM = 1.0  # where the runtime can clip (PEFT, edge_tune); ONNX Runtime and ExecuTorch cannot
LORA_RANK, LORA_ALPHA = 8, 16.0  # on the attention query and value projections
TIMED_FROM = 5  # step times are the median from this step on (the first steps warm caches and allocators)


def lr_at(method: str, step: int, total: int) -> float:
    warm = max(1, int(total * WARMUP))
    f = (step + 1) / warm if step < warm else max(0.0, (total - step) / max(1, total - warm))
    return LR[method] * f


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """train_ids/train_mask (steps*batch, seq) int64, train_labels (steps*batch,), dev_* likewise."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def batches(arrays: dict[str, np.ndarray], batch: int):
    ids, mask, labels = arrays["train_ids"], arrays["train_mask"], arrays["train_labels"]
    for i in range(0, len(labels), batch):
        yield ids[i : i + batch], mask[i : i + batch], labels[i : i + batch]


def one_sentence(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Batch-1 inference input: the first dev sentence at its real length (ids, mask), as a deployed
    runtime runs one sentence; a runtime with static shapes pads it (and says so)."""
    n = int(arrays["dev_mask"][0].sum())
    return arrays["dev_ids"][:1, :n], arrays["dev_mask"][:1, :n]


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (MB): VmHWM, which, unlike ru_maxrss, Linux does not carry
    over from the parent that started this process. (edge_tune.rss.peak_rss_mb is the same rule; the peer
    venvs do not have edge_tune installed.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_ms(fn, repeats: int = 200, warmup: int = 20) -> float:
    """Median wall time of fn() in ms. 200 runs (~1 s at batch 1): with 30, a VM's stolen time moved a
    peer's median by up to 1.7x between runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


class StepTimer:
    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.times.append(time.perf_counter() - self._t0)

    def median_ms(self) -> float:
        ts = self.times[TIMED_FROM:] or self.times
        return statistics.median(ts) * 1e3 if ts else float("nan")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(-1) == labels).mean())


def write_result(path: str | Path, **row) -> None:
    """The one JSON object a worker hands back (peak RSS is read last, after everything ran)."""
    row["peak_rss_mb"] = peak_rss_mb()
    Path(path).write_text(json.dumps(row))


def add_to_result(path: str | Path, **fields) -> None:
    """Add fields to the JSON a worker's earlier phase wrote (its peak RSS stays that phase's)."""
    row = json.loads(Path(path).read_text())
    Path(path).write_text(json.dumps({**row, **fields}))


def worker_args(argv: list[str] | None = None):
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--phase", default="train", help="train (all runtimes), prep / serve (where a runtime has them)"
    )
    ap.add_argument("--method", required=True)
    ap.add_argument("--variant", default="")
    ap.add_argument("--arrays", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--work", required=True, help="a scratch folder for this row")
    ap.add_argument("--result", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv if argv is not None else sys.argv[1:])
