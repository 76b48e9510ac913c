"""Train one patch per task and method on the shared base, under a device profile, and print each task's
dev accuracy: the patches `tools/swap_bench.py --patches` and a multi-task PatchBank serve.

    python tools/build_task_patches.py [--tasks sst2,cr,subj,mpqa] [--methods bitfit,lora]
                                       [--profile raspberry-pi-4-4gb] [--steps N] [--out out/tasks]

Each run is `edge_tune.adapt(...)` with the method's defaults (the same as `edge-tune train`); `--steps`
overrides the step count for a quicker build. Patches land in OUT/<task>_<method>.patch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_tune.errors import EdgeTuneError  # noqa: E402
from edge_tune.run import adapt  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="sst2,cr,subj,mpqa", help="comma-separated tasks (default all four)")
    ap.add_argument("--methods", default="bitfit,lora", help="comma-separated methods (default bitfit,lora)")
    ap.add_argument("--profile", default=None, help="device profile (default: the default profile)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per patch (default: per method)")
    ap.add_argument("--out", default="out/tasks", help="folder for the patches (default out/tasks)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            path = out / f"{task}_{method}.patch"
            print(f"training {method} on {task} -> {path}", flush=True)
            try:
                r = adapt(task, path, method=method, profile=args.profile, steps=args.steps, progress=True)
            except EdgeTuneError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            rows.append({"task": task, "method": method, "dev_accuracy": round(r.train.dev_accuracy, 4),
                         "patch_kb": round(r.patch_bytes / 1024, 1), "steps": r.train.steps,
                         "seconds": round(r.seconds, 1), "peak_rss_mb": round(r.train.peak_rss_mb)})  # fmt: skip
    print(
        f"\n{'task':6} {'method':7} {'dev acc':>8} {'patch KB':>9} {'steps':>6} {'seconds':>8} {'peak RSS MB':>12}"
    )
    for r in rows:
        print(f"{r['task']:6} {r['method']:7} {r['dev_accuracy']:8.4f} {r['patch_kb']:9.1f} {r['steps']:6d} "
              f"{r['seconds']:8.1f} {r['peak_rss_mb']:12d}")  # fmt: skip
    (out / "tasks.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
