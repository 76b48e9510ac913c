"""Workers on one PostgreSQL study: a fixed 8-trial search (the grid sampler: methods x batch x steps, no
pruning, so every configuration trains the same work) run by one worker with all the profile's threads and
by two one-thread workers, then the same two-worker search killed with SIGKILL mid-trial and run again.
Each run is `edge-tune tune` in its own process on a fresh study of a throwaway local server
(tools/local_postgres.py). Prints a table: wall time, trials, grid points covered, trials run twice, lost.

    python tools/tune_workers.py [--data sst2] [--profile raspberry-pi-zero-2w] [--kill-after 60]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_postgres import local_postgres, why_not  # noqa: E402

GRID = dict(methods="bitfit,lora", steps="100,200")  # x batch 8, 16 under the Pi Zero's cap of 16: 8 points


def tune_cmd(args, url: str, study: str, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "edge_tune.cli", "tune", "--data", args.data, "--profile", args.profile,
            "--storage", url, "--study", study, "--out", str(out), "--sampler", "grid", "--pruner", "none",
            "--methods", GRID["methods"], "--steps", GRID["steps"], "--eval-every", "100", "--trials", "8",
            "--workers", str(workers)]  # fmt: skip


def census(url: str, study: str) -> dict:
    """What the study holds: trials by state, the grid points its complete trials cover, points run twice."""
    trials = optuna.load_study(study_name=study, storage=url).trials
    states = Counter(t.state.name for t in trials)
    points = Counter(tuple(sorted(t.params.items())) for t in trials if t.state.name == "COMPLETE")
    return {"trials": len(trials), "complete": states["COMPLETE"], "failed": states["FAIL"],
            "running": states["RUNNING"], "points": len(points), "twice": sum(n - 1 for n in points.values())}  # fmt: skip


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[3:6])} exited {p.returncode}; see {log}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="sst2", help="task or TSV (default sst2)")
    ap.add_argument(
        "--profile",
        default="raspberry-pi-zero-2w",
        help="device profile; its batch cap must leave 2 batch sizes (default raspberry-pi-zero-2w)",
    )
    ap.add_argument("--kill-after", type=float, default=60.0,
                    help="seconds into the two-worker run at which the study process is killed (default 60)")  # fmt: skip
    ap.add_argument("--runs", default="workers,kill",
                    help="workers (one against two) and/or kill (killed and rerun) (default both)")  # fmt: skip
    args = ap.parse_args()
    if reason := why_not():
        sys.exit(f"error: no PostgreSQL server can be started here: {reason}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="edge_tune_workers_"))
    rows = []
    with local_postgres() as url:
        runs = (
            (("one worker, 2 threads", 1), ("two workers, 1 thread each", 2))
            if "workers" in args.runs
            else ()
        )
        for name, workers in runs:
            study = f"w{workers}"
            s = timed(tune_cmd(args, url, study, work / study, workers), work / f"{study}.log")
            rows.append((name, s, census(url, study)))
        if "kill" not in args.runs:
            return report(rows, None, work)
        cmd = tune_cmd(args, url, "kill", work / "kill", 2)
        with open(work / "kill.log", "w") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            time.sleep(args.kill_after)
            p.send_signal(signal.SIGKILL)
            p.wait()
        time.sleep(1)  # the workers and their trial processes die with it (PR_SET_PDEATHSIG)
        at_kill = census(url, "kill")
        s = timed(cmd, work / "kill_rerun.log")
        rows.append((f"two workers, killed at {args.kill_after:.0f} s, rerun", s, census(url, "kill")))
    return report(rows, at_kill, work)


def report(rows: list, at_kill: dict | None, work: Path) -> int:
    print(f"| run | wall s | trials | complete | failed | grid points (of 8) | run twice |\n|{'---|' * 7}")
    for name, s, c in rows:
        print(f"| {name} | {s:.0f} | {c['trials']} | {c['complete']} | {c['failed']} | {c['points']} | "
              f"{c['twice']} |")  # fmt: skip
    if len(rows) >= 2 and rows[1][0].startswith("two workers, 1"):
        print(f"\ntwo 1-thread workers / one 2-thread worker: {rows[1][1] / rows[0][1]:.2f}x the wall time")
    if at_kill is not None:
        print(f"at the kill: {at_kill['complete']} complete, {at_kill['running']} running (marked failed on the "
              f"rerun, whose wall time is the rest of the search only)")  # fmt: skip
    print(f"logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
