"""Patch serving benchmark: edge_tune's PatchBank against Hugging Face PEFT, each in its own process.

Measures, on 2 threads:
  - swap latency (µs, p50/p99 over --swaps swaps between two loaded patches): edge_tune, every registered
    method (reference switch, the shipped mechanism), and BitFit by copying biases into the live tensors (the
    alternative the issue asked to compare); PEFT `set_adapter` between two loaded LoRA r8 adapters and
    `hotswap_adapter_from_state_dict` (in-memory weight swap);
  - cold load from disk (ms, p50): edge_tune `PatchBank.load` (validation included), every method; PEFT
    `load_adapter` and `hotswap_adapter` from a saved adapter folder;
  - mixed batch of 4 tasks x 8 sentences: one pass with per-row patches vs 4 per-task passes (activate +
    predict), sentences/s; PEFT's `adapter_names=` mixed batch vs 4 `set_adapter` passes.
Patches are LoRA r8 on q,v and BitFit, with random non-zero deltas (timings depend on shapes, not values),
unless --patches names a folder of trained `<task>_<method>.patch` files from tools/build_task_patches.py.

    python tools/swap_bench.py [--swaps 10000] [--patches out/tasks] [--out out/swap_bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# ExecuTorch (the export extras) installs torchao, which transformers and PEFT import whenever it is
# installed (RSS and warnings): measured here, PEFT runs as where torchao is not installed.
sys.modules.setdefault("torchao", None)
TASKS = ("sst2", "cr", "subj", "mpqa")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def texts_for_mixed() -> list[tuple[str, str]]:
    """8 real dev sentences from each of the four tasks: (task, sentence)."""
    from edge_tune.data import read_tsv

    rows = []
    for t in TASKS:
        ds = read_tsv(ROOT / "data" / t / "dev.tsv")
        rows += [(t, s) for s in ds.texts[:8]]
    return rows


def timed_us(fn, n: int, samples: list[float]) -> None:
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)


def edge_worker(args, out: dict) -> None:
    import torch

    from edge_tune.bank import PatchBank
    from edge_tune.base import load_base
    from edge_tune.methods import METHODS, MethodSpec, delta_shapes
    from edge_tune.patch import Manifest, load_patch, save_patch
    from edge_tune.rss import apply_process_settings

    torch.set_num_threads(2)
    apply_process_settings()  # before the base loads, as PatchBank(precision=...) does
    base = load_base(precision="int8")
    work = Path(tempfile.mkdtemp(prefix="swap_bench_"))
    # every registered method at its defaults (LoRA r8 on q, v); BitFit and LoRA serve the mixed batch too
    specs = {m: MethodSpec(m, rank=8, alpha=16.0, targets=("q", "v")) for m in METHODS}
    defaults = dict(base.model.named_parameters())

    def make(task: str, method: str, seed: int) -> Path:
        trained = Path(args.patches or "/nonexistent") / f"{task}_{method}.patch"
        if trained.is_file():
            return trained
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for n, shape in delta_shapes(base.model, specs[method], 2).items():
            noise = torch.randn(shape, generator=g) * 0.05
            tensors[n] = (
                defaults[n].detach() + noise if n in defaults and not n.startswith("head.") else noise
            )
        m = Manifest(
            method, specs[method].hyper(), ["0", "1"], base.fingerprint, "int8", "", task=task, seq_len=64
        )
        save_patch(work / f"{task}_{method}.patch", tensors, m)
        return work / f"{task}_{method}.patch"

    pairs = [(t, m) for m in specs for t in (TASKS if m in ("bitfit", "lora") else TASKS[:2])]
    paths = {(t, m): make(t, m, i) for i, (t, m) in enumerate(pairs)}
    out["patch_source"] = (
        "trained"
        if args.patches and all(p.parent == Path(args.patches) for p in paths.values())
        else "random deltas"
    )
    bank = PatchBank(base)
    names = {k: bank.load(p, name=f"{k[0]}_{k[1]}") for k, p in paths.items()}
    out["patch_kb"] = {f"{t}_{m}": round(p.stat().st_size / 1024, 1) for (t, m), p in paths.items()}
    for method in specs:
        pair = [names[("sst2", method)], names[("cr", method)]]
        samples: list[float] = []
        i = iter(range(10**9))
        timed_us(lambda pair=pair, i=i: bank.activate(pair[next(i) % 2]), args.swaps, samples)
        out[f"edge_tune {method} swap (reference switch)"] = samples
    # BitFit by copy: the live tensors stay, the patch's values are copied into them.
    bank.deactivate()
    live = {n: p for n, p in base.model.named_parameters()}
    pats = [load_patch(paths[(t, "bitfit")], base).tensors for t in ("sst2", "cr")]
    i = iter(range(10**9))

    def copy_swap():
        src = pats[next(i) % 2]
        with torch.no_grad():
            for n, t in src.items():
                live[n].copy_(t)

    samples = []
    timed_us(copy_swap, args.swaps, samples)
    out["edge_tune bitfit swap (copy into live tensors)"] = samples
    for method in specs:
        samples = []
        p = paths[("sst2", method)]
        timed_us(lambda p=p: bank.load(p, name="cold"), args.loads, samples)
        out[f"edge_tune {method} cold load (ms)"] = [s / 1e3 for s in samples]
    # mixed batch: four LoRA task patches, 8 sentences each
    rows = [tuple(r) for r in json.loads(Path(args.inputs).read_text())["mixed"]]
    texts, tasks = [s for _, s in rows], [names[(t, "lora")] for t, _ in rows]
    bank.predict(texts, patches=tasks)
    mixed, separate = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        bank.predict(texts, patches=tasks, batch_size=32)
        mixed.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for t in TASKS:
            bank.predict([s for tt, s in rows if tt == t], patch=names[(t, "lora")])
        separate.append(time.perf_counter() - t0)
    out["mixed_sent_per_s"] = len(texts) / statistics.median(mixed)
    out["separate_sent_per_s"] = len(texts) / statistics.median(separate)


def peft_worker(args, out: dict) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # No edge_tune in this process: nothing of ours may run in the peer's (its entry points set glibc's mmap
    # threshold, which slows PEFT's allocations); the parent hands over the model folder and the sentences.
    torch.set_num_threads(2)
    mdir = json.loads(Path(args.inputs).read_text())["model_dir"]
    tok = AutoTokenizer.from_pretrained(mdir)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False)
    work = Path(tempfile.mkdtemp(prefix="swap_bench_peft_"))
    model = AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=2).eval()
    pm = get_peft_model(model, cfg, adapter_name=TASKS[0])
    for t in TASKS[1:]:
        pm.add_adapter(t, cfg)
    pm.save_pretrained(work)  # one folder per adapter (non-default names go under work/<name>)
    folder = {t: work / t if (work / t).is_dir() else work for t in TASKS}
    samples: list[float] = []
    i = iter(range(10**9))
    timed_us(lambda: pm.base_model.set_adapter(TASKS[next(i) % 2]), args.swaps, samples)
    out["PEFT lora set_adapter"] = samples
    pm.base_model.set_adapter(TASKS[0])
    sd = {t: {k: v.clone() for k, v in pm.state_dict().items() if f".{t}." in k} for t in TASKS[:2]}
    sd = {t: {k.replace(f".{t}.", f".{TASKS[0]}."): v for k, v in d.items()} for t, d in sd.items()}
    samples = []
    i = iter(range(10**9))
    timed_us(lambda: hotswap_adapter_from_state_dict(pm, sd[TASKS[next(i) % 2]], TASKS[0], config=cfg),
             min(args.swaps, 2000), samples)  # fmt: skip
    out["PEFT lora hotswap_adapter_from_state_dict"] = samples
    samples = []
    timed_us(lambda: (pm.load_adapter(str(folder[TASKS[1]]), adapter_name="cold"), pm.delete_adapter("cold")),
             args.loads, samples)  # fmt: skip
    out["PEFT lora load_adapter cold load (ms)"] = [s / 1e3 for s in samples]
    samples = []
    timed_us(lambda: hotswap_adapter(pm, str(folder[TASKS[1]]), adapter_name=TASKS[0]), args.loads, samples)
    out["PEFT lora hotswap_adapter cold load (ms)"] = [s / 1e3 for s in samples]
    rows = [tuple(r) for r in json.loads(Path(args.inputs).read_text())["mixed"]]
    texts, names = [s for _, s in rows], [t for t, _ in rows]
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    mixed, separate = [], []
    with torch.inference_mode():
        pm(**enc, adapter_names=names)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pm(**enc, adapter_names=names)
            mixed.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for t in TASKS:
                pm.base_model.set_adapter(t)
                pm(**tok([s for tt, s in rows if tt == t], padding=True, truncation=True, max_length=64,
                         return_tensors="pt"))  # fmt: skip
            separate.append(time.perf_counter() - t0)
    out["mixed_sent_per_s"] = len(texts) / statistics.median(mixed)
    out["separate_sent_per_s"] = len(texts) / statistics.median(separate)


def run_worker(kind: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--worker", kind, "--json", f.name, "--swaps", str(args.swaps),
               "--loads", str(args.loads), "--repeats", str(args.repeats), "--inputs", args.inputs]  # fmt: skip
        if args.patches:
            cmd += ["--patches", args.patches]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"{kind} worker failed: {tail}"}
        return json.loads(Path(f.name).read_text())


def report(results: dict, out_dir: Path) -> None:
    print(f"\n{'what':52} {'p50':>10} {'p99':>10}  unit")
    swaps = {}
    for side in ("edge_tune", "peft"):
        r = results[side]
        if "error" in r:
            print(f"{side:52} {r['error']}")
            continue
        for k, v in r.items():
            if isinstance(v, list):
                unit = "ms" if "(ms)" in k else "µs"
                print(f"{k:52} {pct(v, 0.5):10.1f} {pct(v, 0.99):10.1f}  {unit}")
                if unit == "µs":
                    swaps[k] = v
        print(
            f"{side + ' mixed batch 4 tasks x 8 (one pass)':52} {r['mixed_sent_per_s']:10.0f} {'':10}  sentences/s"
        )
        print(f"{side + ' 4 per-task passes':52} {r['separate_sent_per_s']:10.0f} {'':10}  sentences/s")
        print(
            f"{side + ' mixed-batch speed-up':52} {r['mixed_sent_per_s'] / r['separate_sent_per_s']:10.2f}x"
        )
    e, p = results["edge_tune"], results["peft"]
    if "error" not in e and "error" not in p:
        ref = pct(p["PEFT lora set_adapter"], 0.5)
        for m in ("bitfit", "lora"):
            k = f"edge_tune {m} swap (reference switch)"
            print(f"edge_tune {m} swap p50 is {ref / pct(e[k], 0.5):.0f}x faster than PEFT set_adapter p50")
        print(f"patch source: {e['patch_source']}; sizes (KB): {e['patch_kb']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "swap_bench.json").write_text(json.dumps(results))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for k, v in swaps.items():
        xs = sorted(v)
        ax.plot(xs, [i / len(xs) for i in range(len(xs))], label=k)
    ax.set_xscale("log")
    ax.set_xlabel("swap latency (µs, log scale)")
    ax.set_ylabel("fraction of swaps")
    ax.set_title("Patch swap latency (already loaded), 2 threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "swap_latency.png", dpi=120)
    print(f"wrote {out_dir / 'swap_bench.json'} and {out_dir / 'swap_latency.png'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--swaps", type=int, default=10_000, help="swaps timed per mechanism (default 10000)")
    ap.add_argument("--loads", type=int, default=100, help="cold loads timed per patch (default 100)")
    ap.add_argument("--repeats", type=int, default=20, help="mixed-batch repeats (default 20)")
    ap.add_argument(
        "--patches", default=None, help="folder of trained <task>_<method>.patch files (optional)"
    )
    ap.add_argument("--out", default="out/swap_bench", help="folder for the JSON and PNG")
    ap.add_argument("--worker", choices=["edge", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        out: dict = {}
        (edge_worker if args.worker == "edge" else peft_worker)(args, out)
        Path(args.json).write_text(json.dumps(out))
        return 0
    from edge_tune.base import default_model_dir

    args.inputs = str(Path(tempfile.mkdtemp(prefix="swap_bench_")) / "inputs.json")
    Path(args.inputs).write_text(
        json.dumps({"mixed": texts_for_mixed(), "model_dir": str(default_model_dir())})
    )
    results = {}
    for kind, key in (("edge", "edge_tune"), ("peft", "peft")):
        print(f"running {key} in its own process ...", flush=True)
        results[key] = run_worker(kind, args)
    report(results, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
