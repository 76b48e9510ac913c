"""`edge-tune`: thin verbs over the library. Errors print one line (`error: ...`) and exit 2;
--debug shows the traceback."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from .errors import EdgeTuneError
from .methods import METHODS

log = logging.getLogger("edge_tune")


def _add_train_args(p: argparse.ArgumentParser, *, data_required: bool) -> None:
    p.add_argument(
        "--data",
        required=data_required,
        default="sst2",
        help="labelled TSV (label<TAB>sentence, with header), a folder with train.tsv [+ dev.tsv], "
        "or a built-in task: sst2, cr, subj, mpqa (default: sst2)",
    )
    p.add_argument("--method", default="bitfit", help=f"{' | '.join(METHODS)} (default: bitfit)")
    p.add_argument(
        "--profile", default=None, help="device profile name or path to a .toml (default: raspberry-pi-4-4gb)"
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8; capped by the profile)")
    p.add_argument(
        "--alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/r (default 2r)"
    )
    p.add_argument(
        "--targets",
        default="q,v",
        help="LoRA target linears, comma-separated among q,k,v,o,ff1,ff2 (default q,v)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="sentences per optimizer step (default 32; capped by the profile)",
    )
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument(
        "--seq-len", type=int, default=64, help="max tokens per sentence (default 64; capped by the profile)"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps at most (default: the method's)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: the method's; BitFit 1e-2 at batch 32, scaled down linearly for smaller batches)",
    )
    p.add_argument(
        "--eval-every", type=int, default=100, help="optimizer steps between dev evaluations (default 100)"
    )
    p.add_argument(
        "--patience",
        type=int,
        default=5,
        help="dev evaluations without improvement before stopping (default 5)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--precision", default=None, help="base precision fp32|int8|int4 (default: the profile's)")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        help="optimizer steps between checkpoints to OUT.ckpt (default 50); removed when the patch is written",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from OUT.ckpt after a crash or kill (same flags)"
    )
    p.add_argument(
        "--patch-dtype",
        default="fp16",
        help="how deltas are stored: fp16 (half the KB) or fp32 (default fp16)",
    )
    g = p.add_argument_group("method hyper-parameters (each method reads its own)")
    g.add_argument("--adapter-size", type=int, default=32, help="adapter bottleneck width (default 32)")
    g.add_argument(
        "--adapter-placement",
        default="houlsby",
        help="adapter: houlsby (after attention and FFN) | pfeiffer (after FFN) (default houlsby)",
    )
    g.add_argument(
        "--tokens", type=int, default=16, help="prompt / ptuning / prefix virtual tokens (default 16)"
    )
    g.add_argument(
        "--reparam",
        type=int,
        default=128,
        help="ptuning / prefix: hidden width of the MLP that makes the prompts while training; "
        "folded away in the patch (default 128; prefix: 0 for none)",
    )
    g.add_argument("--layers", type=int, default=2, help="partial: the top layers trained (default 2)")
    g.add_argument(
        "--label-text",
        default=None,
        help="zeroshot: one description per label, comma-separated, in label order "
        "(default: the task's labels.tsv, else the label names)",
    )
    g.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="labelled training sentences a class at most, drawn with --seed (default: all)",
    )
    g = p.add_argument_group("schedule and regularisation")
    g.add_argument(
        "--schedule",
        default="linear",
        help="lr after warmup (6%% of steps): linear | cosine | exponential (to 1%%) | constant (default linear)",
    )
    g.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay on matrices (default 0)"
    )
    g.add_argument(
        "--layer-lr-decay",
        type=float,
        default=1.0,
        help="each encoder layer trains at this times the lr of the one above (default 1: off)",
    )
    g.add_argument(
        "--unfreeze-every",
        type=int,
        default=0,
        help="gradual unfreezing: one more layer, top-down, every N steps (default 0: off)",
    )
    g.add_argument("--head-init", default="random",
                   help="random | prototypes: start the head at the class means (default random)")  # fmt: skip
    p.add_argument(
        "--allow-shorter-seq",
        action="store_true",
        help="let the memory plan shorten sequences when nothing else fits the budget (default: refuse)",
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} — see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(
        prog="edge-tune", description="Adapt a quantized frozen encoder on-device; ship tiny patches."
    )
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=OneLineParser)

    p = sub.add_parser(
        "demo", help="train the SST-2 sentiment patch under the default profile, swap it in, predict"
    )
    p.add_argument("--profile", default=None, help="device profile (default: raspberry-pi-4-4gb)")
    p.add_argument(
        "--out", default="out/sst2.patch", help="where to write the patch (default out/sst2.patch)"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps at most (default: the method's)")
    p.add_argument("--method", default="lora", help=f"{' | '.join(METHODS)} (default: lora, r8 on q,v)")

    p = sub.add_parser(
        "train", help="train a patch on a labelled TSV or built-in task under a device profile"
    )
    _add_train_args(p, data_required=True)
    p.add_argument("--out", required=True, help="patch file to write (safetensors + manifest)")

    p = sub.add_parser("eval", help="accuracy of a patch on a labelled TSV or built-in task's dev set")
    p.add_argument("--patch", required=True, help="patch file")
    p.add_argument("--data", required=True, help="labelled TSV, or a built-in task (its dev.tsv)")

    p = sub.add_parser("predict", help="label and probability for each TEXT under one or more patches")
    p.add_argument(
        "--patch", required=True, action="append", help="patch file (repeat to predict with several)"
    )
    p.add_argument("texts", nargs="+", metavar="TEXT")

    sub.add_parser("profiles", help="list the shipped device profiles")
    sub.add_parser("doctor", help="which implementation each op runs, the CPU's features, the toolchain")

    p = sub.add_parser(
        "profile", help="compare methods x base precisions on memory (MB), speed (ms) and accuracy"
    )
    p.add_argument("--profile", default=None, help="device profile (default: raspberry-pi-4-4gb)")
    p.add_argument(
        "--methods", default="all", help=f"comma-separated, or all: {','.join(METHODS)} (default all)"
    )
    p.add_argument("--precisions", default="fp32,int8,int4", help="comma-separated (default fp32,int8,int4)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per configuration (default 200)")
    p.add_argument("--out", default="out/profile", help="folder for profile.json and profile.png")

    p = sub.add_parser(
        "plan", help="predict a training run's peak memory (MB), itemised, and whether it fits"
    )
    p.add_argument(
        "--profile", default=None, help="device profile name or .toml (default: raspberry-pi-4-4gb)"
    )
    p.add_argument("--method", default="bitfit", help=f"{' | '.join(METHODS)} (default: bitfit)")
    p.add_argument(
        "--batch",
        "--batch-size",
        dest="batch",
        type=int,
        default=32,
        help="micro-batch, sentences (default 32; capped by the profile)",
    )
    p.add_argument(
        "--seq-len", type=int, default=64, help="tokens per sentence (default 64; capped by the profile)"
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8; capped by the profile)")
    p.add_argument("--targets", default="q,v", help="LoRA targets among q,k,v,o,ff1,ff2 (default q,v)")
    p.add_argument("--precision", default=None, help="base precision fp32|int8|int4 (default: the profile's)")
    p.add_argument("--checkpointing", action="store_true", help="plan with activation checkpointing")
    p.add_argument("--data", default="sst2", help="task or TSV whose size the plan counts (default sst2)")
    return ap


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
    from .profiling import best_row, pareto_front, profile_grid, table

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
    rows = profile_grid(prof.name if args.profile is None else args.profile, methods, precisions, args.steps,
                        Path(args.out), progress=sys.stderr.isatty())  # fmt: skip
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
    preds = bank.predict(ds.texts, patch=name)
    acc = sum(pr.label == ds.label_names[y] for pr, y in zip(preds, ds.labels, strict=True)) / len(ds)
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
    head = ("profile", "budget_mb", "threads", "max_batch", "max_rank", "max_seq_len", "precision", "backend")
    table = [head] + [
        (p.name + (" *" if p.name == DEFAULT_PROFILE else ""), p.memory_budget_mb, p.threads, p.max_batch_size,
         p.max_rank, p.max_seq_len, p.precision, p.backend) for p in rows
    ]  # fmt: skip
    widths = [max(len(str(r[i])) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    print("* default")
    return 0


VERBS = {
    "demo": cmd_demo,
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "profiles": cmd_profiles,
    "plan": cmd_plan,
    "doctor": cmd_doctor,
    "profile": cmd_profile,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .rss import apply_process_settings

    apply_process_settings()
    handler = logging.StreamHandler(sys.stderr)  # logs and progress go to stderr, results to stdout
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return VERBS[args.verb](args) or 0
    except EdgeTuneError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the OS refused (an output folder, a device): one line, like every error
        if args.debug:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where} — check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted — no partial files were written", file=sys.stderr)
        return 130
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
