"""Accuracy against labelled-example count: the `fewshot` patch (class prototypes, no backprop) against
head-only training on the same examples, and the `zeroshot` patch (label descriptions, no examples), on a
built-in task's dev set. Small counts are averaged over seeds (each seed draws other examples).

    python tools/fewshot_curve.py [--data sst2] [--counts 8,16,64,256,all] [--seeds 3] [--out out/fewshot]

Prints a table (mean and spread of dev accuracy per count and method) and writes a JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="sst2", help="a built-in task or labelled data (default sst2)")
    ap.add_argument(
        "--counts", default="8,16,64,256,all", help="labelled sentences a class (default 8,16,64,256,all)"
    )
    ap.add_argument("--seeds", type=int, default=3, help="seeds averaged for counts up to 64 (default 3)")
    ap.add_argument("--profile", default=None, help="device profile (default: raspberry-pi-4-4gb)")
    ap.add_argument("--out", default="out/fewshot", help="folder for fewshot.json and fewshot.png")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from edge_tune.errors import EdgeTuneError
    from edge_tune.run import adapt

    counts = [None if c.strip() == "all" else int(c) for c in a.counts.split(",") if c.strip()]
    work = Path(tempfile.mkdtemp(prefix="fewshot_"))
    rows = []

    def run(method: str, n: int | None, seed: int, **kw) -> float:
        r = adapt(a.data, work / f"{method}.patch", method=method, per_class=n, seed=seed, profile=a.profile,
                  progress=False, **kw)  # fmt: skip
        return r.train.dev_accuracy

    try:
        zs = run("zeroshot", None, 0)
        rows.append({"count": 0, "method": "zeroshot", "accs": [zs]})
        for n in counts:
            seeds = range(a.seeds if n is not None and n <= 64 else 1)
            for method, kw in (("fewshot", {}), ("head", {}), ("head", {"head_init": "prototypes"})):
                label = method + (" (prototype init)" if kw else "")
                accs = [run(method, n, s, **kw) for s in seeds]
                rows.append({"count": n or "all", "method": label, "accs": accs})
                print(f"{n or 'all':>5} per class  {label:24} {statistics.mean(accs):.4f}", file=sys.stderr)
    except EdgeTuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{a.data} dev accuracy against labelled sentences a class (mean over seeds, min-max)\n")
    print(f"{'per class':>9}  {'method':24} {'dev acc':>8} {'spread':>15}")
    for r in rows:
        m = statistics.mean(r["accs"])
        print(f"{r['count']!s:>9}  {r['method']:24} {m:8.4f} {min(r['accs']):.4f}-{max(r['accs']):.4f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fewshot.json").write_text(json.dumps({"data": a.data, "rows": rows}, indent=1))
    _plot(rows, out / "fewshot.png")
    print(f"\nwrote {out / 'fewshot.json'} and {out / 'fewshot.png'}")
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    counts = [r["count"] for r in rows if r["method"] == "fewshot"]
    xs = list(range(len(counts)))
    for method in ("fewshot", "head", "head (prototype init)"):
        ys = [statistics.mean(r["accs"]) for r in rows if r["method"] == method]
        ax.plot(xs, ys, marker="o", label=method)
    zs = next(r["accs"][0] for r in rows if r["method"] == "zeroshot")
    ax.axhline(zs, color="gray", ls="--", label=f"zeroshot (no examples) {zs:.3f}")
    ax.set_xticks(xs, [str(c) for c in counts])
    ax.set_xlabel("labelled sentences a class")
    ax.set_ylabel("dev accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
