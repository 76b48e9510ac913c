"""Kernel benchmark: the edge_tune:: ops against fp32 and the int8 GEMMs PyTorch already has, 2 threads.

Per linear shape (K -> N in {384 -> 1536, 1536 -> 384}) and rows M (1024 = batch 16 x 64 tokens, training;
1 and 8, inference), median µs (the columns timed in turn, interleaved) of:
  fp32        F.linear on the fp32 weight (MKL/oneDNN)
  reference   ops.int8_linear_ref / int4_linear_ref (dequantize the whole weight, then F.linear)
  unfused     quantize x per token, torch._int_mm (int8 x int8 -> int32), dequantize, add bias
  fbgemm      torch.ao dynamic quantized linear (activation quantization and dequantize included)
  ours        the edge_tune:: op as dispatched now (the C++ kernel when built, see `edge-tune doctor`):
              int8_linear (weight-only), int8_linear_dynamic, lora_linear (dynamic base + r8), int4_linear
              (fp32 activations), int4_linear_dynamic (7-bit activations, the int4 base's path),
              and the two input-gradient ops of the int8 base (grad_x fp32 via the dequantized weight, int8)
plus the whole model, each in a fresh process: LoRA r8 training step (batch 16 x 64 tokens, the same
sentences) and batch-1 inference latency (LoRA attached on both sides), on the int8 base with the kernels
on and forced off (EDGE_TUNE_KERNELS=0), and through Hugging Face transformers + PEFT on the fp32 model (issue #8's anchor:
our step at most 0.5x, batch-1 at most 0.4x of PEFT's, measured in the same run).

Then the thread-scaling table (issue #23): int8_linear_dynamic and int4_linear_dynamic against fbgemm on
MiniLM's three shapes at 1024 rows, at 1, 2 and all cores, interleaved (and int8_linear_dynamic_packed, the
weight packed once as fbgemm's is, where the plain op packs it every call); ours / fbgemm per thread count and
each one's parallel efficiency (1-thread time / (threads x time)). Each ISA in a fresh process: `native`
(this CPU's best cores, fbgemm's too) and `avx2` (both forced to AVX2 with EDGE_TUNE_INT8_ISA and
FBGEMM_ENABLE_INSTRUCTIONS: an AVX2-only CPU's instructions on this machine's cores, not its caches).

    python tools/bench_kernels.py [--repeats 50] [--model-rounds 3] [--only ops,model,scaling]
                                  [--scaling-isas native,avx2] [--out out/bench_kernels]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools" / "peers"))
from protocol import median_ms  # noqa: E402  (the one timing rule: 3 warm-up calls, then the median)


def median_us(fn, repeats: int) -> float:
    return median_ms(fn, repeats) * 1e3


def interleaved_median_us(cells: dict, repeats: int, rounds: int = 10) -> dict[str, float]:
    """Median µs of each cell over `repeats` calls, the cells taking turns (`rounds` rounds of repeats/rounds
    calls each, after 3 warm-up calls): the machine's drift over the seconds a row takes then falls on every
    column alike. Timed one column after another, the first (fp32) ran ~20% slow and made int4 look 0.81x fp32."""
    import time

    samples: dict[str, list[float]] = {name: [] for name in cells}
    for fn in cells.values():
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for name, fn in cells.items():
            for _ in range(max(1, repeats // rounds)):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e6 for name, ts in samples.items()}


def fbgemm_linear(w, b):
    """torch.ao's dynamic int8 linear (fbgemm on x86) on the fp32 weight (n, k) and bias (n,)."""
    import torch

    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return torch.ao.quantization.quantize_dynamic(
        torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8
    )


def op_table(repeats: int) -> list[dict]:
    import torch

    from edge_tune import quant
    from edge_tune.kernels import load_kernels

    load_kernels()
    rows = []
    for k, n in ((384, 1536), (1536, 384)):
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        q8, s8 = quant.quantize_int8(w)
        q4, s4 = quant.quantize_int4(w)
        dyn = fbgemm_linear(w, b)
        for m in (1024, 1, 8):
            x = torch.randn(m, k, generator=g)
            with torch.inference_mode():
                times = interleaved_median_us(_cells(x, w, b, q8, s8, q4, s4, dyn), repeats)
            rows.append({"shape": f"{k}->{n}", "m": m, **times})
    return rows


def _cells(x, w, b, q8, s8, q4, s4, dyn) -> dict:
    import torch
    import torch.nn.functional as F

    from edge_tune import ops

    wt8 = q8.t().contiguous()
    g = torch.Generator().manual_seed(1)
    lora_a = torch.randn(8, x.shape[1], generator=g) * 0.1
    lora_b = torch.randn(w.shape[0], 8, generator=g) * 0.1
    grad = torch.randn(x.shape[0], w.shape[0], generator=g)  # an output gradient, for the backward ops

    def unfused():
        sx = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        xq = torch.round(x / sx).to(torch.int8)
        mm = torch._int_mm(xq, wt8) if x.shape[0] > 16 else xq.int() @ wt8.int()  # _int_mm needs M > 16
        return mm.float() * sx * s8 + b

    return {
        "fp32": lambda: F.linear(x, w, b),
        "int8 reference": lambda: ops.int8_linear_ref(x, q8, s8, b),
        "int8 unfused _int_mm": unfused,
        "int8 fbgemm dynamic": lambda: dyn(x),
        "int8 ours": lambda: ops.int8_linear(x, q8, s8, b),
        "int8 dynamic ours": lambda: ops.int8_linear_dynamic(x, q8, s8, b),
        "lora r8 ours": lambda: ops.lora_linear(x, q8, s8, b, lora_a, lora_b, 2.0),
        "grad_x fp32 ours": lambda: ops.int8_linear_grad_input(grad, q8, s8),
        "grad_x int8 ours": lambda: ops.int8_linear_dynamic_grad_input(grad, q8, s8),
        "int4 reference": lambda: ops.int4_linear_ref(x, q4, s4, b),
        "int4 ours": lambda: ops.int4_linear(x, q4, s4, b),
        "int4 dynamic ours": lambda: ops.int4_linear_dynamic(x, q4, s4, b),
    }


def write_model_inputs(path: Path) -> None:
    """One dev sentence (batch 1, its real length) and 16 training rows of 64 tokens, ids and masks, into an
    .npz that every whole-model worker reads: the same inputs for each, and no edge_tune import in PEFT's."""
    import numpy as np

    from edge_tune.base import default_model_dir
    from edge_tune.data import collate, read_tsv
    from edge_tune.tokens import encode, load_tokenizer

    tok = load_tokenizer(default_model_dir())
    ds = read_tsv(ROOT / "data" / "sst2" / "dev.tsv")
    one = collate([encode(tok, ds.texts[:1], 64)[0]])
    texts = [" ".join(ds.texts[i : i + 4]) for i in range(0, 64, 4)]  # 16 sentences of >= 64 tokens
    ids, mask = collate(list(encode(tok, texts, 64)))
    np.savez(path, ids1=one[0].numpy(), mask1=one[1].numpy(), ids=ids.numpy(), mask=mask.numpy(),
             model_dir=str(default_model_dir()))  # fmt: skip


def read_model_inputs(path: str) -> tuple[tuple, tuple, str]:
    import numpy as np
    import torch

    with np.load(path) as z:
        t = {k: torch.from_numpy(z[k]) for k in ("ids1", "mask1", "ids", "mask")}
        return (t["ids1"], t["mask1"]), (t["ids"], t["mask"]), str(z["model_dir"])


def timed_row(batch1_ms: float, step, repeats: int, tokens: int) -> dict:
    """A whole-model worker's result: its batch-1 latency and the median of `step` (ms)."""
    return {"batch1_ms": batch1_ms, "step_ms": median_us(step, max(5, repeats // 5)) / 1e3, "tokens": tokens}


def peft_model_worker(inputs: str, repeats: int) -> dict:
    """The same step and batch-1 call through transformers + PEFT LoRA r8 (q, v) on the fp32 model. This
    process must not import edge_tune's process settings (rss.apply_process_settings: glibc's mmap
    threshold), which slowed PEFT's step here from ~600 to ~900 ms."""
    import torch
    from hf_peft import build

    (ids1, mask1), (ids, mask), model_dir = read_model_inputs(inputs)
    model = build(argparse.Namespace(variant="", method="lora", model_dir=model_dir))
    model.eval()
    with torch.inference_mode():
        latency = median_us(lambda: model(input_ids=ids1, attention_mask=mask1), repeats) / 1e3
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    y = torch.zeros(16, dtype=torch.long)
    model.train()

    def step():
        model(input_ids=ids, attention_mask=mask, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()

    return timed_row(latency, step, repeats, ids.numel())


def model_worker(inputs: str, repeats: int) -> dict:
    from edge_tune.rss import set_openmp_spin

    set_openmp_spin()  # before torch loads, as the `edge-tune` CLI does
    import torch
    import torch.nn.functional as F

    from edge_tune.base import load_base
    from edge_tune.methods import MethodSpec, apply_method
    from edge_tune.model import prepack_linears
    from edge_tune.optim import AdamW
    from edge_tune.rss import apply_process_settings

    apply_process_settings()  # as `edge-tune train` and PatchBank do (mmap threshold, tensor cache)
    base = load_base(precision="int8")
    model = base.model
    prepack_linears(model)  # as PatchBank serves (inference only: the training step packs per call)
    one, (ids, mask), _ = read_model_inputs(inputs)
    # LoRA attached before the batch-1 call too: PEFT's batch-1 call runs with its LoRA, so ours does
    params = apply_method(model, MethodSpec("lora", rank=8, alpha=16.0, targets=("q", "v")))
    with torch.inference_mode():
        latency = median_us(lambda: model(*one), repeats) / 1e3
    opt = AdamW(params.values(), lr=1e-3)
    y = torch.zeros(16, dtype=torch.long)
    model.train()

    def step():
        F.cross_entropy(model(ids, mask), y).backward()
        opt.step()
        opt.zero_grad()

    return timed_row(latency, step, repeats, ids.numel())


WHOLE_MODEL = (("edge_tune, kernels on", "edge", "1"), ("edge_tune, kernels off (references)", "edge", "0"),
               ("PEFT LoRA, fp32 model", "peft", "1"))  # fmt: skip


def whole_model_rows(repeats: int, rounds: int) -> dict[str, dict]:
    """Each whole-model worker in a fresh process, the workers taking turns for `rounds` rounds; per row
    the median over rounds of its step and batch-1 medians (this VM's speed drifts by 1.5x over minutes:
    one process per row, run once, measured the drift as much as the runtimes)."""
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in WHOLE_MODEL}
    errors: dict[str, str] = {}
    inputs = Path(tempfile.mkdtemp(prefix="bench_kernels_")) / "inputs.npz"
    write_model_inputs(inputs)
    for _ in range(rounds):
        for label, worker, kernels in WHOLE_MODEL:
            if label in errors:
                continue
            p = subprocess.run([sys.executable, __file__, "--model-worker", worker, "--inputs", str(inputs),
                                "--repeats", str(repeats)],
                               capture_output=True, text=True, env={**os.environ, "EDGE_TUNE_KERNELS": kernels,
                                                                    "PYTHONWARNINGS": "ignore"})  # fmt: skip
            if p.returncode:
                errors[label] = p.stderr.strip()[-300:]
            else:
                runs[label].append(json.loads(p.stdout.strip().splitlines()[-1]))
    out = {}
    for label, rs in runs.items():
        if label in errors:
            out[label] = {"error": errors[label]}
            continue
        steps, b1s = [r["step_ms"] for r in rs], [r["batch1_ms"] for r in rs]
        out[label] = {"step_ms": statistics.median(steps), "batch1_ms": statistics.median(b1s),
                      "step_runs": steps, "batch1_runs": b1s, "tokens": rs[0]["tokens"]}  # fmt: skip
    return out


SCALING_SHAPES = ((384, 1536), (1536, 384), (384, 384))
ISA_ENV = {"native": {}, "avx2": {"EDGE_TUNE_INT8_ISA": "avx2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}}


def _scaling_cells(k: int, n: int) -> dict:
    """fbgemm's dynamic linear and our two dynamic ops on one (n, k) weight, 1024 rows; the int8 op also on
    a weight packed once (`int8_linear_dynamic_packed`, as the serving bank runs it), as fbgemm's is."""
    import torch

    from edge_tune import ops, quant

    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(1024, k, generator=g)
    q8, s8 = quant.quantize_int8(w)
    q4, s4 = quant.quantize_int4(w)
    dyn = fbgemm_linear(w, b)
    packed = ops.int8_pack_weight(q8)
    return {
        "fbgemm": lambda: dyn(x),
        "int8 ours": lambda: ops.int8_linear_dynamic(x, q8, s8, b),
        "int8 packed": lambda: ops.int8_linear_dynamic_packed(x, q8, *packed, s8, b),
        "int4 ours": lambda: ops.int4_linear_dynamic(x, q4, s4, b),
    }


def scaling_worker(repeats: int) -> list[dict]:
    """This process's ISA: per shape and thread count, median µs of ours and fbgemm, interleaved."""
    import torch

    from edge_tune.kernels import load_kernels

    load_kernels()
    counts = sorted({1, 2, os.cpu_count() or 1})
    rows = []
    for k, n in SCALING_SHAPES:
        cells = _scaling_cells(k, n)
        for t in counts:
            torch.set_num_threads(t)
            with torch.inference_mode():
                rows.append({"shape": f"{k}->{n}", "threads": t, **interleaved_median_us(cells, repeats)})
    rows.append(
        {"isa": torch.ops.edge_tune.int8_isa(), "fbgemm_env": os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS")}
    )
    return rows


def scaling_table(isas: list[str], repeats: int) -> dict[str, list[dict]]:
    """Each ISA's scaling rows from a fresh process (the ISA choice is read once a process)."""
    out = {}
    for isa in isas:
        p = subprocess.run([sys.executable, __file__, "--scaling-worker", "--repeats", str(repeats)],
                           capture_output=True, text=True,
                           env={**os.environ, **ISA_ENV[isa], "PYTHONWARNINGS": "ignore"})  # fmt: skip
        if p.returncode:
            print(f"scaling ({isa}) failed: {p.stderr.strip()[-300:]}")
            continue
        out[isa] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def print_scaling(table: dict[str, list[dict]]) -> None:
    for isa, rows in table.items():
        meta, rows = rows[-1], rows[:-1]
        print(f"\nthread scaling, 1024 rows, median µs ({isa}: our cores {meta['isa']}, "
              f"fbgemm {meta['fbgemm_env'] or 'its best'})")  # fmt: skip
        print(f"{'shape':10} {'threads':>7} {'fbgemm':>9} {'int8 ours':>10} {'int4 ours':>10} {'int8 packed':>12} "
              f"{'int8/fbgemm':>12} {'int4/fbgemm':>12} {'packed/fbgemm':>14} "
              f"{'eff fbgemm':>11} {'eff int8':>9} {'eff int4':>9}")  # fmt: skip
        one = {r["shape"]: r for r in rows if r["threads"] == 1}
        for r in rows:
            o, t = one[r["shape"]], r["threads"]
            eff = {c: o[c] / (t * r[c]) for c in ("fbgemm", "int8 ours", "int4 ours")}
            print(f"{r['shape']:10} {t:7d} {r['fbgemm']:9.0f} {r['int8 ours']:10.0f} {r['int4 ours']:10.0f} "
                  f"{r['int8 packed']:12.0f} {r['int8 ours'] / r['fbgemm']:11.2f}x {r['int4 ours'] / r['fbgemm']:11.2f}x "
                  f"{r['int8 packed'] / r['fbgemm']:13.2f}x "
                  f"{eff['fbgemm']:11.2f} {eff['int8 ours']:9.2f} {eff['int4 ours']:9.2f}")  # fmt: skip


def plot(rows: list[dict], names: list[str], path: Path) -> None:
    """One panel per shape and row count (shapes down, M across), the same ops on one log axis each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    ms = list(dict.fromkeys(r["m"] for r in rows))
    fig, axes = plt.subplots(len(shapes), len(ms), figsize=(4.2 * len(ms), 3.4 * len(shapes)), sharey=True,
                             squeeze=False)  # fmt: skip
    for r in rows:
        ax = axes[shapes.index(r["shape"])][ms.index(r["m"])]
        bars = ax.barh(names, [r[n] for n in names])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=2)
        ax.set_xlim(right=ax.get_xlim()[1] * 2)  # room for the labels
        ax.set_title(f"{r['shape']}, M = {r['m']}", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("median µs (log)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per cell (median reported)")
    ap.add_argument("--out", default="out/bench_kernels")
    ap.add_argument("--model-rounds", type=int, default=3,
                    help="rounds of the whole-model workers, taking turns (default 3; median reported)")  # fmt: skip
    ap.add_argument("--only", default="ops,model,scaling",
                    help="which parts to run, comma-separated: ops, model, scaling (default all)")  # fmt: skip
    ap.add_argument("--scaling-isas", default="native,avx2",
                    help="ISAs of the thread-scaling table, each a fresh process: native, avx2 (default both)")  # fmt: skip
    ap.add_argument("--scaling-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-worker", choices=["edge", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch

    if a.scaling_worker:
        print(json.dumps(scaling_worker(a.repeats)))
        return 0
    torch.set_num_threads(2)
    if a.model_worker:
        print(
            json.dumps((model_worker if a.model_worker == "edge" else peft_model_worker)(a.inputs, a.repeats))
        )
        return 0
    only = set(a.only.split(","))
    if not only <= {"ops", "model", "scaling"} or not set(a.scaling_isas.split(",")) <= set(ISA_ENV):
        ap.error("--only takes ops, model, scaling; --scaling-isas takes native, avx2")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    if "ops" in only:
        result["ops"] = ops_part(a.repeats, out)
    if "model" in only:
        result["model"] = model_part(a.repeats, a.model_rounds)
    if "scaling" in only:
        result["scaling"] = scaling_table(a.scaling_isas.split(","), a.repeats)
        print_scaling(result["scaling"])
    (out / "bench_kernels.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'bench_kernels.json'}")
    return 0


def ops_part(repeats: int, out: Path) -> list[dict]:
    """The per-op table, its targets and plot."""
    rows = op_table(repeats)
    names = [k for k in rows[0] if k not in ("shape", "m")]
    print(f"{'shape':10} {'M':>5} " + " ".join(f"{n:>21}" for n in names) + "   (median µs)")
    for r in rows:
        print(f"{r['shape']:10} {r['m']:5d} " + " ".join(f"{r[n]:21.1f}" for n in names))
    print("\ntargets (issue #8):")
    for r in rows:
        dyn, tag = r["int8 dynamic ours"], f"{r['shape']} M={r['m']}"
        if r["m"] == 1024:
            print(f"  {tag}: dynamic / fbgemm {dyn / r['int8 fbgemm dynamic']:.2f}x (<= 1.0), "
                  f"lora / dynamic {r['lora r8 ours'] / dyn:.2f}x (<= 1.3), "
                  f"int4 / fp32 {r['int4 ours'] / r['fp32']:.2f}x, int4 dynamic / fp32 "
                  f"{r['int4 dynamic ours'] / r['fp32']:.2f}x (<= 0.8)")  # fmt: skip
        else:
            print(f"  {tag}: dynamic / fp32 {dyn / r['fp32']:.2f}x (<= 1.0), int8 weight-only / fp32 "
                  f"{r['int8 ours'] / r['fp32']:.2f}x, int4 dynamic / fp32 {r['int4 dynamic ours'] / r['fp32']:.2f}x")  # fmt: skip
    plot(rows, names, out / "bench_kernels.png")
    print(f"wrote {out / 'bench_kernels.png'}")
    return rows


def model_part(repeats: int, rounds: int) -> dict:
    """The whole-model rows (fresh processes) and their targets."""
    model = whole_model_rows(repeats, rounds)
    print(
        f"\n{'whole model (median of rounds)':36} {'LoRA r8 step (16x64) ms':>24} {'batch-1 latency ms':>20}"
    )
    for label, m in model.items():
        if "error" in m:
            print(f"{label:36} failed: {m['error']}")
        else:
            step, b1 = m["step_ms"], m["batch1_ms"]
            print(f"{label:36} {step:13.1f} ({min(m['step_runs']):4.0f}-{max(m['step_runs']):4.0f}) "
                  f"{b1:10.2f} ({min(m['batch1_runs']):5.2f}-{max(m['batch1_runs']):5.2f})")  # fmt: skip
    ours, peft = model["edge_tune, kernels on"], model["PEFT LoRA, fp32 model"]
    if "error" not in ours and "error" not in peft:
        print(f"  int8 base with kernels / PEFT: step {ours['step_ms'] / peft['step_ms']:.2f}x (<= 0.5), "
              f"batch-1 {ours['batch1_ms'] / peft['batch1_ms']:.2f}x (<= 0.4)")  # fmt: skip
    return model


if __name__ == "__main__":
    sys.exit(main())
