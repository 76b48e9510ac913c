"""CUDA kernel benchmark (needs a GPU): the edge_tune:: ops of cpp_ext/cuda_kernels.cu against cuBLAS fp32
`F.linear` and the pure-PyTorch references run on the same GPU.

Per linear shape (K -> N in {384 -> 1536, 1536 -> 384}) and rows M (1024 = batch 16 x 64 tokens; 8 and 1,
inference), median µs over `--repeats` calls timed with CUDA events after 10 warm-up calls. The CUDA
kernels are written for correctness first (see the file's header): the dynamic int8 GEMM is one thread per
output without tensor cores, so this table says where they stand, not that they are fast.

    python tools/bench_cuda_kernels.py [--repeats 100] [--out out/bench_cuda_kernels]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_us(fn, args: tuple, repeats: int) -> float:
    import torch

    for _ in range(10):
        fn(*args)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=100, help="timed calls per cell (median reported)")
    ap.add_argument("--out", default="out/bench_cuda_kernels", help="folder for results.json")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("error: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    from edge_tune import ops, quant
    from edge_tune.kernels import fallback_reason, load_kernels

    if not load_kernels():
        print(f"error: kernels unavailable ({fallback_reason()})", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 baseline in true fp32, as the kernels compute
    rows = []
    with torch.inference_mode():
        for k, n in ((384, 1536), (1536, 384)):
            g = torch.Generator().manual_seed(0)
            w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
            q8, s8 = (t.cuda() for t in quant.quantize_int8(w))
            q4, s4 = (t.cuda() for t in quant.quantize_int4(w))
            A, B = torch.randn(8, k, generator=g).cuda() * 0.1, torch.randn(n, 8, generator=g).cuda() * 0.1
            w, b = w.cuda(), b.cuda()
            for m in (1024, 8, 1):
                x = torch.randn(m, k, generator=g).cuda()
                cells = {
                    "fp32 F.linear": (F.linear, (x, w, b)),
                    "int8_linear ref": (ops.int8_linear_ref, (x, q8, s8, b)),
                    "int8_linear": (ops.int8_linear, (x, q8, s8, b)),
                    "int8_linear_dynamic ref": (ops.int8_linear_dynamic_ref, (x, q8, s8, b)),
                    "int8_linear_dynamic": (ops.int8_linear_dynamic, (x, q8, s8, b)),
                    "lora_linear": (ops.lora_linear, (x, q8, s8, b, A, B, 2.0)),
                    "int4_linear ref": (ops.int4_linear_ref, (x, q4, s4, b)),
                    "int4_linear": (ops.int4_linear, (x, q4, s4, b)),
                }
                row = {
                    "K": k,
                    "N": n,
                    "M": m,
                    **{name: median_us(fn, args, a.repeats) for name, (fn, args) in cells.items()},
                }
                rows.append(row)
    names = [c for c in rows[0] if c not in ("K", "N", "M")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; median µs (CUDA events)")
    print(f"{'K->N':>10} {'M':>5} " + " ".join(f"{c:>24}" for c in names))
    for r in rows:
        print(f"{r['K']:>4}->{r['N']:<5} {r['M']:>5} " + " ".join(f"{r[c]:>24.1f}" for c in names))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
    )
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
