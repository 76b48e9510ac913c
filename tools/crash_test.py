"""Kill a training run with SIGKILL at random moments, resume it each time, and check that the final patch
is bit-identical (same tensors sha256) to an uninterrupted run's. Prints one row per kill.

    python tools/crash_test.py [--kills 5] [--steps 60] [--data cr] [--method lora] [--profile NAME]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edge_tune.checkpoint import CKPT_KEY  # noqa: E402
from edge_tune.patch import MANIFEST_KEY  # noqa: E402
from edge_tune.tensorfile import read_header  # noqa: E402


def train_cmd(args, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "edge_tune.cli", "train", "--data", args.data, "--method", args.method,
           "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--checkpoint-every",
           str(args.checkpoint_every), "--seed", str(args.seed), "--out", str(out)]  # fmt: skip
    if args.profile:
        cmd += ["--profile", args.profile]
    return cmd + (["--resume"] if resume else [])


def tensors_sha(path: Path) -> str:
    return json.loads(read_header(path).metadata[MANIFEST_KEY])["tensors_sha256"]


def ckpt_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    return json.loads(read_header(path).metadata[CKPT_KEY])["loop"]["step"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=5, help="SIGKILLs to deliver (default 5)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    ap.add_argument("--eval-every", type=int, default=20, help="steps between dev evaluations (default 20)")
    ap.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints (default 5)")
    ap.add_argument("--data", default="cr", help="task or TSV (default cr)")
    ap.add_argument("--method", default="lora", help="head | bitfit | lora (default lora)")
    ap.add_argument("--profile", default=None, help="device profile (default: the default profile)")
    ap.add_argument(
        "--seed", type=int, default=0, help="training seed, also picks the kill times (default 0)"
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="edge_tune_crash_"))
    ref, crashed = work / "ref.patch", work / "crashed.patch"
    ckpt = work / "crashed.patch.ckpt"

    t0 = time.perf_counter()
    subprocess.run(train_cmd(args, ref, False), check=True, capture_output=True)
    ref_s = time.perf_counter() - t0
    print(f"uninterrupted run: {ref_s:.1f} s, tensors sha256 {tensors_sha(ref)[:16]}")
    print(f"{'kill':>4}  {'after_s':>7}  {'ckpt_step_at_kill':>17}  {'resumed_from':>12}")
    # Kill times spread over the run; a run that resumes late has less left to do, so aim below its length.
    resumed_from, k, tries = 0, 0, 0
    while k < args.kills and tries < 4 * args.kills:
        tries += 1
        proc = subprocess.Popen(
            train_cmd(args, crashed, True), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        delay = rng.uniform(0.2, 0.9) * ref_s * (1 - resumed_from / args.steps)
        time.sleep(delay)
        if proc.poll() is not None:  # it finished first: not a kill; start the crash run over, aim earlier
            crashed.unlink(missing_ok=True)
            ref_s *= 0.7
            resumed_from = 0
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        k += 1
        step = ckpt_step(ckpt)
        print(f"{k:>4}  {delay:>7.1f}  {step if step is not None else '-':>17}  {resumed_from:>12}")
        resumed_from = step or 0
    if k < args.kills:
        print(f"only {k} of {args.kills} kills landed before the run finished")
        return 1
    done = subprocess.run(train_cmd(args, crashed, True), capture_output=True, text=True)
    if done.returncode != 0:
        print(f"final resume failed: {done.stderr.strip().splitlines()[-1]}")
        return 1
    same = tensors_sha(crashed) == tensors_sha(ref)
    print(f"final patch after {args.kills} kills: tensors sha256 {tensors_sha(crashed)[:16]} — "
          f"{'bit-identical' if same else 'DIFFERENT'} to the uninterrupted run")  # fmt: skip
    print(f"leftover checkpoint: {'none' if not ckpt.exists() else ckpt}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
