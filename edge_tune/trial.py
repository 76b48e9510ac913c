"""One trial of `edge-tune tune` (search.py), in a fresh process so that its peak RSS is its own and a
training run's (it imports no Optuna). `run_trial` starts it; the process (`main`) trains the configuration
search.py drew, after each evaluation writes `EVAL {"step": .., "dev_accuracy": ..}` on stdout and reads
`prune` or `go` on stdin (the study's pruner, asked by run_trial's caller), and writes the result JSON.
`python -m edge_tune.trial FIELDS_JSON DATA PATCH RESULT PROFILE EVAL_EVERY SEED`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import EdgeTuneError


def run_trial(fields: dict, data: str, patch: Path, profile: str | None, eval_every: int, seed: int,
              prune: Callable[[int, float], bool]) -> dict:  # fmt: skip
    """Train one trial in a fresh process, answering each evaluation with `prune(step, dev_accuracy)`; its
    JSON result, or {'error': one line}. Its stderr goes to trial_N.log beside the patch."""
    result, log_path = patch.with_suffix(".json"), patch.with_suffix(".log")
    cmd = [sys.executable, "-m", "edge_tune.trial", json.dumps(fields), str(data), str(patch), str(result),
           str(profile or ""), str(eval_every), str(seed)]  # fmt: skip
    with open(log_path, "w") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                                preexec_fn=die_with_parent)  # fmt: skip
        for line in proc.stdout:
            if line.startswith("EVAL "):
                ev = json.loads(line[5:])
                proc.stdin.write("prune\n" if prune(ev["step"], ev["dev_accuracy"]) else "go\n")
                proc.stdin.flush()
        proc.wait()
    if proc.returncode != 0 or not result.is_file():
        lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"trial process exited {proc.returncode}"}
    return json.loads(result.read_text())


def die_with_parent() -> None:
    """In the trial process: be killed when the study process dies (kill -9 included), so no trial trains
    on unseen (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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
        "patch": str(patch), "threads": r.threads,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
