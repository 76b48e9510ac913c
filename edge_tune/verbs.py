"""What each `edge-tune` verb does, given its parsed flags (cli.py builds the parser and reports errors);
each returns the exit code."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from .errors import EdgeTuneError
from .methods import METHODS

log = logging.getLogger("edge_tune")


def _request(args, **override):
    """The RunRequest the flags ask for: each RunRequest field from the flag of the same name, where the verb
    has it."""
    import dataclasses

    from .run import RunRequest

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunRequest) if hasattr(args, f.name)}
    for name in ("targets", "label_text"):
        if isinstance(given.get(name), str):
            given[name] = tuple(t.strip() for t in given[name].split(",") if t.strip())
    if given.get("label_text") is None:
        given.pop("label_text", None)
    return RunRequest(**(given | override))


def cmd_doctor(args) -> int:
    import platform
    import shutil

    import torch

    from .kernels import KERNELS_ENV, kernel_paths
    from .ops import ALL_OPS
    from .rss import tensor_cache_summary

    flags = ""
    with contextlib.suppress(OSError):
        flags = next(
            (ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), ""
        )
    simd = [
        f
        for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "asimd", "asimddp")
        if f" {f}" in flags
    ]
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"cpu features     {', '.join(simd) or 'unknown'}")
    print(f"compiler         {shutil.which(os.environ.get('CXX', 'c++')) or 'none'}; ninja {shutil.which('ninja') or 'none'}; "
          f"nvcc {shutil.which('nvcc') or 'none'}; CUDA available: {torch.cuda.is_available()}")  # fmt: skip
    print(f"kernels          {KERNELS_ENV}={os.environ.get(KERNELS_ENV, '1')}")
    for op, where in kernel_paths(list(ALL_OPS)).items():
        print(f"  edge_tune::{op:24} {where}")
    print(f"tensor cache     {tensor_cache_summary()}")
    print("methods")
    for m in METHODS.values():
        print(f"  {m.name:10} {m.runs_on}")
    return 0


def cmd_profile(args) -> int:
    from .methods import MethodSpec
    from .profiles import PRECISIONS, load_profile
    from .profiling import RUNTIMES, best_row, pareto_front, profile_grid, table

    prof = load_profile(args.profile)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = list(METHODS) if methods == ["all"] else methods
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for m in methods:
        MethodSpec(m)  # one-line error for an unknown method, before any run
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not methods or not precisions or args.steps < 1:
        raise EdgeTuneError(f"bad grid (precisions {bad}, steps {args.steps})", None,
                            f"precisions among {', '.join(PRECISIONS)}, at least one method, --steps >= 1")  # fmt: skip
    runtimes = [r.strip() for r in (args.runtimes or f"torch,{prof.deploy}").split(",") if r.strip()]
    if any(r not in RUNTIMES for r in runtimes):
        raise EdgeTuneError(
            f"unknown runtime in {args.runtimes!r}", "--runtimes", f"choose among {', '.join(RUNTIMES)}"
        )
    rows = profile_grid(prof.name if args.profile is None else args.profile, methods, precisions, args.steps,
                        Path(args.out), progress=sys.stderr.isatty(), runtimes=runtimes)  # fmt: skip
    print(
        f"profile {prof.name}: budget {prof.memory_budget_mb} MB, {args.steps} steps each, fresh process each"
    )
    print(table(rows))
    best = best_row(rows)
    if best is not None:
        print(f"best under {prof.name}: {best['method']} on {best['precision']} (dev {best['dev_accuracy']:.4f}, "
              f"peak {best['peak_rss_mb']:.0f} MB, patch {best['patch_kb']:.1f} KB)")  # fmt: skip
    for cost, unit in (("peak_rss_mb", "MB"), ("patch_kb", "KB")):
        front = ", ".join(f"{r['method']}/{r['precision']}" for r in pareto_front(rows, cost))
        print(f"Pareto front, accuracy vs {cost.split('_')[0]} {unit}: {front}")
    print(f"wrote {Path(args.out) / 'profile.json'} and {Path(args.out) / 'profile.png'}")
    return 0 if all("error" not in r for r in rows) else 1


def cmd_plan(args) -> int:
    from .run import plan_run

    run = plan_run(args.data, _request(args, batch_size=args.batch), checkpointing=args.checkpointing)
    for w in run.warnings:
        print(f"warning: {w}", file=sys.stderr)
    plan, budget = run.asked, run.profile.memory_budget_mb
    print(f"{args.method} on a {run.precision} base, micro-batch {plan.micro_batch} x {plan.seq_len} tokens, "
          f"checkpointing {'on' if plan.checkpointing else 'off'}, profile {run.profile.name}:")  # fmt: skip
    print(plan.table(budget))
    if plan.fits(budget):
        return 0
    if run.memory is None:
        raise run.refusal
    fit = run.memory
    print(f"`edge-tune train` would run: micro-batch {fit.micro_batch} x {fit.grad_accum} accumulation, "
          f"checkpointing {'on' if fit.checkpointing else 'off'}, eval batch {fit.eval_batch}: {fit.total_mb:.0f} MB")  # fmt: skip
    return 1


def cmd_train(args) -> int:
    from .run import adapt

    r = adapt(args.data, args.out, _request(args))
    t = r.train
    print(
        f"wrote {r.patch_path} ({r.patch_bytes / 1024:.1f} KB): {args.method}, dev accuracy {t.dev_accuracy:.4f} "
        f"(best at step {t.best_step}/{t.steps}), peak RSS {t.peak_rss_mb:.0f} MB of {r.profile.memory_budget_mb} MB "
        f"budget, {r.seconds:.0f} s"
    )
    return 0


def cmd_demo(args) -> int:
    import time

    from .bank import PatchBank
    from .rss import peak_rss_mb
    from .run import adapt

    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeTuneError(f"cannot create the output folder ({e.strerror or e})", out.parent) from None
    r = adapt("sst2", out, method=args.method, profile=args.profile, steps=args.steps)
    bank = PatchBank(precision=r.profile.precision, max_rank=r.profile.max_rank)
    name = bank.load(out)
    swaps = []
    for _ in range(200):
        bank.deactivate()
        t0 = time.perf_counter()
        bank.activate(name)
        swaps.append((time.perf_counter() - t0) * 1e6)
    swaps.sort()
    sentences = [
        "a gorgeous , witty , seductive movie .",
        "the plot is nothing but boilerplate clichés from start to finish .",
        "an engrossing and surprisingly moving portrait of a family .",
        "it 's a dull , lifeless mess .",
    ]
    for s, p in zip(sentences, bank.predict(sentences), strict=True):
        print(f"  {p.label} ({'positive' if p.label == '1' else 'negative'}, p={p.probability:.3f})  {s}")
    peak = max(peak_rss_mb(), r.train.peak_rss_mb)
    budget = r.profile.memory_budget_mb
    print(f"profile          {r.profile.name} ({r.threads} threads, base {r.profile.precision})")
    print(
        f"SST-2 dev acc    {r.train.dev_accuracy:.4f}  ({args.method}, patch as stored; steps {r.train.steps}, "
        f"best at {r.train.best_step})"
    )
    print(f"patch            {out}  {r.patch_bytes / 1024:.1f} KB")
    print(f"swap (activate)  p50 {swaps[len(swaps) // 2]:.1f} us, p99 {swaps[int(len(swaps) * 0.99)]:.1f} us")
    print(f"peak RSS         {peak:.0f} MB of {budget} MB budget ({'within' if peak <= budget else 'OVER'})")
    print(f"time             {r.seconds:.0f} s (load + train + export)")
    return 0


def cmd_eval(args) -> int:
    from .bank import PatchBank
    from .data import load_task, read_tsv
    from .patch import load_patch

    patch = load_patch(args.patch)
    bank = PatchBank(precision=patch.manifest.base_precision)
    name = bank.load(args.patch)
    p = Path(args.data)
    if p.is_file():
        ds = read_tsv(p, patch.manifest.label_names)
    else:
        ds = load_task(args.data)[1]
        if ds.label_names != patch.manifest.label_names:
            ds = read_tsv(Path(ds.source).parent / "dev.tsv", patch.manifest.label_names)
    acc = bank.accuracy(ds, name)
    print(f"accuracy {acc:.4f} on {len(ds)} rows of {ds.source} ({name}, {patch.manifest.method})")
    return 0


def cmd_predict(args) -> int:
    from .bank import PatchBank
    from .patch import load_patch

    first = load_patch(args.patch[0])
    bank = PatchBank(precision=first.manifest.base_precision)
    names = [bank.load(p) for p in args.patch]
    for name in names:
        for text, p in zip(args.texts, bank.predict(args.texts, patch=name), strict=True):
            print(f"{name}\t{p.label}\t{p.probability:.4f}\t{text}")
    return 0


def cmd_profiles(args) -> int:
    from .profiles import DEFAULT_PROFILE, list_profile_names, load_profile

    rows = [load_profile(n) for n in list_profile_names()]
    head = (
        "profile",
        "budget_mb",
        "threads",
        "max_batch",
        "max_rank",
        "max_seq_len",
        "precision",
        "backend",
        "deploy",
    )
    table = [head] + [
        (p.name + (" *" if p.name == DEFAULT_PROFILE else ""), p.memory_budget_mb, p.threads, p.max_batch_size,
         p.max_rank, p.max_seq_len, p.precision, p.backend, p.deploy) for p in rows
    ]  # fmt: skip
    widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    print("* default")
    return 0


def cmd_tune(args) -> int:
    from .search import TuneRequest, tune

    split = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())  # noqa: E731
    try:
        steps = tuple(int(x) for x in split(args.steps))
    except ValueError:
        raise EdgeTuneError(f"--steps must be comma-separated step counts, got {args.steps!r}") from None
    req = TuneRequest(data=args.data, out=args.out, profile=args.profile, methods=split(args.methods),
                      trials=args.trials, timeout_s=args.timeout, storage=args.storage, study=args.study,
                      sampler=args.sampler, pruner=args.pruner, objectives=split(args.objectives), steps=steps,
                      eval_every=args.eval_every, seed=args.seed, workers=args.workers, holdout=args.holdout,
                      baseline=args.baseline)  # fmt: skip
    r = tune(req)
    states = {}
    for row in r.rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    print(f"study {req.study}: {len(r.rows)} trials ({', '.join(f'{n} {k.lower()}' for k, n in states.items())}), "
          f"{r.infeasible} pruned by the plan before training")  # fmt: skip
    if r.best is None:
        print("no trial completed within the budget")
        return 1
    b = r.best
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b.items()
                       if k not in ("number", "state", "infeasible", "baseline", "patch", "over_budget_mb"))  # fmt: skip
    print(f"best: trial {b['number'] + 1}: {params}")
    base = next((row for row in r.rows if row.get("baseline") and row["state"] == "COMPLETE"), None)
    if base is not None:
        print(
            f"baseline (edge-tune train's defaults): trial {base['number'] + 1}: {base['dev_accuracy']:.4f}"
        )
    if r.holdout:
        held = ", ".join(f"{k} {v:.4f}" for k, v in r.holdout.items() if k != "rows")
        print(f"held-out dev set ({r.holdout['rows']} rows no trial saw): {held}")
    print(f"wrote {r.best_patch}, {Path(args.out) / 'trials.csv'}, {Path(args.out) / 'trials.json'}")
    return 0


def cmd_serve(args) -> int:
    from .serve import ServeConfig
    from .serve_http import serve

    for flag, v in (
        ("--port", args.port),
        ("--queue", args.queue),
        ("--max-batch", args.max_batch),
        ("--threads", args.threads),
    ):
        if v is not None and v < 1:
            raise EdgeTuneError(f"{flag} must be at least 1, got {v}")
    if args.watch < 0 or (args.window_ms is not None and args.window_ms < 0) or args.read_timeout <= 0:
        raise EdgeTuneError("--watch and --window-ms must be 0 or more, --read-timeout more than 0")
    serve(ServeConfig(patches=args.patches, profile=args.profile, host=args.host, port=args.port,
                      batching=args.batching, window_ms=args.window_ms, max_batch=args.max_batch,
                      queue_sentences=args.queue, watch_s=args.watch, token_file=args.token_file,
                      read_timeout_s=args.read_timeout, threads=args.threads))  # fmt: skip
    return 0


def cmd_export(args) -> int:
    if args.format == "onnx":
        from .onnx_export import export_onnx

        written = export_onnx(args.out, args.patch, args.precision)
        for f in written:
            print(f"wrote {f} ({f.stat().st_size / 2**20:.2f} MB)")
        print(f"serve it without torch: edge_tune.runtime.PatchBank({str(args.out)!r})")
        return 0
    if args.format == "executorch":
        from .executorch_export import export_executorch

        if not 2 <= args.max_tokens <= 512:
            raise EdgeTuneError(f"--max-tokens {args.max_tokens} is outside 2..512", "--max-tokens")
        print("lowering to XNNPACK (about a minute on 2 cores)...", file=sys.stderr)
        for f in export_executorch(args.out, args.patch, args.max_tokens):
            print(f"wrote {f} ({f.stat().st_size / 2**20:.2f} MB)")
        return 0
    from .peft_adapter import HEAD, export_peft

    if len(args.patch) != 1:
        raise EdgeTuneError("--format peft exports one patch", "--patch", "pass exactly one --patch")
    out = export_peft(args.patch[0], args.out)
    print(f"wrote {out}: a PEFT LoRA adapter for transformers' BertModel of this base; the head (mean-pooled "
          f"here, CLS-pooled by transformers' classifier, so not transferable) is {out / HEAD}")  # fmt: skip
    return 0


def cmd_import_peft(args) -> int:
    from .patch import load_patch
    from .peft_adapter import import_peft

    out = import_peft(args.adapter, args.out, args.head_from, args.task)
    m = load_patch(out).manifest
    print(f"wrote {out}: LoRA r{m.hyper['rank']} on {','.join(m.hyper['targets'])}, labels {m.label_names}")
    return 0
