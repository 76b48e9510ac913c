"""The int4 base's two scale formats side by side, in one process: folding scales (quant.quantize_int4, the
default: each row's group scales integer multiples of one unit, so int4_linear_dynamic runs the weight on
the int8 panels) and free fp16 scales of amax / 7 (`fold=False`: its group panels, a float step per group).

  - weight SQNR (dB) of MiniLM's 36 linear weights under each, and whether each folds;
  - int4_linear_dynamic on MiniLM's three shapes at 1, 17 and 1024 rows (µs, median of --calls calls, the
    formats alternating for --rounds rounds; the spread is over rounds);
  - one sentence through the whole int4 base (`model.predict_proba`, inference mode, ms): the first 20 SST-2
    dev sentences in turn, a base loaded with each format, alternating rounds.

    python tools/int4_formats.py [--threads 2] [--rounds 6] [--calls 100] [--out out/int4_formats]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools" / "peers"))

from edge_tune import rss  # noqa: E402

rss.set_openmp_spin()  # before torch loads, as the CLI does
import torch  # noqa: E402
from protocol import median_ms  # noqa: E402  (the peers' one timing rule)
from safetensors.torch import load_file  # noqa: E402

from edge_tune import base as base_mod  # noqa: E402
from edge_tune import ops, quant  # noqa: E402
from edge_tune.data import read_tsv  # noqa: E402
from edge_tune.tokens import encode  # noqa: E402

FORMATS = ("fold", "free")
SHAPES = ((384, 1536), (1536, 384), (384, 384))  # (in, out)
ROWS = (1, 17, 1024)


def linear_weights() -> list[torch.Tensor]:
    """MiniLM's encoder linear weights (fp32), as stored."""
    tensors = load_file(base_mod.default_model_dir() / "model.safetensors")
    return [
        t.float()
        for n, t in tensors.items()
        if "encoder.layer" in n and n.endswith(".weight") and t.dim() == 2
    ]


def sqnr_rows(weights: list[torch.Tensor]) -> dict[str, dict]:
    out = {}
    for fmt in FORMATS:
        err = sig = 0.0
        folds = 0
        for w in weights:
            packed, s = quant.quantize_int4(w, fold=fmt == "fold")
            err += (quant.dequantize_int4(packed, s) - w).pow(2).sum().item()
            sig += w.pow(2).sum().item()
            folds += quant.int4_as_int8(packed, s) is not None
        out[fmt] = {
            "sqnr_db": 10 * torch.log10(torch.tensor(sig / err)).item(),
            "folds": folds,
            "of": len(weights),
        }
    return out


def gemm_rows(rounds: int, calls: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for k, n in SHAPES:
        w, b = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
        weights = {fmt: quant.quantize_int4(w, fold=fmt == "fold") for fmt in FORMATS}
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            got = {fmt: [] for fmt in FORMATS}
            for r in range(rounds):
                for fmt in FORMATS if r % 2 == 0 else FORMATS[::-1]:
                    q4, s4 = weights[fmt]
                    got[fmt].append(
                        1e3
                        * median_ms(
                            lambda x=x, q4=q4, s4=s4, b=b: ops.int4_linear_dynamic(x, q4, s4, b), calls, 3
                        )
                    )
            rows.append({"shape": f"{k}->{n}", "rows": m, **got})
    return rows


def sentence_rounds(rounds: int, calls: int) -> dict[str, list[float]]:
    bases = {"fold": base_mod.load_base(precision="int4")}
    # The free format through the loader's own path: load_base quantizes with quant.quantize_int4.
    with mock.patch.object(quant, "quantize_int4", functools.partial(quant.quantize_int4, fold=False)):
        bases["free"] = base_mod.load_base(precision="int4")
    texts = read_tsv(ROOT / "data" / "sst2" / "dev.tsv").texts[:20]
    tokens = encode(bases["fold"].tokenizer, texts, 64)
    seqs = [tokens[i] for i in range(len(tokens))]
    got = {fmt: [] for fmt in FORMATS}
    with torch.inference_mode():
        for r in range(rounds):
            for fmt in FORMATS if r % 2 == 0 else FORMATS[::-1]:
                model, turn = bases[fmt].model, itertools.cycle(seqs)
                model.eval()
                got[fmt].append(median_ms(lambda m=model, t=turn: m.predict_proba([next(t)], 1), calls, 3))
    return got


def spread(xs: list[float], unit: str = "") -> str:
    return f"{min(xs):.1f}-{max(xs):.1f}{unit}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds per comparison (default 6)")
    ap.add_argument(
        "--calls", type=int, default=100, help="timed calls per round, median taken (default 100)"
    )
    ap.add_argument("--out", default="out/int4_formats", help="folder for int4_formats.json")
    args = ap.parse_args()
    if args.threads < 1 or args.rounds < 1 or args.calls < 1:
        sys.exit("int4_formats: --threads, --rounds and --calls must be >= 1")
    torch.set_num_threads(args.threads)
    base_mod.load_kernels()
    rss.apply_process_settings()  # the tensor cache, as a serving or training process runs

    weights = linear_weights()
    sq = sqnr_rows(weights)
    print(f"MiniLM's {len(weights)} linear weights, int4 groups of {quant.GROUP_SIZE}:")
    for fmt in FORMATS:
        print(
            f"  {fmt:5s} scales: SQNR {sq[fmt]['sqnr_db']:.2f} dB, {sq[fmt]['folds']} of {sq[fmt]['of']} fold into int8"
        )

    gemm = gemm_rows(args.rounds, args.calls)
    print(
        f"\nint4_linear_dynamic, {args.threads} threads, median µs per round ({args.rounds} rounds, range shown)"
    )
    print(f"{'shape':<11}{'rows':>6}  {'fold':>16}  {'free':>16}  {'fold / free (medians)':>22}")
    for r in gemm:
        ratio = statistics.median(r["fold"]) / statistics.median(r["free"])
        print(
            f"{r['shape']:<11}{r['rows']:>6}  {spread(r['fold']):>16}  {spread(r['free']):>16}  {ratio:>21.2f}x"
        )

    sent = sentence_rounds(args.rounds, args.calls)
    print(
        f"\none sentence (SST-2 dev, batch 1) through the int4 base, {args.threads} threads, median ms per round:"
    )
    for fmt in FORMATS:
        print(f"  {fmt:5s} " + " ".join(f"{v:.2f}" for v in sent[fmt]))
    faster = sum(a < b for a, b in zip(sent["fold"], sent["free"], strict=True))
    print(f"  fold faster in {faster} of {args.rounds} rounds")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "int4_formats.json").write_text(
        json.dumps({"threads": args.threads, "sqnr": sq, "gemm": gemm, "sentence": sent}, indent=1)
    )
    print(f"wrote {out / 'int4_formats.json'}")


if __name__ == "__main__":
    main()
