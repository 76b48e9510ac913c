"""`edge-tune profile`: every method x base precision trained for N steps on SST-2 under a device
profile, each in its own fresh process (so peak RSS is its own), and compared on memory, speed and
accuracy. Prints a table, writes JSON and a PNG. With `--runtimes`, each trained patch an exported runtime
takes is also served there (onnxruntime: the int8 graph + the patch as an adapter, torch-free; executorch:
the XNNPACK program, one sentence a pass), a fresh process a row: its peak RSS is the serving process's,
its latency and SST-2 dev accuracy the runtime's."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import EdgeTuneError

RUNTIMES = ("torch", "onnxruntime", "executorch")
COLUMNS = [  # (key, header, format)
    ("method", "method", "{:8}"), ("precision", "base", "{:5}"), ("runtime", "runtime", "{:11}"), ("trainable", "trainable", "{:>10,}"),
    ("patch_kb", "patch KB", "{:>9.1f}"), ("peak_rss_mb", "peak MB", "{:>8.0f}"), ("step_ms", "step ms", "{:>8.0f}"),
    ("train_sent_s", "sent/s", "{:>7.0f}"), ("lat1_ms", "b1 ms", "{:>7.1f}"), ("lat32_ms", "b32 ms", "{:>7.0f}"),
    ("dev_accuracy", "SST-2 dev", "{:>9.4f}"),
]  # fmt: skip


def run_one(profile: str | None, method: str, precision: str, steps: int, out: Path) -> dict:
    """In this process: train, export, reload, time inference. Returns one table row."""
    from .bank import PatchBank
    from .data import read_tsv
    from .resources import tasks_dir
    from .rss import peak_rss_mb
    from .run import adapt

    r = adapt("sst2", out, method=method, profile=profile, steps=steps, eval_every=steps, precision=precision,
              progress=False)  # fmt: skip
    bank = PatchBank(precision=precision)
    bank.activate(bank.load(out))
    dev = read_tsv(tasks_dir() / "sst2" / "dev.tsv").texts

    def median_ms(texts: list[str], n: int) -> float:
        bank.predict(texts)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            bank.predict(texts, batch_size=32)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    step = statistics.median(r.train.step_seconds) if r.train.step_seconds else float("nan")
    return {
        "method": method, "precision": precision, "runtime": "torch", "trainable": r.train.trained_values or sum(t.numel() for t in r.train.tensors.values()),
        "patch_kb": r.patch_bytes / 1024, "peak_rss_mb": peak_rss_mb(), "budget_mb": r.profile.memory_budget_mb,
        "step_ms": step * 1e3, "train_sent_s": min(32, r.profile.max_batch_size) / step,
        "lat1_ms": median_ms(dev[:1], 20), "lat32_ms": median_ms(dev[:32], 5), "dev_accuracy": r.train.dev_accuracy,
    }  # fmt: skip


def serve_one(runtime: str, export_dir: Path, artifact: Path) -> dict:
    """In this (fresh) process: serve a patch's export `artifact` (an adapter file, or the ExecuTorch
    program's inputs) through `runtime`'s export in `export_dir`; the row's serving figures (peak RSS of this
    process, b1 / b32 ms, SST-2 dev accuracy)."""
    from .data import read_tsv
    from .resources import tasks_dir

    dev = read_tsv(tasks_dir() / "sst2" / "dev.tsv")
    if runtime == "onnxruntime":
        from .runtime import PatchBank

        bank = PatchBank(export_dir, load_adapters=False)
        name = bank.load(artifact)
        predict = lambda texts: [p.label for p in bank.predict(texts, patch=name, batch_size=32)]  # noqa: E731
    else:
        import torch
        from safetensors.torch import load_file

        from .executorch_export import load_program, run_program
        from .tokens import load_tokenizer

        forward, tok = load_program(export_dir), load_tokenizer(export_dir)
        inputs = load_file(artifact)
        labels = json.loads(open_metadata(artifact)["label_names"])

        def predict(texts: list[str]) -> list[str]:  # the program takes one sentence a pass
            out = []
            for t in texts:
                ids = torch.tensor([tok.encode(t).ids[:128]])
                out.append(labels[int(run_program(forward, ids, torch.ones_like(ids), inputs).argmax())])
            return out

    def median_ms(texts: list[str], n: int) -> float:
        predict(texts)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            predict(texts)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    got = predict(dev.texts)
    acc = sum(g == dev.label_names[y] for g, y in zip(got, dev.labels, strict=True)) / len(dev)
    from .rss import peak_rss_mb

    return {"lat1_ms": median_ms(dev.texts[:1], 20), "lat32_ms": median_ms(dev.texts[:32], 5),
            "dev_accuracy": acc, "peak_rss_mb": peak_rss_mb(), "torch_imported": "torch" in sys.modules}  # fmt: skip


def open_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's string metadata."""
    from .tensorfile import read_header

    return read_header(path).metadata


def runtime_rows(rows: list[dict], runtimes: list[str], work: Path) -> list[dict]:
    """Each trained int8 patch an exported runtime takes, served there (a fresh process a row)."""
    from .executorch_export import EXPORTABLE as ET_METHODS
    from .patch import load_patch

    out = []
    trained = [r for r in rows if "error" not in r and r["precision"] == "int8"]
    for runtime in [r for r in runtimes if r != "torch"]:
        export_dir = work / runtime
        if runtime == "onnxruntime":
            from .runtime import MAPPABLE as takes
        else:
            takes = ET_METHODS
        for r in [r for r in trained if r["method"] in takes]:
            print(f"profile: {r['method']} patch served by {runtime}", file=sys.stderr, flush=True)
            patch = work / f"{r['method']}_{r['precision']}.patch"
            row = {k: r[k] for k in ("method", "precision", "trainable", "budget_mb")} | {"runtime": runtime}
            try:
                if runtime == "onnxruntime":
                    from .onnx_export import export_onnx

                    export_onnx(export_dir, [str(patch)])
                    artifact = export_dir / f"{load_patch(patch).manifest.task or patch.stem}.onnx_adapter"
                else:
                    from .executorch_export import export_executorch

                    export_executorch(export_dir / r["method"], [str(patch)])
                    artifact = export_dir / r["method"] / f"{load_patch(patch).name}.inputs"
            except EdgeTuneError as e:
                out.append(row | {"error": str(e.what)})
                continue
            res = work / f"{runtime}_{r['method']}.json"
            where = export_dir if runtime == "onnxruntime" else export_dir / r["method"]
            cmd = [
                sys.executable,
                "-m",
                "edge_tune.profiling",
                "serve",
                runtime,
                str(where),
                str(artifact),
                str(res),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                out.append(row | {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
                continue
            served = json.loads(res.read_text())
            out.append(row | served | {"patch_kb": artifact.stat().st_size / 1024, "step_ms": float("nan"),
                                       "train_sent_s": float("nan")})  # fmt: skip
    return out


def profile_grid(profile: str | None, methods: list[str], precisions: list[str], steps: int,
                 out_dir: Path, progress: bool = True, runtimes: list[str] | None = None) -> list[dict]:  # fmt: skip
    """Each method x precision in a fresh `python -m edge_tune.profiling` process; rows in grid order, then
    the `runtimes`' rows (see the module doc)."""
    from tqdm import tqdm

    rows = []
    work = Path(tempfile.mkdtemp(prefix="edge_tune_profile_"))
    grid = [(m, p) for p in precisions for m in methods]
    from .rss import trim_resident_memory

    # This process imported torch: drop its code pages, which a child could not trim while shared.
    trim_resident_memory()
    for i, (m, p) in enumerate(
        tqdm(grid, desc="profile", unit="config", disable=not progress, file=sys.stderr)
    ):
        if not progress:  # off a terminal: a line per configuration, not a silent wait of minutes
            print(f"profile: {m} on {p} ({i + 1}/{len(grid)}), {steps} steps", file=sys.stderr, flush=True)
        res = work / f"{m}_{p}.json"
        cmd = [sys.executable, "-m", "edge_tune.profiling", profile or "", m, p, str(steps), str(work / f"{m}_{p}.patch"),
               str(res)]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            rows.append({"method": m, "precision": p, "error": last})
            continue
        rows.append(json.loads(res.read_text()))
    rows += runtime_rows(rows, runtimes or [], work)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, out_dir / "profile.png")
    return rows


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table (units in the headers)."""
    width = [max(len(h), 9) for _, h, _ in COLUMNS]
    lines = [" ".join(h.rjust(w) for (_, h, _), w in zip(COLUMNS, width, strict=True))]
    for r in rows:
        if "error" in r:
            lines.append(
                f"{r['method']:>9} {r['precision']:>9} {r.get('runtime', 'torch'):>9} error: {r['error']}"
            )
            continue
        lines.append(
            " ".join(
                f.format({"runtime": "torch", **r}[k]).strip().rjust(w)
                for (k, _, f), w in zip(COLUMNS, width, strict=True)
            )
        )
    return "\n".join(lines)


def pareto_front(rows: list[dict], cost: str) -> list[dict]:
    """The rows no other row beats on both dev accuracy (higher) and `cost` (lower), by ascending cost."""
    ok = sorted((r for r in _trained(rows)), key=lambda r: (r[cost], -r["dev_accuracy"]))
    front, best = [], -1.0
    for r in ok:
        if r["dev_accuracy"] > best:
            front.append(r)
            best = r["dev_accuracy"]
    return front


def _trained(rows: list[dict]) -> list[dict]:
    """The rows of training runs (the torch path) that completed: the ones a method is chosen from."""
    return [r for r in rows if "error" not in r and r.get("runtime", "torch") == "torch"]


def best_row(rows: list[dict]) -> dict | None:
    """The most accurate configuration whose measured peak stayed within its profile's budget (the lower
    peak on a tie), or None."""
    fits = [r for r in _trained(rows) if r["peak_rss_mb"] <= r["budget_mb"]]
    return max(fits, key=lambda r: (r["dev_accuracy"], -r["peak_rss_mb"]), default=None)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _trained(rows)
    if not ok:
        return
    fig, (a, k, b) = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, cost, label in ((a, "peak_rss_mb", "peak training RSS (MB)"), (k, "patch_kb", "patch KB (log)")):
        for i, r in enumerate(ok):  # labels alternate above and below: neighbours often share a spot
            ax.scatter(r[cost], r["dev_accuracy"], color="tab:blue")
            ax.annotate(f"{r['method']} {r['precision']}", (r[cost], r["dev_accuracy"]), fontsize=7,
                        xytext=(4, 4 if i % 2 else -10), textcoords="offset points")  # fmt: skip
        front = pareto_front(ok, cost)
        ax.step([r[cost] for r in front], [r["dev_accuracy"] for r in front], where="post", color="tab:orange",
                label="Pareto front")  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("SST-2 dev accuracy")
    k.set_xscale("log")
    a.axvline(ok[0]["budget_mb"], color="red", ls="--", label=f"budget {ok[0]['budget_mb']} MB")
    a.legend(fontsize=8)
    k.legend(fontsize=8)
    labels = [f"{r['method']}\n{r['precision']}" for r in ok]
    xs = range(len(ok))
    for off, key, label in ((-0.27, "step_ms", "train step"), (0, "lat32_ms", "batch-32 inference"),
                            (0.27, "lat1_ms", "batch-1 inference")):  # fmt: skip
        b.bar([x + off for x in xs], [r[key] for r in ok], width=0.27, label=label)
    b.set_yscale("log")  # batch-1 is ~20x shorter than the rest
    b.set_ylabel("median ms, log scale")
    b.set_xticks(list(xs), labels, fontsize=7)
    b.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    try:
        if sys.argv[1] == "serve":
            runtime, where, artifact, result = sys.argv[2:6]
            row = serve_one(runtime, Path(where), Path(artifact))
        else:
            prof, method, precision, n, patch, result = sys.argv[1:7]
            row = run_one(prof or None, method, precision, int(n), Path(patch))
    except EdgeTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    Path(result).write_text(json.dumps(row))
