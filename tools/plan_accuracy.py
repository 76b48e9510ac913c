"""How well does the memory plan predict peak RSS? For every cell of a grid (method x micro-batch x
sequence length x precision) a fresh process trains a few steps on real SST-2 text, padded by nothing:
every sentence is joined with its neighbours until it fills the sequence length, so each step and each
evaluation batch is at full size. The cell's measured peak RSS is compared with `plan_memory`'s total.

    python tools/plan_accuracy.py [--methods all] [--batches 1,4,16,32] [--seq-lens 32,64,128]
                                  [--precisions int8,int4] [--checkpointing] [--out out/plan_accuracy]

Prints predicted vs measured per cell with the error %, the worst over- and under-prediction, and writes
a PNG (predicted vs measured, with the +/-10% band) and a JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TRAIN_ROWS, DEV_ROWS, STEPS = 1000, 128, 3


def full_length_texts(seq_len: int, rows: int, offset: int) -> tuple[list[str], list[int]]:
    """Real SST-2 sentences, each joined with the following ones until it has at least `seq_len` tokens."""
    from edge_tune.base import default_model_dir
    from edge_tune.data import read_tsv
    from edge_tune.tokens import load_tokenizer

    ds = read_tsv(ROOT / "data" / "sst2" / "train.tsv")
    tok = load_tokenizer(default_model_dir())
    texts, labels, i = [], [], offset
    while len(texts) < rows:
        parts = []
        while len(tok.encode(" ".join(parts)).ids) < seq_len:
            parts.append(ds.texts[i % len(ds)])
            i += 1
        texts.append(" ".join(parts))
        labels.append(ds.labels[i % len(ds)])
    return texts, labels


def worker(a) -> dict:
    import torch

    from edge_tune.base import load_base
    from edge_tune.data import Dataset
    from edge_tune.methods import MethodSpec
    from edge_tune.rss import apply_process_settings, peak_rss_mb, trim_resident_memory
    from edge_tune.trainer import TrainConfig, train

    apply_process_settings()  # before anything loads, as `edge-tune train` does
    torch.set_num_threads(2)
    trim_resident_memory()  # as adapt does after its imports
    data = json.loads(Path(a.data).read_text())
    train_ds = Dataset(data["train"], data["train_labels"], ["0", "1"], "grid")
    dev_ds = Dataset(data["dev"], data["dev_labels"], ["0", "1"], "grid-dev")
    del data
    base = load_base(precision=a.precision)
    spec = MethodSpec(a.method, rank=a.rank, alpha=2.0 * a.rank, targets=("q", "v"))
    # An evaluation after every step: from the first one on, a real run holds its best-so-far copy while it
    # trains (a whole fine-tune's: 85 MB), so the steps after it are the ones the plan describes.
    cfg = TrainConfig(spec, batch_size=a.batch, seq_len=a.seq_len, steps=STEPS, eval_every=1,
                      checkpointing=a.checkpointing, eval_batch_size=a.eval_batch)  # fmt: skip
    train(base, train_ds, dev_ds, cfg, progress=False)
    return {"peak_rss_mb": peak_rss_mb()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="all",
                    help="comma-separated, or all: every registered method that trains (default all)")  # fmt: skip
    ap.add_argument("--batches", default="1,4,16,32", help="micro-batch sizes (sentences)")
    ap.add_argument("--seq-lens", default="32,64,128", help="sequence lengths (tokens)")
    ap.add_argument("--precisions", default="int8,int4")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (q,v targets)")
    ap.add_argument("--eval-batch", type=int, default=64, help="evaluation batch (sentences)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every cell")
    ap.add_argument("--out", default="out/plan_accuracy")
    if "--worker" in sys.argv:
        w = argparse.ArgumentParser()
        for k in ("--method", "--precision", "--data", "--result"):
            w.add_argument(k)
        for k in ("--batch", "--seq-len", "--rank", "--eval-batch"):
            w.add_argument(k, type=int)
        w.add_argument("--checkpointing", action="store_true")
        wa = w.parse_args([x for x in sys.argv[1:] if x != "--worker"])
        Path(wa.result).write_text(json.dumps(worker(wa)))
        return 0
    a = ap.parse_args()

    from tqdm import tqdm

    from edge_tune.base import default_model_dir, read_config
    from edge_tune.data import token_rows
    from edge_tune.floor import runtime_floor_mb, startup_peak_mb
    from edge_tune.memory import dataset_bytes, plan_memory
    from edge_tune.methods import METHODS, MethodSpec
    from edge_tune.rss import trim_resident_memory
    from edge_tune.tokens import encode, load_tokenizer

    cfg = read_config(default_model_dir())
    if a.methods == "all":  # zeroshot / fewshot run no training step: nothing for the plan to predict
        a.methods = ",".join(m for m in METHODS if METHODS[m].fit is None)
    print(
        f"runtime floor (measured once, cached): {runtime_floor_mb():.1f} MB, startup peak {startup_peak_mb():.1f} MB"
    )
    work = Path(tempfile.mkdtemp(prefix="plan_accuracy_"))
    cells = [(m, b, t, p) for p in a.precisions.split(",") for m in a.methods.split(",")
             for t in map(int, a.seq_lens.split(",")) for b in map(int, a.batches.split(","))]  # fmt: skip
    data_files, rows = {}, []
    for t in sorted({c[2] for c in cells}):
        tr, trl = full_length_texts(t, TRAIN_ROWS, 0)
        dv, dvl = full_length_texts(t, DEV_ROWS, 50_000)
        data_files[t] = work / f"data{t}.json"
        data_files[t].write_text(json.dumps({"train": tr, "train_labels": trl, "dev": dv, "dev_labels": dvl}))
        tokens = (TRAIN_ROWS + DEV_ROWS) * t  # truncated to t tokens each
        data_files[t, "bytes"] = dataset_bytes(TRAIN_ROWS + DEV_ROWS, sum(map(len, tr + dv)), tokens)
        data_files[t, "rows"] = len(token_rows(encode(load_tokenizer(default_model_dir()), tr, t)))
    # This driver imported torch: drop its code pages, which each worker could not trim while shared.
    trim_resident_memory()
    for m, b, t, p in tqdm(cells, desc="grid", unit="cell", file=sys.stderr):
        spec = MethodSpec(m, rank=a.rank, alpha=2.0 * a.rank, targets=("q", "v"))
        plan = plan_memory(cfg, spec, p, b, t, checkpointing=a.checkpointing, eval_batch=a.eval_batch,
                           data_bytes=data_files[t, "bytes"], table_rows=data_files[t, "rows"])  # fmt: skip
        res = work / "result.json"
        cmd = [sys.executable, __file__, "--worker", "--method", m, "--precision", p, "--data", str(data_files[t]),
               "--batch", str(b), "--seq-len", str(t), "--rank", str(a.rank), "--eval-batch", str(a.eval_batch),
               "--result", str(res)] + (["--checkpointing"] if a.checkpointing else [])  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"cell {m} b{b} t{t} {p} failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
            continue
        measured = json.loads(res.read_text())["peak_rss_mb"]
        rows.append({"method": m, "batch": b, "seq_len": t, "precision": p, "predicted_mb": plan.total_mb,
                     "measured_mb": measured, "error_pct": 100 * (plan.total_mb - measured) / measured})  # fmt: skip
    print(
        f"\n{'method':8} {'batch':>5} {'seq':>4} {'prec':5} {'predicted MB':>13} {'measured MB':>12} {'error':>7}"
    )
    for r in rows:
        print(f"{r['method']:8} {r['batch']:5d} {r['seq_len']:4d} {r['precision']:5} {r['predicted_mb']:13.1f} "
              f"{r['measured_mb']:12.1f} {r['error_pct']:+6.1f}%")  # fmt: skip
    if not rows:
        return 1
    errs = [r["error_pct"] for r in rows]
    within = sum(abs(e) <= 10 for e in errs)
    print(f"\ncells: {len(rows)}; within +/-10%: {within}; worst over-prediction {max(errs):+.1f}%, "
          f"worst under-prediction {min(errs):+.1f}% (target: never below -5%)")  # fmt: skip
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_accuracy.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for m, mk in zip(a.methods.split(","), "os^", strict=False):
        sel = [r for r in rows if r["method"] == m]
        ax.scatter([r["measured_mb"] for r in sel], [r["predicted_mb"] for r in sel], marker=mk, label=m)
    lo, hi = min(r["measured_mb"] for r in rows) * 0.9, max(r["measured_mb"] for r in rows) * 1.1
    ax.plot([lo, hi], [lo, hi], "k-", lw=1)
    ax.fill_between(
        [lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="grey", alpha=0.2, label="+/-10%"
    )
    ax.set_xlabel("measured peak RSS (MB, fresh process)")
    ax.set_ylabel("predicted peak RSS (MB, plan_memory)")
    ax.set_title("Memory plan accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plan_accuracy.png", dpi=120)
    print(f"wrote {out / 'plan_accuracy.json'} and {out / 'plan_accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
