"""`edge-tune tune`: budget-first pruning, the study continued by the same command, abandoned trials marked
failed, another data's study refused untouched, outputs and one-line errors. Tiny data and 2-step trials:
these check the search's bookkeeping, not what it finds (BENCHMARKS.md has that)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

optuna = pytest.importorskip("optuna")

from edge_tune.errors import EdgeTuneError  # noqa: E402
from edge_tune.search import TuneRequest, open_study, tune  # noqa: E402

QUICK = dict(methods=("bitfit", "lora"), steps=(2,), eval_every=1)


def test_study_runs_continues_and_writes_a_loadable_best_patch(tsv, tmp_path):
    from edge_tune.base import load_base
    from edge_tune.patch import load_patch

    out = tmp_path / "study"
    first = tune(TuneRequest(str(tsv), str(out), trials=2, **QUICK))
    assert [r["state"] for r in first.rows] == ["COMPLETE", "COMPLETE"]
    assert all(r["planned_mb"] > 100 and r["peak_rss_mb"] > 100 for r in first.rows)
    again = tune(
        TuneRequest(str(tsv), str(out), trials=3, **QUICK)
    )  # the same study: one more trial, not three
    assert len(again.rows) == 3 and again.rows[:2] == first.rows[:2]
    assert load_patch(again.best_patch, load_base()).manifest.method == again.best["method"]
    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == 3 and (out / "trials.csv").read_text().count("\n") == 4
    assert (out / "history.png").stat().st_size > 0


def test_configurations_the_plan_refuses_are_pruned_before_training(tsv, tmp_path):
    out = tmp_path / "study"
    r = tune(TuneRequest(str(tsv), str(out), profile="raspberry-pi-zero-2w", methods=("full",), trials=2,
                         steps=(2,), eval_every=1))  # fmt: skip
    assert r.infeasible == 2 and r.best is None
    assert all(row["state"] == "PRUNED" and row["infeasible"] and row["planned_mb"] > 400 for row in r.rows)
    assert not list((out / "trials").glob("*.patch"))  # nothing trained


def test_a_trial_a_killed_run_left_running_is_marked_failed(tsv, tmp_path):
    req = TuneRequest(str(tsv), str(tmp_path / "study"), trials=2, **QUICK)
    study = open_study(req)
    gone = subprocess.Popen(["true"])
    gone.wait()
    trial = study.ask()
    trial.set_user_attr("host", os.uname().nodename)
    trial.set_user_attr("pid", gone.pid)
    r = tune(req)
    assert [row["state"] for row in r.rows] == ["FAIL", "COMPLETE"]  # the abandoned one counts as finished


def test_kill_9_mid_trial_then_rerun_completes_the_study(tsv, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "edge_tune.cli", "tune", "--data", str(tsv), "--out", str(out), "--trials", "2",
           "--methods", "bitfit", "--steps", "40", "--eval-every", "40"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (_running(out) and _trial_processes(out)):
        time.sleep(0.2)
    time.sleep(0.5)  # the first trial's process is starting (imports, base) or training: mid-trial either way
    proc.send_signal(signal.SIGKILL)  # the study process only: its trial process must not outlive it
    proc.wait()
    time.sleep(1)
    assert not _trial_processes(out), "a trial process outlived its killed study process"
    done = subprocess.run(cmd, capture_output=True, text=True)  # the same command continues the study
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "trials.json").read_text())
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE"]


def _trial_processes(out) -> str:
    found = subprocess.run(["pgrep", "-f", f"edge_tune.trial .*{out}"], capture_output=True, text=True)
    return found.stdout.strip()


def _running(out) -> bool:
    if not (out / "study.db").is_file():
        return False
    try:
        study = optuna.load_study(study_name="edge_tune", storage=f"sqlite:///{out / 'study.db'}")
    except Exception:  # created but not yet initialised
        return False
    return any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)


def test_a_study_made_for_other_data_is_refused_untouched(tsv, tmp_path):
    out = tmp_path / "study"
    tune(TuneRequest(str(tsv), str(out), trials=1, **QUICK))
    other = tsv.with_name("other.tsv")
    other.write_text(tsv.read_text())
    with pytest.raises(EdgeTuneError, match="made with another data"):
        tune(TuneRequest(str(other), str(out), trials=2, **QUICK))
    with pytest.raises(EdgeTuneError, match="made with another methods, steps"):
        tune(TuneRequest(str(tsv), str(out), trials=2, methods=("lora",), steps=(3,), eval_every=1))
    assert len(open_study(TuneRequest(str(tsv), str(out), **QUICK)).trials) == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--methods", "zeroshot"], "trains nothing to search"),
        (["--sampler", "bayes"], "--sampler must be one of"),
        (["--objectives", "rss"], "--objectives must be acc or acc,rss"),
        (["--steps", "ten"], "--steps must be comma-separated step counts"),
        (["--trials", "0"], "--trials must be >= 1"),
        (["--storage", "sqlite:////proc/nope/x.db"], "cannot open storage"),
    ],
)
def test_bad_tune_input_is_one_line_and_exit_2(tsv, tmp_path, flags, message):
    p = subprocess.run([sys.executable, "-m", "edge_tune.cli", "tune", "--data", str(tsv), "--out",
                        str(tmp_path / "o"), *flags], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
