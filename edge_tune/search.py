"""`edge-tune tune`: Optuna searches the method and its hyper-parameters under a device profile's budget.

Budget first: every trial is planned (run.plan_run) before anything loads; a configuration the plan says
cannot fit is pruned before any training and recorded as infeasible with its planned MB. A feasible trial
trains in a fresh process (trial.py), so its peak RSS is its own; it reports accuracy at every evaluation
and the pruner may stop it there. A measured peak over the budget is a violated constraint
(Trial.set_constraint, which TPE reads to steer away), never a crash; so is a planned one. The study (study.py) lives in an SQLite file in the output folder by
default: running the same command again continues it, and a trial a killed run left running is marked
failed and run again. `--workers J` runs J search processes on one study; a PostgreSQL URL lets workers on
other hosts join it. Trials evaluate on a validation split of train; the data's dev set is held out for
the final report (best against baseline), so the gain is not the search's own noise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import EdgeTuneError
from .methods import METHODS
from .search_space import TuneRequest, baseline_params, grid, suggest
from .study import ask_lock, best_row, counted, fail_abandoned, open_study, trial_rows, write_outputs

log = logging.getLogger("edge_tune")

SEARCH_DATA = "search_data"  # the trials' train / validation split when the dev set is held out
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = ("acc", "rss")  # dev accuracy (maximised), peak RSS MB (minimised)


@dataclass
class TuneResult:
    best_patch: Path | None
    best: dict | None  # the best trial's row (multi-objective: the most accurate on the Pareto front)
    rows: list[dict] = field(default_factory=list)
    infeasible: int = 0  # trials pruned by the plan before any training
    holdout: dict = field(default_factory=dict)  # {"best": acc, "baseline": acc} on the held-out dev set


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
        (req.workers < 1, f"--workers must be >= 1, got {req.workers}"),
    ]  # fmt: skip
    for bad, line in problems:
        if bad:
            raise EdgeTuneError(line)


def tune(req: TuneRequest) -> TuneResult:
    """Run the search until `req.trials` trials have finished (a resumed study's count) or the timeout;
    write the best patch, trials.csv / trials.json and plots to `req.out`; with `req.holdout`, report the
    best and the baseline trial's accuracy on the data's dev set, which no trial saw."""
    import optuna

    from .data import load_task
    from .profiles import load_profile

    check_tune_request(req)
    prof = load_profile(req.profile)
    train_ds, dev_ds = load_task(req.data, seed=req.seed)  # unknown or malformed data: one line, no study
    out = Path(req.out)
    (out / "trials").mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(req, prof.max_batch_size)
    if failed := fail_abandoned(study):
        log.warning("warning: %d trial(s) a killed run left running marked failed; they run again", failed)
    if req.holdout:
        write_search_split(train_ds, dev_ds, out / SEARCH_DATA, req.seed)
    if req.baseline and not study.trials and (params := baseline_params(req, prof.max_batch_size)):
        study.enqueue_trial(params, user_attrs={"baseline": True})
    if req.workers == 1:
        search(study, req, prof)
    else:
        run_workers(req, prof)
    rows = trial_rows(study)
    best = best_row(study, rows)
    best_patch = None
    if best is not None and best.get("patch"):
        best_patch = out / "best.patch"
        shutil.copyfile(best["patch"], best_patch)
    held = {}
    if req.holdout and best_patch is not None:
        from .bank import patch_accuracy

        baseline = next((r for r in rows if r.get("baseline") and r.get("patch")), None)
        held = {"rows": len(dev_ds), "best": patch_accuracy(best_patch, dev_ds)}
        if baseline is not None:
            held["baseline"] = patch_accuracy(baseline["patch"], dev_ds)
        (out / "holdout.json").write_text(json.dumps(held, indent=1))
    write_outputs(study, rows, out, "validation accuracy" if req.holdout else "dev accuracy")
    return TuneResult(best_patch, best, rows, sum(1 for r in rows if r.get("infeasible")), held)


def search(study, req: TuneRequest, prof, threads: int | None = None) -> None:
    """Ask, plan and train trials until the study has `req.trials` counted ones or the timeout passes.
    Several processes may run this on one study: asking is locked per output folder, so no two ask past
    the count."""
    import optuna

    t0 = time.monotonic()
    target = req.trials
    if req.sampler == "grid":  # each point once
        target = min(target, math.prod(len(v) for v in grid(req, prof.max_batch_size).values()))
    while req.timeout_s is None or time.monotonic() - t0 < req.timeout_s:
        with ask_lock(Path(req.out)):
            if counted(study) >= target:
                return
            trial = study.ask()
        try:
            _one_trial(study, trial, req, prof, threads)
        except BaseException:  # never leave a trial running behind an error or Ctrl-C
            study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            raise


def run_workers(req: TuneRequest, prof) -> None:
    """`req.workers` processes searching one study, the profile's threads split between them."""
    from .rss import trim_resident_memory
    from .trial import die_with_parent

    threads = max(1, min(prof.threads, os.cpu_count() or 1) // req.workers)
    # This process imported torch; a page of it that stays mapped here cannot be trimmed by a trial process
    # mapping it too, and would count in that trial's peak (measured ~50 MB over plan before this)
    trim_resident_memory()
    spec = json.dumps(asdict(req))
    main = "import sys; from edge_tune.search import worker_main; sys.exit(worker_main(sys.argv[1:]))"
    procs = [subprocess.Popen([sys.executable, "-c", main, spec, str(threads), str(i)],
                              preexec_fn=die_with_parent) for i in range(req.workers)]  # fmt: skip
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.kill()
        raise
    if any(codes):
        raise EdgeTuneError(f"a search worker exited {max(codes, key=abs)}", req.out, "see its lines above")


def worker_main(argv: list[str]) -> int:
    """A worker process of run_workers (REQUEST_JSON THREADS INDEX): the study exists (tune opened it);
    search it, sampling with its own seed so that workers do not draw the same points."""
    import optuna

    from .profiles import load_profile

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fields = json.loads(argv[0])
    req = TuneRequest(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    prof = load_profile(req.profile)
    try:
        study = open_study(req, prof.max_batch_size, sampler_seed=req.seed + int(argv[2]))
        search(study, req, prof, int(argv[1]))
    except EdgeTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def write_search_split(train, dev, folder: Path, seed: int) -> None:
    """The trials' data: train less a seeded validation split the size of dev (at most a tenth of train),
    which they evaluate on; `dev` itself stays unseen. Written the same on every run with the same seed."""
    from .data import split_dev

    fit, val = split_dev(train, min(len(dev), len(train) // 10) / len(train), seed)
    folder.mkdir(exist_ok=True)
    for name, ds in (("train.tsv", fit), ("dev.tsv", val)):
        body = "".join(f"{ds.label_names[y]}\t{t}\n" for t, y in zip(ds.texts, ds.labels, strict=True))
        tmp = folder / (name + ".tmp")
        tmp.write_text("label\tsentence\n" + body, encoding="utf-8")
        tmp.replace(folder / name)
    descriptions = Path(train.source).with_name("labels.tsv")  # label_descriptions reads it beside train.tsv
    if descriptions.is_file():
        shutil.copyfile(descriptions, folder / "labels.tsv")


def _one_trial(study, trial, req: TuneRequest, prof, threads: int | None) -> None:
    """Draw, plan and (where it fits) train one trial, and tell the study how it ended."""
    import optuna

    from .rss import trim_resident_memory
    from .run import RunRequest, check_request, plan_run
    from .trial import run_trial

    trial.set_user_attr("host", os.uname().nodename)
    trial.set_user_attr("pid", os.getpid())
    fields = suggest(trial, req, prof.max_batch_size) | ({"threads": threads} if threads else {})
    rreq = RunRequest(profile=req.profile, eval_every=req.eval_every, seed=req.seed, **fields)
    check_request(rreq)
    out = Path(req.out)
    data = str(out / SEARCH_DATA) if req.holdout else req.data
    run = plan_run(data, rreq)
    if run.memory is None:  # the plan says it cannot fit: pruned before any training
        need = getattr(run.refusal, "need_mb", None) or float("nan")
        trial.set_user_attr("infeasible", True)
        trial.set_user_attr("planned_mb", round(need, 1))
        if math.isfinite(need):  # TPE ranks a violated constraint below every feasible trial
            trial.set_constraint("peak_rss_over_budget_mb", round(need - prof.memory_budget_mb, 1))
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
    result = run_trial(fields, data, patch, req.profile, req.eval_every, req.seed, prune)
    _finish(study, trial, req, result, prof.memory_budget_mb)


def _finish(study, trial, req: TuneRequest, r: dict, budget_mb: float) -> None:
    import optuna

    if "error" in r:
        trial.set_user_attr("error", r["error"])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        _line(study, trial.number, req, f"failed: {r['error']}")
        return
    for k in ("peak_rss_mb", "dev_accuracy", "patch_kb", "seconds", "threads"):
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
    print(f"trial {number + 1} [{counted(study)}/{req.trials}] {t.params.get('method')}: {what} ({params})",
          file=sys.stderr, flush=True)  # fmt: skip
