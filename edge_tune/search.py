"""`edge-tune tune`: Optuna searches the method and its hyper-parameters under a device profile's budget.

Budget first: every trial is planned (run.plan_run) before anything loads; a configuration the plan says
cannot fit is pruned before any training and recorded as infeasible with its planned MB. A feasible trial
trains in a fresh process (trial.py), so its peak RSS is its own; it reports dev
accuracy at every evaluation and the pruner may stop it there. A measured peak over the budget is a
violated constraint (the samplers' constraints_func), never a crash. The study lives in an SQLite file in
the output folder by default: running the same command again continues it, and a trial a killed run left
running is marked failed, not lost.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeTuneError
from .methods import METHODS

log = logging.getLogger("edge_tune")

STUDY_FILE = "study.db"
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = ("acc", "rss")  # dev accuracy (maximised), peak RSS MB (minimised)
BATCHES = (8, 16, 32, 64)  # sentences per step a trial may draw, at most the profile's cap
LR_SPAN = 10.0  # a method's lr is drawn log-uniformly within its default / LR_SPAN .. x LR_SPAN


@dataclass(frozen=True)
class TuneRequest:
    """What `edge-tune tune` searches: one field per flag."""

    data: str
    out: str
    profile: str | None = None  # a shipped profile's name or a .toml path (None: the default profile)
    methods: tuple[str, ...] = ("bitfit", "lora", "ia3", "adapter")
    trials: int = 20  # trials to finish (complete, pruned or failed), counting a resumed study's
    timeout_s: float | None = None  # stop starting trials after this many seconds
    storage: str | None = None  # an Optuna storage URL (None: sqlite in `out`)
    study: str = "edge_tune"
    sampler: str = "tpe"
    pruner: str = "median"
    objectives: tuple[str, ...] = ("acc",)
    steps: tuple[int, ...] = (300, 600)  # the step counts a trial may draw
    eval_every: int = 100
    seed: int = 0


@dataclass
class TuneResult:
    best_patch: Path | None
    best: dict | None  # the best trial's row (multi-objective: the most accurate on the Pareto front)
    rows: list[dict] = field(default_factory=list)
    infeasible: int = 0  # trials pruned by the plan before any training


def check_tune_request(req: TuneRequest) -> None:
    """One line for the first bad value, before any study is opened."""
    for m in req.methods:
        if m not in METHODS:
            raise EdgeTuneError(f"unknown method {m!r}", None, f"use any of {', '.join(METHODS)}")
        if METHODS[m].fit is not None:
            raise EdgeTuneError(f"method {m!r} trains nothing to search", None, "leave it out of --methods")
    problems = [
        (req.sampler not in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}, got {req.sampler!r}"),
        (req.pruner not in PRUNERS, f"--pruner must be one of {', '.join(PRUNERS)}, got {req.pruner!r}"),
        (not req.objectives or any(o not in OBJECTIVES for o in req.objectives) or req.objectives[0] != "acc",
         f"--objectives must be acc or acc,rss, got {','.join(req.objectives)!r}"),
        (not req.methods, "--methods is empty"),
        (req.trials < 1, f"--trials must be >= 1, got {req.trials}"),
        (not req.steps or min(req.steps) < 1, f"--steps must be positive step counts, got {req.steps}"),
        (req.eval_every < 1, f"--eval-every must be >= 1, got {req.eval_every}"),
    ]  # fmt: skip
    for bad, line in problems:
        if bad:
            raise EdgeTuneError(line)


def _batches(max_batch: int) -> list[int]:
    return [b for b in BATCHES if b <= max_batch] or [max_batch]


def grid(req: TuneRequest, max_batch: int) -> dict[str, list]:
    """The grid sampler's space: method x batch x steps, everything else at the method's defaults."""
    return {"method": list(req.methods), "batch_size": _batches(max_batch), "steps": list(req.steps)}


def suggest(trial, req: TuneRequest, max_batch: int) -> dict:
    """A RunRequest's fields drawn for `trial`: the method, its own hyper-parameters (Method.search), its lr
    around its default, and the training options every method shares (the grid: see `grid`)."""
    from .trainer import SCHEDULES

    method = trial.suggest_categorical("method", list(req.methods))
    m = METHODS[method]
    fields = {"method": method}
    if req.sampler == "grid":
        fields["batch_size"] = trial.suggest_categorical("batch_size", _batches(max_batch))
        fields["steps"] = trial.suggest_categorical("steps", list(req.steps))
        return fields
    for name, low, high in m.search:
        if isinstance(low, int) and isinstance(high, int):
            fields[name] = trial.suggest_int(f"{method}.{name}", low, high, log=low > 0)
        else:
            fields[name] = trial.suggest_float(f"{method}.{name}", low, high, log=low > 0)
    fields["lr"] = trial.suggest_float(
        f"{method}.lr", m.default_lr / LR_SPAN, m.default_lr * LR_SPAN, log=True
    )
    fields["batch_size"] = trial.suggest_categorical("batch_size", _batches(max_batch))
    fields["warmup"] = trial.suggest_float("warmup", 0.0, 0.2)
    fields["weight_decay"] = trial.suggest_float("weight_decay", 0.0, 0.1)
    fields["schedule"] = trial.suggest_categorical("schedule", list(SCHEDULES))
    fields["steps"] = trial.suggest_categorical("steps", list(req.steps))
    return fields


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
            "steps": ",".join(map(str, req.steps)), "sampler": req.sampler}  # fmt: skip


def storage_url(req: TuneRequest) -> str:
    return req.storage or f"sqlite:///{Path(req.out).resolve() / STUDY_FILE}"


def open_study(req: TuneRequest, max_batch: int = 64):
    """The study in `req.storage` (default: sqlite in `req.out`), created or continued. A study made for
    another base, data, profile or objectives is refused before it is touched."""
    import optuna

    url = storage_url(req)
    if req.storage is None:
        Path(req.out).mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # sqlalchemy's errors name the driver and host: keep their first line
        raise EdgeTuneError(f"cannot open storage: {str(e).splitlines()[0]}", url.split("@")[-1]) from None
    multi = len(req.objectives) > 1

    # TPE reads each trial's constraints (Trial.set_constraint: measured peak MB over the budget, <= 0 fits)
    sampler = {"tpe": lambda: optuna.samplers.TPESampler(seed=req.seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=req.seed),
               "grid": lambda: optuna.samplers.GridSampler(grid(req, max_batch), seed=req.seed)}[req.sampler]()  # fmt: skip
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
              "hyperband": optuna.pruners.HyperbandPruner(min_resource=req.eval_every),
              "none": optuna.pruners.NopPruner()}[req.pruner]  # fmt: skip
    identity = _identity(req)
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
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


def fail_abandoned(study) -> int:
    """Mark failed the trials a killed run on this host left running (their process is gone); returns how
    many. Another host's running trials are left to it."""
    import optuna

    host, n = os.uname().nodename, 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and (pid is None or not _alive(pid)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
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


def tune(req: TuneRequest) -> TuneResult:
    """Run the search until `req.trials` trials have finished (a resumed study's count) or the timeout;
    write the best patch, trials.csv / trials.json and plots to `req.out`."""
    import optuna

    from .data import load_task
    from .profiles import load_profile

    check_tune_request(req)
    prof = load_profile(req.profile)
    load_task(req.data)  # unknown or malformed data: one line before a study is opened
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trials").mkdir(exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(req, prof.max_batch_size)
    if failed := fail_abandoned(study):
        log.warning("warning: %d trial(s) a killed run left running marked failed", failed)
    t0 = time.monotonic()
    done = lambda: len([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])  # noqa: E731
    trials = req.trials
    if req.sampler == "grid":  # each point once
        trials = min(trials, math.prod(len(v) for v in grid(req, prof.max_batch_size).values()))
    while done() < trials and (req.timeout_s is None or time.monotonic() - t0 < req.timeout_s):
        trial = study.ask()
        try:
            _one_trial(study, trial, req, prof, out)
        except BaseException:  # never leave a trial running behind an error or Ctrl-C
            study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            raise
    rows = trial_rows(study)
    best = _best(study, rows)
    best_patch = None
    if best is not None and best.get("patch"):
        best_patch = out / "best.patch"
        shutil.copyfile(best["patch"], best_patch)
    write_outputs(study, rows, out)
    return TuneResult(best_patch, best, rows, sum(1 for r in rows if r.get("infeasible")))


def _one_trial(study, trial, req: TuneRequest, prof, out: Path) -> None:
    """Draw, plan and (where it fits) train one trial, and tell the study how it ended."""
    import optuna

    from .rss import trim_resident_memory
    from .run import RunRequest, check_request, plan_run
    from .trial import run_trial

    trial.set_user_attr("host", os.uname().nodename)
    trial.set_user_attr("pid", os.getpid())
    fields = suggest(trial, req, prof.max_batch_size)
    rreq = RunRequest(profile=req.profile, eval_every=req.eval_every, seed=req.seed, **fields)
    check_request(rreq)
    run = plan_run(req.data, rreq)
    if run.memory is None:  # the plan says it cannot fit: pruned before any training
        need = getattr(run.refusal, "need_mb", None) or float("nan")
        trial.set_user_attr("infeasible", True)
        trial.set_user_attr("planned_mb", round(need, 1))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        _line(study, trial.number, req, f"infeasible: plan {need:.0f} MB > {prof.memory_budget_mb} MB")
        return
    trial.set_user_attr("planned_mb", round(run.memory.total_mb, 1))
    # This process imported torch: drop its code pages, which the trial process (same files) could not
    # trim while they are shared, or its peak would read ~50 MB over a training run's (rss.py).
    trim_resident_memory()

    def prune(step: int, acc: float) -> bool:
        trial.report(acc, step)
        return trial.should_prune()

    patch = out / "trials" / f"trial_{trial.number}.patch"
    result = run_trial(fields, req.data, patch, req.profile, req.eval_every, req.seed, prune)
    _finish(study, trial, req, result, prof.memory_budget_mb)


def _finish(study, trial, req: TuneRequest, r: dict, budget_mb: float) -> None:
    import optuna

    if "error" in r:
        trial.set_user_attr("error", r["error"])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        _line(study, trial.number, req, f"failed: {r['error']}")
        return
    for k in ("peak_rss_mb", "dev_accuracy", "patch_kb", "seconds"):
        trial.set_user_attr(k, r[k])
    trial.set_user_attr("steps_run", r["steps"])  # `steps` is the drawn parameter; a pruned trial ran fewer
    trial.set_user_attr("patch", r["patch"])
    over = round(r["peak_rss_mb"] - budget_mb, 1)
    trial.set_user_attr("over_budget_mb", over)
    trial.set_constraint("peak_rss_over_budget_mb", over)
    if r["pruned"]:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        _line(study, trial.number, req, f"pruned at step {r['steps']}: dev {r['dev_accuracy']:.4f}")
        return
    values = [r["dev_accuracy"]] + ([r["peak_rss_mb"]] if len(req.objectives) > 1 else [])
    study.tell(trial, values)
    _line(study, trial.number, req, f"dev {r['dev_accuracy']:.4f}, peak {r['peak_rss_mb']:.0f} MB, "
                                    f"{r['seconds']:.0f} s")  # fmt: skip


def _line(study, number: int, req: TuneRequest, what: str) -> None:
    """One line per finished trial on stderr: number, method and parameters, outcome."""
    t = study.get_trials(deepcopy=False)[number]
    params = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                       for k, v in t.params.items() if k != "method")  # fmt: skip
    print(f"trial {number + 1}/{req.trials} {t.params.get('method')}: {what} ({params})", file=sys.stderr,
          flush=True)  # fmt: skip


def trial_rows(study) -> list[dict]:
    """Every trial as a flat row: number, state, parameters, planned and measured MB, accuracy."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "infeasible": bool(t.user_attrs.get("infeasible"))}
        row |= {k.split(".")[-1]: v for k, v in t.params.items()}
        for k in ("planned_mb", "peak_rss_mb", "over_budget_mb", "dev_accuracy", "steps_run", "patch_kb", "seconds",
                  "patch", "error"):  # fmt: skip
            if k in t.user_attrs:
                row[k] = t.user_attrs[k]
        rows.append(row)
    return rows


def _best(study, rows: list[dict]) -> dict | None:
    """The most accurate complete trial within the budget (multi-objective: on the Pareto front)."""
    ok = [r for r in rows if r["state"] == "COMPLETE" and r.get("over_budget_mb", 0) <= 0]
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        ok = [r for r in ok if r["number"] in front]
    return max(ok, key=lambda r: (r["dev_accuracy"], -r["number"]), default=None)


def write_outputs(study, rows: list[dict], out: Path) -> None:
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
    plots = [
        ("history.png", lambda: ov.plot_optimization_history(study, target=_acc, target_name="dev accuracy"))
    ]
    if len(complete) >= 2:  # fANOVA: how much of accuracy's variance each parameter explains, either way
        fanova = optuna.importance.FanovaImportanceEvaluator(seed=0)
        plots.append(("importances.png", lambda: ov.plot_param_importances(
            study, evaluator=fanova, target=_acc, target_name="dev accuracy")))  # fmt: skip
    if len(study.directions) > 1 and complete:
        plots.append(
            ("pareto.png", lambda: ov.plot_pareto_front(study, target_names=["dev accuracy", "peak MB"]))
        )
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
