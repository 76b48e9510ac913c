"""`edge-tune tune`: budget-first pruning, the study continued by the same command, abandoned trials marked
failed, another data's study refused untouched, outputs and one-line errors. Tiny data and 2-step trials:
these check the search's bookkeeping, not what it finds (BENCHMARKS.md has that)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from edge_tune.errors import EdgeTuneError  # noqa: E402
from edge_tune.search import TuneRequest, open_study, tune  # noqa: E402
from edge_tune.search_space import suggest  # noqa: E402

QUICK = dict(methods=("bitfit", "lora"), steps=(2,), eval_every=1, pruner="none")  # bookkeeping, not pruning


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
    drawn = lambda row: {k: v for k, v in row.items() if "." in k or k in ("method", "batch_size", "warmup")}  # noqa: E731
    assert drawn(again.rows[2]) != drawn(
        first.rows[0]
    )  # the continued sampler does not replay its first draws
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
    suggest(trial, req, 32)
    trial.set_user_attr("host", os.uname().nodename)
    trial.set_user_attr("pid", gone.pid)
    r = tune(req)
    # the abandoned one is failed and does not count: it runs again (same parameters), and two trials finish
    assert [row["state"] for row in r.rows] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert r.rows[1]["rerun_of"] == 0 and study.trials[1].params == study.trials[0].params


@pytest.mark.parametrize("sampler", ["tpe", "grid"])
def test_kill_9_mid_trial_then_rerun_completes_the_study(tsv, tmp_path, sampler):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "edge_tune.cli", "tune", "--data", str(tsv), "--out", str(out), "--trials", "2",
           "--methods", "bitfit", "--steps", "40", "--eval-every", "40", "--sampler", sampler]  # fmt: skip
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
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE", "COMPLETE"]  # interrupted: failed, run again
    assert rows[1]["rerun_of"] == 0 and rows[1]["batch_size"] == rows[0]["batch_size"]
    if sampler == "grid":  # two different grid points, each once
        assert rows[1]["batch_size"] != rows[2]["batch_size"]


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
        (["--workers", "0"], "--workers must be >= 1"),
        (["--storage", "sqlite:////proc/nope/x.db"], "cannot open storage"),
        (["--storage", "postgresql+psycopg2://postgres@127.0.0.1:1/none"], "cannot open storage"),
    ],
)
def test_bad_tune_input_is_one_line_and_exit_2(tsv, tmp_path, flags, message):
    p = subprocess.run([sys.executable, "-m", "edge_tune.cli", "tune", "--data", str(tsv), "--out",
                        str(tmp_path / "o"), *flags], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_two_workers_share_one_study_each_trial_once_with_split_threads(tsv, tmp_path):
    out = tmp_path / "study"
    r = tune(TuneRequest(str(tsv), str(out), trials=4, workers=2, **QUICK))
    assert [row["number"] for row in r.rows] == [0, 1, 2, 3]
    assert [row["state"] for row in r.rows] == ["COMPLETE"] * 4
    assert len({row["patch"] for row in r.rows}) == 4
    study = open_study(TuneRequest(str(tsv), str(out), **QUICK))
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers took trials
    assert [row["threads"] for row in r.rows] == [1] * 4  # 2 cores split between 2 workers


def test_the_dev_set_is_held_out_and_reported_at_the_end(tmp_path):
    from conftest import SENTENCES, write_tsv

    from edge_tune.data import load_task

    tsv = write_tsv(tmp_path / "unique.tsv", [(y, f"{s} {i}") for i, (y, s) in enumerate(SENTENCES * 4)])
    out = tmp_path / "study"
    r = tune(TuneRequest(str(tsv), str(out), trials=1, **QUICK))
    train, dev = load_task(str(tsv))
    fit, val = load_task(out / "search_data")
    assert len(fit) + len(val) == len(train) and len(val) == min(len(dev), len(train) // 10)
    assert not set(dev.texts) & (set(fit.texts) | set(val.texts))  # no trial saw the held-out rows
    assert sorted(fit.texts + val.texts) == sorted(train.texts)
    assert r.holdout["rows"] == len(dev) and 0 <= r.holdout["best"] <= 1
    assert json.loads((out / "holdout.json").read_text()) == r.holdout


@pytest.mark.parametrize("method", ["bitfit", "lora"])
def test_the_baseline_trial_trains_exactly_the_train_defaults(tsv, tmp_path, method):
    from edge_tune.methods import METHODS
    from edge_tune.run import RunRequest, default_lr
    from edge_tune.search_space import baseline_params, suggest

    steps = METHODS[method].default_steps
    req = TuneRequest(str(tsv), str(tmp_path / "o"), methods=(method, "ia3"), steps=(100, steps))
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(baseline_params(req, 32))
    fields = suggest(study.ask(), req, 32)
    d = RunRequest(method=method)
    want = {"method": method, "lr": default_lr(method, d.batch_size), "batch_size": d.batch_size,
            "warmup": d.warmup, "weight_decay": d.weight_decay, "schedule": d.schedule, "steps": steps}  # fmt: skip
    if method == "lora":
        want |= {"rank": d.rank, "alpha": 2.0 * d.rank}  # RunRequest's alpha None means 2r
    assert fields == want
    assert (
        baseline_params(TuneRequest(str(tsv), "o", methods=(method,), steps=(100,)), 32) is None
    )  # not in space


@pytest.fixture
def postgres_url():
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    try:
        from local_postgres import local_postgres, why_not
    finally:
        sys.path.pop(0)
    if reason := why_not():
        pytest.skip(f"no PostgreSQL server here: {reason}")
    with local_postgres() as url:
        yield url


def test_workers_share_a_study_on_a_real_postgresql_server(tsv, tmp_path, postgres_url):
    req = TuneRequest(str(tsv), str(tmp_path / "a"), trials=4, workers=2, storage=postgres_url, **QUICK)
    r = tune(req)
    assert [row["number"] for row in r.rows] == [0, 1, 2, 3]
    assert [row["state"] for row in r.rows] == ["COMPLETE"] * 4
    # another host's worker (another --out) joins the same study through the URL: it runs only what is left
    more = tune(TuneRequest(str(tsv), str(tmp_path / "b"), trials=5, storage=postgres_url, **QUICK))
    assert len(more.rows) == 5 and more.rows[:4] == r.rows
    study = optuna.load_study(study_name="edge_tune", storage=postgres_url)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 3  # two workers, then the joining process


def test_a_pruned_trial_stops_at_the_evaluation_that_pruned_it(tsv, tmp_path):
    from edge_tune.trial import run_trial

    asked = []

    def prune(step, acc):
        asked.append(step)
        return step >= 20

    r = run_trial(
        {"method": "bitfit", "steps": 60, "batch_size": 8}, str(tsv), tmp_path / "t.patch", None, 10, 0, prune
    )
    assert (
        asked == [10, 20] and r["pruned"] and r["steps"] == 20
    )  # no step trained after the pruning evaluation
    assert (tmp_path / "t.patch").is_file()  # the best so far is still a patch


def test_the_median_pruner_waits_past_the_first_evaluation(tsv, tmp_path):
    study = open_study(
        TuneRequest(
            str(tsv),
            str(tmp_path / "s"),
            eval_every=50,
            **{k: v for k, v in QUICK.items() if k not in ("eval_every", "pruner")},
        )
    )
    assert study.pruner._n_warmup_steps == 100  # prunes from step 100, the second evaluation


def test_a_grid_search_runs_every_point_once_to_the_end(tsv, tmp_path):
    r = tune(TuneRequest(str(tsv), str(tmp_path / "g"), sampler="grid", trials=10, methods=("bitfit",), steps=(2,),
                         eval_every=1))  # fmt: skip
    assert [row["state"] for row in r.rows] == ["COMPLETE"] * 3  # batch 8, 16, 32 under the default cap
    assert sorted(row["batch_size"] for row in r.rows) == [8, 16, 32]


def test_every_worker_and_resume_shares_one_grid_order(tsv, tmp_path):
    req = TuneRequest(str(tsv), str(tmp_path / "g"), sampler="grid", **QUICK)
    orders = {tuple(open_study(req, 32, sampler_seed=s).sampler._all_grids) for s in (0, 1, 2018)}
    assert len(orders) == 1  # Optuna shuffles the grid by the seed; a point's id must mean one point
