"""What `edge-tune tune` searches: the request (TuneRequest), each method's own hyper-parameters
(Method.search in the registry), its learning rate around its default, and the training options every
method shares; the grid sampler's space; and the baseline, `edge-tune train`'s defaults, as one point of
that space."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .methods import METHODS

BATCHES = (8, 16, 32, 64)  # sentences per step a trial may draw, at most the profile's cap
LR_SPAN = 10.0  # a method's lr is drawn log-uniformly within its default / LR_SPAN .. x LR_SPAN


@dataclass(frozen=True)
class TuneRequest:
    """What `edge-tune tune` searches: one field per flag."""

    data: str
    out: str
    profile: str | None = None  # a shipped profile's name or a .toml path (None: the default profile)
    methods: tuple[str, ...] = ("bitfit", "lora", "ia3", "adapter")
    trials: int = 20  # trials to finish, a resumed study's counted; one a killed run abandoned runs again
    timeout_s: float | None = None  # stop starting trials after this many seconds
    storage: str | None = None  # an Optuna storage URL (None: sqlite in `out`)
    study: str = "edge_tune"
    sampler: str = "tpe"
    pruner: str = "median"
    objectives: tuple[str, ...] = ("acc",)
    steps: tuple[int, ...] = (300, 600, 1200)  # the step counts a trial may draw
    eval_every: int = 100
    seed: int = 0
    workers: int = 1  # trials at once, each its own process with threads / workers threads
    holdout: bool = True  # search on a split of train; keep the data's dev set for the final report
    baseline: bool = True  # the first trial is `edge-tune train`'s default configuration (where in the space)


def batches(max_batch: int) -> list[int]:
    return [b for b in BATCHES if b <= max_batch] or [max_batch]


def grid(req: TuneRequest, max_batch: int) -> dict[str, list]:
    """The grid sampler's space: method x batch x steps, everything else at the method's defaults."""
    return {"method": list(req.methods), "batch_size": batches(max_batch), "steps": list(req.steps)}


def suggest(trial, req: TuneRequest, max_batch: int) -> dict:
    """A RunRequest's fields drawn for `trial`: the method, its own hyper-parameters (Method.search), its lr
    around its default, and the training options every method shares (the grid: see `grid`)."""
    from .trainer import SCHEDULES

    method = trial.suggest_categorical("method", list(req.methods))
    m = METHODS[method]
    fields = {"method": method}
    if req.sampler == "grid":
        fields["batch_size"] = trial.suggest_categorical("batch_size", batches(max_batch))
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
    fields["batch_size"] = trial.suggest_categorical("batch_size", batches(max_batch))
    fields["warmup"] = trial.suggest_float("warmup", 0.0, 0.2)
    fields["weight_decay"] = trial.suggest_float("weight_decay", 0.0, 0.1)
    fields["schedule"] = trial.suggest_categorical("schedule", list(SCHEDULES))
    fields["steps"] = trial.suggest_categorical("steps", list(req.steps))
    return fields


def baseline_params(req: TuneRequest, max_batch: int) -> dict | None:
    """The trial parameters of `edge-tune train`'s defaults (its method, or the first searched), so the
    search starts from them and its gain is measured against them; None where they are not in the space."""
    from .base import default_model_dir, read_config
    from .run import RunRequest, default_lr, method_spec

    d = RunRequest()
    method = d.method if d.method in req.methods else req.methods[0]
    m = METHODS[method]
    batch = min(d.batch_size, max_batch)
    if req.sampler == "grid" or m.default_steps not in req.steps or batch not in batches(max_batch):
        return None
    spec = method_spec(replace(d, method=method), d.rank, read_config(default_model_dir()).num_hidden_layers)
    params = {"method": method}
    for name, _, _ in m.search:  # RunRequest's None defaults resolved the way a run resolves them
        params[f"{method}.{name}"] = v if (v := getattr(d, name)) is not None else getattr(spec, name)
    return params | {f"{method}.lr": default_lr(method, batch), "batch_size": batch, "warmup": d.warmup,
                     "weight_decay": d.weight_decay, "schedule": d.schedule, "steps": m.default_steps}  # fmt: skip
