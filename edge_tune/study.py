"""The Optuna study behind `edge-tune tune`: its storage (SQLite in the output folder unless a URL is given),
what it is bound to (base, data, profile, space), trials a killed run abandoned, the count toward --trials,
and what it leaves: trials.csv / trials.json and the plots."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import os
import warnings
from pathlib import Path

from .errors import EdgeTuneError
from .search_space import TuneRequest, grid

log = logging.getLogger("edge_tune")

STUDY_FILE = "study.db"


def _identity(req: TuneRequest) -> dict:
    """What a study is bound to: rerunning with another base, data, profile or search space is refused. The
    base by its weights file's sha256 (the same on every host a shared study's workers run on)."""
    import hashlib

    from .base import default_model_dir
    from .profiles import load_profile

    h = hashlib.sha256()
    with open(default_model_dir() / "model.safetensors", "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    # The choices a categorical parameter draws from are fixed for a study's life (Optuna refuses a change)
    return {"data": str(req.data), "profile": load_profile(req.profile).name, "base": h.hexdigest()[:16],
            "objectives": ",".join(req.objectives), "methods": ",".join(req.methods),
            "steps": ",".join(map(str, req.steps)), "sampler": req.sampler, "holdout": req.holdout}  # fmt: skip


def storage_url(req: TuneRequest) -> str:
    return req.storage or f"sqlite:///{Path(req.out).resolve() / STUDY_FILE}"


def open_study(req: TuneRequest, max_batch: int = 64, sampler_seed: int | None = None):
    """The study in `req.storage` (default: sqlite in `req.out`), created or continued. A study made for
    another base, data, profile or objectives is refused before it is touched. The sampler draws with
    `sampler_seed` (default: the request's seed)."""
    import optuna

    url = storage_url(req)
    if req.storage is None:
        Path(req.out).mkdir(parents=True, exist_ok=True)
    try:
        # SQLite: --workers processes share the file (trials take minutes, writes are few); wait for a lock
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # sqlalchemy's errors name the driver and host: keep their first line
        raise EdgeTuneError(f"cannot open storage: {str(e).splitlines()[0]}", url.split("@")[-1]) from None
    multi = len(req.objectives) > 1
    identity = _identity(req)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    # A continued study's sampler must not replay the draws its first run made from the same seed
    done = existing[req.study].n_trials if req.study in existing else 0
    seed = (req.seed if sampler_seed is None else sampler_seed) + 1009 * done

    # TPE reads each trial's constraints (Trial.set_constraint: measured peak MB over the budget, <= 0 fits)
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=seed),
               # one grid order for every worker and every resume: a grid point's id is its index in it
               "grid": lambda: _grid_sampler(grid(req, max_batch), req.seed)}[req.sampler]()  # fmt: skip
    # Never at the first evaluation (Optuna prunes from step == n_warmup_steps): there accuracy mostly says
    # how short a trial's warmup and schedule are (a 1200-step run that ends best is often behind a
    # 300-step one at step 100)
    warmup = 2 * req.eval_every
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup),
              "hyperband": optuna.pruners.HyperbandPruner(min_resource=req.eval_every),
              "none": optuna.pruners.NopPruner()}[req.pruner]  # fmt: skip
    if req.study in existing:
        made_for = existing[req.study].user_attrs.get("identity", {})
        diff = sorted(k for k in identity.keys() | made_for.keys() if identity.get(k) != made_for.get(k))
        if diff:
            raise EdgeTuneError(f"study {req.study!r} was made with another {', '.join(diff)}", url.split("@")[-1],
                                "use another --study or --out, or the flags it was made with")  # fmt: skip
    study = optuna.create_study(study_name=req.study, storage=storage, sampler=sampler, pruner=pruner,
                                directions=["maximize", "minimize"] if multi else ["maximize"],
                                load_if_exists=True)  # fmt: skip
    study.set_user_attr("identity", identity)
    return study


def _grid_sampler(space: dict, seed: int):
    """Optuna's grid sampler, less its study.stop() when the grid is done: that call raises outside
    study.optimize(), and this search's own loop (search.search) stops at the grid's size."""
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            pass

    return GridSampler(space, seed=seed)


def fail_abandoned(study) -> int:
    """Mark failed the trials a killed run on this host left running (their process is gone) and queue
    each one's parameters to run again, first (the grid sampler counts a failed point as visited, so it
    would not); returns how many. Another host's running trials are left to it."""
    import optuna

    host, n = os.uname().nodename, 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and (pid is None or not _alive(pid)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            if t.params:
                again = {"rerun_of": t.number} | ({"baseline": True} if t.user_attrs.get("baseline") else {})
                study.enqueue_trial(t.params, user_attrs=again)
            n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        pass
    return True


def counted(study) -> int:
    """Trials that count toward --trials: every asked one except those a killed run abandoned (failed with
    no error of their own), which run again."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING
               and not (t.state == TrialState.FAIL and "error" not in t.user_attrs))  # fmt: skip


@contextlib.contextmanager
def ask_lock(out: Path):
    with open(out / ".ask.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def trial_rows(study) -> list[dict]:
    """Every trial as a flat row: number, state, parameters, planned and measured MB, accuracy."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "infeasible": bool(t.user_attrs.get("infeasible")),
               "baseline": bool(t.user_attrs.get("baseline"))}  # fmt: skip
        row |= {k.split(".")[-1]: v for k, v in t.params.items()}
        for k in ("planned_mb", "peak_rss_mb", "over_budget_mb", "dev_accuracy", "steps_run", "patch_kb", "seconds",
                  "threads", "rerun_of", "patch", "error"):  # fmt: skip
            if k in t.user_attrs:
                row[k] = t.user_attrs[k]
        rows.append(row)
    return rows


def best_row(study, rows: list[dict]) -> dict | None:
    """The most accurate complete trial within the budget (multi-objective: on the Pareto front)."""
    ok = [r for r in rows if r["state"] == "COMPLETE" and r.get("over_budget_mb", 0) <= 0]
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        ok = [r for r in ok if r["number"] in front]
    return max(ok, key=lambda r: (r["dev_accuracy"], -r["number"]), default=None)


def write_outputs(study, rows: list[dict], out: Path, metric: str = "dev accuracy") -> None:
    """trials.json, trials.csv and, with matplotlib, the optimisation history, parameter importances and
    (multi-objective) the Pareto front as PNGs."""
    (out / "trials.json").write_text(json.dumps(rows, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna
        from optuna.visualization import matplotlib as ov
    except ImportError:
        log.warning("warning: matplotlib is not installed; no plots")
        return
    plots = [("history.png", lambda: ov.plot_optimization_history(study, target=_acc, target_name=metric))]
    if len(complete) >= 2:  # fANOVA: how much of accuracy's variance each parameter explains, either way
        fanova = optuna.importance.FanovaImportanceEvaluator(seed=0)
        plots.append(("importances.png", lambda: ov.plot_param_importances(
            study, evaluator=fanova, target=_acc, target_name=metric)))  # fmt: skip
    if len(study.directions) > 1 and complete:
        plots.append(("pareto.png", lambda: ov.plot_pareto_front(study, target_names=[metric, "peak MB"])))
    for name, make in plots:
        try:
            with warnings.catch_warnings():  # optuna marks its matplotlib plots experimental
                warnings.simplefilter("ignore")
                make()
            plt.gcf().set_size_inches(8, 5)
            plt.savefig(out / name, dpi=100, bbox_inches="tight")
        except (ValueError, RuntimeError) as e:  # too few trials of a kind for that plot
            log.warning("warning: no %s: %s", name, str(e).splitlines()[0])
        finally:
            plt.close("all")


def _acc(t) -> float:
    return t.values[0]
