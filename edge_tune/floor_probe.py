"""Run as `python -m edge_tune.floor_probe` by floor.py, in a fresh process: imports the entry points, runs
tiny training and evaluation steps through every code path, and prints the floor and startup peak as JSON.
Nothing imports this module: it sits above everything it measures."""

from __future__ import annotations

import json

MB = 1024 * 1024


def measure_floor() -> dict[str, float]:
    """The floor and the startup peak (MB) of this fresh process: see floor.runtime_floor_mb. Follows
    adapt's order: import, load the kernels, trim, load the tokenizer (and, in adapt, data and base), trim,
    train."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from . import cli, quant, run  # noqa: F401  (what `edge-tune train` imports before its first trim)
    from .base import default_model_dir, read_config
    from .kernels import load_kernels
    from .methods import METHODS, MethodSpec, apply_method, detach_all
    from .model import skeleton
    from .optim import AdamW
    from .rss import apply_process_settings, peak_rss_mb, reset_peak_rss, trim_resident_memory
    from .tokens import load_tokenizer

    apply_process_settings()  # as every entry point does
    load_kernels()
    startup = peak_rss_mb()
    trim_resident_memory()
    reset_peak_rss()
    model_dir = default_model_dir()
    tok = load_tokenizer(model_dir)
    tok.encode_batch(["warm up the tokenizer ."])
    cfg = dataclasses.replace(
        read_config(model_dir), num_hidden_layers=1, vocab_size=64, max_position_embeddings=32
    )
    trim_resident_memory()
    tiny_bytes = 0
    for precision in ("int8", "int4"):
        model = skeleton(cfg, precision)
        tiny_bytes = max(tiny_bytes, quant.tensor_bytes(model))
        # 64 rows: past the kernels' few-row paths (16 rows), so the blocked int8 GEMM and MKL's sgemm code
        # that a real batch runs is resident too
        ids, mask = torch.randint(0, 64, (4, 16)), torch.ones(4, 16, dtype=torch.long)
        # Not the dense methods (partial, full): their fp32 linears are the code the adapters' and LoRA's
        # already page in; run here they added 28 MB that their real runs do not hold (plan_accuracy).
        for method in [m for m in METHODS if METHODS[m].trains_encoder and not METHODS[m].dense]:
            for ck in (False, True):
                model.encoder.checkpointing = ck
                spec = MethodSpec(method, rank=4, targets=("q", "v", "o", "ff1", "ff2"), tokens=4)
                params = apply_method(model, spec)
                opt = AdamW(params.values())
                F.cross_entropy(model(ids, mask), torch.zeros(4, dtype=torch.long)).backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                opt.step()
                detach_all(model)
        with torch.inference_mode():
            model.eval()(ids, mask)
    return {"floor": peak_rss_mb() - tiny_bytes / MB, "startup": startup}


if __name__ == "__main__":
    print(json.dumps({k: round(v, 2) for k, v in measure_floor().items()}))
