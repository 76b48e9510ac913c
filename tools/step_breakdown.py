"""Where the milliseconds go: a LoRA r8 training step (16 sentences x 64 tokens) and a batch-1 call on the
int8 base, under torch.profiler, by op (self time) and by layer (embeddings, each encoder layer forward and
backward, the head), on the machine it runs on; plus the step's integer GEMM work and the rate the int8
ops reached (GMAC/s), the figure to hold against the kernels' peak (tools/bench_kernels.py). With
--patches, also a serving pass as `edge-tune serve` runs one: `PatchBank.predict` of --pass-sentences
SST-2 dev sentences, the folder's patches taking turns by row (one mixed, packed pass for LoRA patches).

    python tools/step_breakdown.py [--threads 2] [--steps 10] [--calls 50] [--patches out/tasks]
                                   [--pass-sentences 16] [--out out/step_breakdown]

The ISA is this CPU's best unless forced for the whole process (EDGE_TUNE_INT8_ISA=avx2). Profiled times
include the profiler's own cost (a few %): the wall-clock step and call, timed without it, come first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from bench_kernels import read_model_inputs, write_model_inputs  # noqa: E402  (one set of inputs)

FORWARD_UNDER_AUTOGRAD = "GeneratedBackwardFor_edge_tune_"
INT8_GEMM_OPS = (
    "edge_tune::int8_linear_dynamic",
    "edge_tune::int8_linear_dynamic_packed",  # inference passes over prepacked weights
    "edge_tune::lora_linear",
    "edge_tune::int8_linear_dynamic_grad_input",
)


def bracket_layers(model):
    """record_function ranges around the embeddings, each layer and the head, so the profile sums by layer:
    forward by module hooks; backward from a module's backward pre-hook to the next one's (a layer's full
    backward hook does not wait for its gradients when its input needs none, as layer 0's). Returns the
    hook handles and `end_backward`, to call when backward returns (it closes the last range)."""
    import torch

    open_ranges: dict[str, object] = {}

    def close(name):
        r = open_ranges.pop(name, None)
        if r is not None:
            r.__exit__(None, None, None)

    def enter(name):
        def hook(*_):
            if name.endswith(" backward"):
                end_backward()
            r = torch.profiler.record_function(name)
            r.__enter__()
            open_ranges[name] = r

        return hook

    def end_backward():
        for name in [n for n in open_ranges if n.endswith(" backward")]:
            close(name)

    parts = [("embeddings", model.encoder.word)]
    parts += [(f"layer {i}", layer) for i, layer in enumerate(model.encoder.layers)]
    parts += [("head", model.head)]
    handles = []
    for name, mod in parts:
        handles += [mod.register_forward_pre_hook(enter(f"{name} forward")),
                    mod.register_forward_hook(lambda *_, n=f"{name} forward": close(n)),
                    mod.register_full_backward_pre_hook(enter(f"{name} backward"))]  # fmt: skip
    return handles, end_backward


def profile(fn, reps: int) -> tuple[list[dict], list[dict]]:
    """(by op, by layer) of `reps` calls of fn: ms per call, self time per op, inclusive per layer range."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    ops, layers = [], []
    for e in prof.key_averages():
        # an op with a registered autograd formula runs its forward inside the autograd Function that
        # torch.library names "GeneratedBackwardFor_<op>": the profiler books the forward's time there
        name = e.key
        if name.startswith(FORWARD_UNDER_AUTOGRAD) and name.endswith("_default"):
            name = "edge_tune::" + name[len(FORWARD_UNDER_AUTOGRAD) : -len("_default")] + " (forward)"
        elif name.startswith(FORWARD_UNDER_AUTOGRAD):  # "..._defaultBackward": the backward node itself
            name = "edge_tune::" + name[len(FORWARD_UNDER_AUTOGRAD) :].replace(
                "_defaultBackward", " (backward node)"
            )
        row = {"name": name, "calls": e.count / reps}
        if e.key.endswith((" forward", " backward")) and e.key.split()[0] in ("embeddings", "layer", "head"):
            layers.append({**row, "ms": e.cpu_time_total / reps / 1e3})
        elif e.self_cpu_time_total > 0:
            ops.append({**row, "ms": e.self_cpu_time_total / reps / 1e3})
    ops.sort(key=lambda r: -r["ms"])
    order = {"forward": 0, "backward": 1}
    layers.sort(key=lambda r: (order[r["name"].split()[-1]], r["name"]))
    return ops, layers


def gemm_macs(model, tokens: int, backward: bool) -> int:
    """Integer GEMM multiply-adds of the six int8 linears a layer, forward (+ the input gradient)."""
    per_token = sum(m.in_features * m.out_features for layer in model.encoder.layers
                    for m in (layer.q, layer.k, layer.v, layer.o, layer.ff1, layer.ff2))  # fmt: skip
    return per_token * tokens * (2 if backward else 1)


def print_part(title: str, wall_ms: float, ops: list[dict], layers: list[dict], macs: int, top: int) -> dict:
    total = sum(r["ms"] for r in ops)
    gemm = sum(r["ms"] for r in ops if r["name"].removesuffix(" (forward)") in INT8_GEMM_OPS)
    rate = macs / (gemm / 1e3) / 1e9 if gemm else 0.0
    print(f"\n{title}: {wall_ms:.2f} ms wall-clock, {total:.2f} ms profiled (self time of every op)")
    print(f"  {'op':52} {'ms':>8} {'%':>6} {'calls':>6}")
    for r in ops[:top]:
        print(f"  {r['name'][:52]:52} {r['ms']:8.3f} {100 * r['ms'] / total:5.1f}% {r['calls']:6.0f}")
    rest = sum(r["ms"] for r in ops[top:])
    print(f"  {'(the other ' + str(len(ops[top:])) + ' ops)':52} {rest:8.3f} {100 * rest / total:5.1f}%")
    # a range's inclusive time carries the profiler's cost of every op inside it (at batch 1, ~a µs an op
    # on ~25 ops a layer), so the ranges are shares of their own sum, not of the self times above
    spanned = sum(r["ms"] for r in layers)
    print(f"  {'range (inclusive, profiler cost in)':52} {'ms':>8} {'%':>6}")
    for r in layers:
        print(f"  {r['name']:52} {r['ms']:8.3f} {100 * r['ms'] / spanned:5.1f}%")
    print(
        f"  int8 GEMM ops (with lora_linear's rank-8 term): {gemm:.2f} ms for {macs / 1e9:.2f} GMAC = {rate:.0f} GMAC/s"
    )
    return {"wall_ms": wall_ms, "profiled_ms": total, "ops": ops, "layers": layers, "gemm_ms": gemm,
            "gemm_gmac": macs / 1e9, "gemm_gmac_per_s": rate}  # fmt: skip


def serving_pass(folder: Path, sentences: int, reps: int, top: int, wall) -> tuple[str, dict]:
    """A serving pass over `folder`'s patches, profiled: (title, part). The tensor cache gets the slack
    `edge-tune serve` gives it where the budget has room (a pass's sizes seldom recur exactly)."""
    import random

    from edge_tune.bank import PatchBank
    from edge_tune.memory import TENSOR_CACHE_AUTO_MB
    from edge_tune.rss import set_tensor_cache_slack, tensor_cache_slack_set_by_env
    from edge_tune.tokens import encode

    if not tensor_cache_slack_set_by_env():
        set_tensor_cache_slack(TENSOR_CACHE_AUTO_MB)
    bank = PatchBank(precision="int8")
    names = [bank.load(p, name=p.stem) for p in sorted(folder.glob("*.patch"))]
    dev = (ROOT / "data" / "sst2" / "dev.tsv").read_text().splitlines()[1:]
    rng = random.Random(0)
    texts = [rng.choice(dev).split("\t", 1)[1] for _ in range(sentences)]
    patches = [names[i % len(names)] for i in range(sentences)]
    tokens = sum(len(encode(bank.base.tokenizer, [t], bank.patches[n].manifest.seq_len)[0])
                 for t, n in zip(texts, patches, strict=True))  # fmt: skip

    def serve_pass():
        bank.predict(texts, patches=patches)

    ms = wall(serve_pass, reps)
    handles, _ = bracket_layers(bank.base.model)
    ops, layers = profile(serve_pass, reps)
    for h in handles:
        h.remove()
    title = f"serving pass, {sentences} sentences ({tokens} tokens), {len(names)} patches"
    return title, print_part(title, ms, ops, layers, gemm_macs(bank.base.model, tokens, False), top)


def plot(parts: dict, path: Path, top: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.2), squeeze=False)
    for ax, (title, p) in zip(axes[0], parts.items(), strict=True):
        rows = p["ops"][:top][::-1]
        bars = ax.barh([r["name"].replace("edge_tune::", "")[:40] for r in rows], [r["ms"] for r in rows])
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=2)
        ax.set_title(f"{title} ({p['wall_ms']:.1f} ms wall-clock)", fontsize=9)
        ax.set_xlabel("ms per call (self time)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--steps", type=int, default=10, help="profiled training steps (default 10)")
    ap.add_argument("--calls", type=int, default=50, help="profiled batch-1 calls (default 50)")
    ap.add_argument("--top", type=int, default=15, help="ops listed per part (default 15)")
    ap.add_argument("--patches", help="folder of .patch files (tools/build_task_patches.py): also profile a "
                                      "serving pass over them")  # fmt: skip
    ap.add_argument("--pass-sentences", type=int, default=16, help="sentences in that pass (default 16)")
    ap.add_argument("--out", default="out/step_breakdown", help="folder for the JSON and the PNG")
    a = ap.parse_args()
    if min(a.threads, a.steps, a.calls, a.top, a.pass_sentences) < 1:
        ap.error("--threads, --steps, --calls, --top and --pass-sentences must be at least 1")
    folder = Path(a.patches) if a.patches else None
    if folder is not None and not sorted(folder.glob("*.patch")):
        ap.error(f"no .patch files in {folder}")
    from edge_tune.rss import apply_process_settings, set_openmp_spin

    set_openmp_spin()  # before torch loads, as the `edge-tune` CLI does
    import torch
    import torch.nn.functional as F

    from edge_tune.base import load_base
    from edge_tune.methods import MethodSpec, apply_method
    from edge_tune.model import prepack_linears
    from edge_tune.optim import AdamW

    torch.set_num_threads(a.threads)
    apply_process_settings()  # as `edge-tune train` does (mmap threshold, tensor cache)
    inputs = Path(tempfile.mkdtemp(prefix="step_breakdown_")) / "inputs.npz"
    write_model_inputs(inputs)
    one, (ids, mask), _ = read_model_inputs(str(inputs))
    model = load_base(precision="int8").model
    params = apply_method(model, MethodSpec("lora", rank=8, alpha=16.0, targets=("q", "v")))
    opt = AdamW(params.values(), lr=1e-3)
    y = torch.zeros(ids.shape[0], dtype=torch.long)

    end_backward = lambda: None  # noqa: E731  (set while the layer ranges are on)

    def step():
        F.cross_entropy(model(ids, mask), y).backward()
        end_backward()
        opt.step()
        opt.zero_grad()

    def call():
        with torch.inference_mode():
            model(*one)

    def wall(fn, reps: int) -> float:
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3

    print(f"{torch.ops.edge_tune.int8_isa()} int8 cores, {a.threads} threads")
    model.train()
    step_ms = wall(step, a.steps)
    handles, end_backward = bracket_layers(model)
    parts = {}
    ops, layers = profile(step, a.steps)
    parts["LoRA r8 step, 16 x 64 tokens"] = print_part(
        "LoRA r8 step, 16 x 64 tokens", step_ms, ops, layers, gemm_macs(model, ids.numel(), True), a.top
    )
    model.eval()
    for h in handles:
        h.remove()
    prepack_linears(model)  # as PatchBank serves a call (the step above packs per call)
    call_ms = wall(call, a.calls)
    handles, _ = bracket_layers(model)
    ops, layers = profile(call, a.calls)
    tokens = int(one[1].sum())
    parts[f"batch 1, {tokens} tokens"] = print_part(
        f"batch 1, {tokens} tokens", call_ms, ops, layers, gemm_macs(model, tokens, False), a.top
    )
    if folder is not None:
        title, part = serving_pass(folder, a.pass_sentences, a.calls, a.top, wall)
        parts[title] = part
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_breakdown.json").write_text(json.dumps(parts, indent=1))
    plot(parts, out / "step_breakdown.png", a.top)
    print(f"wrote {out / 'step_breakdown.json'} and {out / 'step_breakdown.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
