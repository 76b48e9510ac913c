"""One trial of `edge-tune tune` (search.py), in a fresh process so that its peak RSS is its own and a
training run's (it imports no Optuna): train the configuration search.py drew; after each evaluation write
`EVAL {"step": .., "dev_accuracy": ..}` on stdout and read `prune` or `go` on stdin (the study's pruner,
asked by search.py); write the result JSON.
`python -m edge_tune.trial FIELDS_JSON DATA PATCH RESULT PROFILE EVAL_EVERY SEED`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .errors import EdgeTuneError


def main(argv: list[str]) -> int:
    from .run import RunRequest, adapt

    fields, data, patch, result, profile, eval_every, seed = argv
    pruned = []

    def on_eval(step: int, acc: float) -> bool:
        print("EVAL " + json.dumps({"step": step, "dev_accuracy": acc}), flush=True)
        if sys.stdin.readline().strip() == "prune":
            pruned.append(step)
            return True
        return False

    req = RunRequest(
        profile=profile or None, eval_every=int(eval_every), seed=int(seed), **json.loads(fields)
    )
    t0 = time.perf_counter()
    try:
        r = adapt(data, patch, req, progress=False, on_eval=on_eval)
    except EdgeTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(result).write_text(json.dumps({
        "dev_accuracy": r.train.dev_accuracy, "peak_rss_mb": r.train.peak_rss_mb, "steps": r.train.steps,
        "patch_kb": r.patch_bytes / 1024, "seconds": time.perf_counter() - t0, "pruned": bool(pruned),
        "patch": str(patch),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
