"""`edge-tune`: the flags of every verb (verbs.py does the work, thin over the library). Errors print one
line (`error: ...`) and exit 2; --debug shows the traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from .rss import set_openmp_spin

set_openmp_spin()  # here, before `verbs` imports torch: libgomp reads it once, as torch loads it
from . import verbs  # noqa: E402
from .errors import EdgeTuneError  # noqa: E402
from .methods import METHODS  # noqa: E402

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
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads at most (default: the profile's; never more than it allows)")  # fmt: skip
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
        help="zeroshot, fewshot: one description per label, comma-separated, in label order "
        "(default: the task's labels.tsv, else the label names)",
    )
    g.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="labelled training sentences a class at most, drawn with --seed (default: all)",
    )
    g = p.add_argument_group("schedule and regularisation")
    g.add_argument("--warmup", type=float, default=0.06,
                   help="fraction of the steps with a linear lr warmup (default 0.06)")  # fmt: skip
    g.add_argument(
        "--schedule",
        default="linear",
        help="lr after warmup: linear | cosine | exponential (to 1%%) | constant (default linear)",
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
                   help="random | prototypes: start the head at the class prototypes (default random)")  # fmt: skip
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
    p.add_argument("--runtimes", default=None,
                   help="comma-separated among torch,onnxruntime,executorch: also serve each trained int8 patch "
                        "an exported runtime takes there, a row each (default: torch and the profile's deploy)")  # fmt: skip
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

    p = sub.add_parser("tune", help="search method and hyper-parameters with Optuna under the memory budget")
    p.add_argument("--data", default="sst2", help="built-in task or labelled TSV (default sst2)")
    p.add_argument(
        "--profile", default=None, help="device profile name or .toml (default: raspberry-pi-4-4gb)"
    )
    p.add_argument("--methods", default="bitfit,lora,ia3,adapter",
                   help="comma-separated methods searched (default bitfit,lora,ia3,adapter)")  # fmt: skip
    p.add_argument("--trials", type=int, default=20,
                   help="trials to finish, a resumed study's included; one a killed run left is failed "
                        "and run again (default 20)")  # fmt: skip
    p.add_argument("--workers", type=int, default=1,
                   help="trials at once, each in its own process with the profile's threads split between "
                        "them; each needs the budget (default 1)")  # fmt: skip
    p.add_argument("--no-holdout", dest="holdout", action="store_false",
                   help="evaluate trials on the data's dev set (default: on a validation split of train, "
                        "the dev set held out for the final report)")  # fmt: skip
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="do not start from `edge-tune train`'s default configuration as the first trial")  # fmt: skip
    p.add_argument("--timeout", type=float, default=None, help="seconds after which no new trial starts")
    p.add_argument("--storage", default=None,
                   help="an Optuna RDB storage URL, e.g. postgresql://user@host/db to share the study with "
                        "workers on other hosts (default: sqlite:///OUT/study.db)")  # fmt: skip
    p.add_argument("--study", default="edge_tune", help="study name within the storage (default edge_tune)")
    p.add_argument("--sampler", default="tpe",
                   help="tpe | random | grid (method x batch x steps at default settings) (default tpe)")  # fmt: skip
    p.add_argument("--pruner", default="median", help="median | hyperband | none (default median)")
    p.add_argument("--objectives", default="acc",
                   help="acc (dev accuracy) or acc,rss (and peak RSS MB: a Pareto front) (default acc)")  # fmt: skip
    p.add_argument(
        "--steps",
        default="300,600,1200",
        help="optimizer step counts a trial draws from (default 300,600,1200)",
    )
    p.add_argument("--eval-every", type=int, default=100,
                   help="steps between dev evaluations, where the pruner may stop a trial (default 100)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampler and training seed (default 0)")
    p.add_argument(
        "--out", default="out/tune", help="folder for study.db, best.patch, trials.csv/json, plots"
    )

    p = sub.add_parser("export", help="deploy to another runtime: the base as an ONNX graph with patches as "
                                      "ONNX Runtime adapters, or a patch as a PEFT LoRA adapter")  # fmt: skip
    p.add_argument("--format", required=True, choices=["onnx", "executorch", "peft"],
                   help="onnx: model.onnx (the base, exported once; int8 weights, per-token int8 activations) + "
                        "tokenizer.json + <task>.onnx_adapter per --patch, served by edge_tune.runtime without "
                        "torch; executorch: model.pte (XNNPACK, int8 dynamic linears) + model.ptd (weights) + "
                        "<task>.inputs per --patch, batch 1, 2 to --max-tokens tokens; peft: adapter_config.json + "
                        "adapter_model.safetensors for PeftModel.from_pretrained")  # fmt: skip
    p.add_argument("--patch", action="append", default=[],
                   help="a patch to export (repeat for several; onnx: lora, bitfit, ia3, head, prompt, prefix "
                        "patches; peft: one LoRA patch)")  # fmt: skip
    p.add_argument("--precision", default="int8", choices=["int8", "fp32"],
                   help="onnx: the graph's weights (int8: 22 MB, fp32: 86 MB; default int8)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=128,
                   help="executorch: the longest sentence the program takes, tokens (default 128)")  # fmt: skip
    p.add_argument("--out", required=True, help="folder to write")

    p = sub.add_parser("import-peft", help="a PEFT LoRA adapter folder for this base, as a patch")
    p.add_argument("adapter", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--out", required=True, help="the patch file to write")
    p.add_argument("--head-from", default=None,
                   help="a patch whose head and labels to use (default: the folder's edge_tune_head.safetensors)")  # fmt: skip
    p.add_argument("--task", default="", help="task name in the manifest (default: the folder's name)")

    p = sub.add_parser("serve", help="serve predictions over HTTP from a folder of patches (hot-swapped)")
    p.add_argument("--patches", required=True, help="folder of .patch files, each loaded under its file name")
    p.add_argument(
        "--profile", default=None, help="device profile name or .toml (default: raspberry-pi-4-4gb)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this device only)"
    )
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--window-ms", type=float, default=None,
                   help="ms a pass may wait after the last one for the clients it answered (default: the profile's)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=None,
                   help="sentences in one pass at most (default: the profile's)")  # fmt: skip
    p.add_argument("--no-batching", dest="batching", action="store_false",
                   help="one request per pass (to compare against cross-request batching)")  # fmt: skip
    p.add_argument("--queue", type=int, default=512,
                   help="sentences waiting at most; beyond, 503 with Retry-After (default 512)")  # fmt: skip
    p.add_argument("--watch", type=float, default=0.0,
                   help="seconds between scans of the patches folder for new or replaced files (default 0: off)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads at most (default: the profile's; never more than it allows)")  # fmt: skip
    p.add_argument("--read-timeout", type=float, default=5.0,
                   help="seconds a client has to send its request body before a 408 (default 5)")  # fmt: skip
    p.add_argument("--token-file", default=None,
                   help="file holding a bearer token the patch-management endpoints require (default: none)")  # fmt: skip
    return ap


VERBS = {
    "demo": verbs.cmd_demo,
    "train": verbs.cmd_train,
    "eval": verbs.cmd_eval,
    "predict": verbs.cmd_predict,
    "profiles": verbs.cmd_profiles,
    "plan": verbs.cmd_plan,
    "doctor": verbs.cmd_doctor,
    "profile": verbs.cmd_profile,
    "tune": verbs.cmd_tune,
    "serve": verbs.cmd_serve,
    "export": verbs.cmd_export,
    "import-peft": verbs.cmd_import_peft,
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
