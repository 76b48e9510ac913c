"""How much a sentence's prediction depends on the batch it is served in: every dev sentence alone vs in
batches. Every sum of an inference pass runs in an order its own sentence sets (packed matmuls and
attention, ops.lora_rows, the pooling, model.head_logits), so the answers should be identical; this checks
it on real sentences (with EDGE_TUNE_INT8_ACTIVATIONS=fp32 the weight-only linears' BLAS calls do not).

    python tools/batch_invariance.py [--patch out/sst2.patch] [--data sst2] [--batch 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", default="out/sst2.patch", help="a patch (default: the demo's out/sst2.patch)")
    ap.add_argument("--data", default="sst2", help="built-in task or TSV whose dev sentences are used")
    ap.add_argument("--batch", type=int, default=64, help="sentences per batched pass (default 64)")
    a = ap.parse_args()
    import numpy as np

    from edge_tune.bank import PatchBank
    from edge_tune.data import load_task
    from edge_tune.errors import EdgeTuneError
    from edge_tune.model import INT8_ACTIVATIONS

    try:
        _, dev = load_task(a.data)
        bank = PatchBank()
        bank.activate(bank.load(a.patch))
    except EdgeTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batched = bank.predict(dev.texts, batch_size=a.batch)
    alone = [bank.predict([t])[0] for t in dev.texts]
    dp = np.array([abs(x.probability - y.probability) for x, y in zip(batched, alone, strict=True)])
    flips = sum(x.label != y.label for x, y in zip(batched, alone, strict=True))
    print(f"{len(dp)} sentences, int8 activations {INT8_ACTIVATIONS}: max |dp| {dp.max():.2g}, "
          f"median {np.median(dp):.2g}, identical {int((dp == 0).sum())}, label flips {flips}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
