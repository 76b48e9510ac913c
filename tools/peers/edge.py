"""edge_tune in compare_peers: the quantized base (`--variant int8|int4`) and a delta method, trained on
the protocol's batches with edge_tune's own pieces (model, methods, AdamW, fp16 patch). One row per
process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import protocol  # noqa: E402


def main(a) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from edge_tune.base import load_base
    from edge_tune.methods import MethodSpec, apply_method
    from edge_tune.optim import AdamW, clip_grad_norm
    from edge_tune.patch import Manifest, save_patch
    from edge_tune.rss import apply_process_settings

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)  # dropout's masks: the protocol's seed 0, as the other rows seed theirs
    apply_process_settings()  # as `edge-tune train` does
    arrays = protocol.load_arrays(a.arrays)
    base = load_base(a.model_dir, precision=a.variant)
    model = base.model
    model.reset_head(2, 0)
    spec = MethodSpec(a.method, rank=protocol.LORA_RANK, alpha=protocol.LORA_ALPHA, targets=("q", "v"),
                      tokens=protocol.PROMPT_TOKENS, reparam=protocol.REPARAM)  # fmt: skip
    params = apply_method(model, spec, 0)
    head_scale = protocol.HEAD_LR / protocol.LR[a.method] if spec.method.head_lr_default else 1.0
    groups = [{"params": [p for n, p in params.items() if not n.startswith("head.")], "scale": 1.0},
              {"params": [p for n, p in params.items() if n.startswith("head.")], "scale": head_scale}]  # fmt: skip
    opt = AdamW([g for g in groups if g["params"]], lr=protocol.LR[a.method])
    word = model.encoder.word.weight_full
    if word is not None:  # as the trainer does: moments for the rows the training data can touch
        opt.rows_hint[word] = torch.from_numpy(np.unique(arrays["train_ids"]))
    total = len(arrays["train_labels"]) // a.batch
    frozen_encoder = a.method == "head"
    timer = protocol.StepTimer()
    model.train()
    for step, (ids, mask, y) in enumerate(protocol.batches(arrays, a.batch)):
        with timer:
            for g in opt.param_groups:
                g["lr"] = protocol.lr_at(a.method, step, total) * g["scale"]
            x, m = torch.from_numpy(ids), torch.from_numpy(mask)
            if frozen_encoder:  # only the head trains: the encoder runs without autograd
                with torch.no_grad():
                    feats = model.pool(x, m)
                logits = model.head(model.dropout(feats))
            else:
                logits = model(x, m)
            F.cross_entropy(logits, torch.from_numpy(y)).backward()
            clip_grad_norm(list(params.values()), protocol.MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad()
    opt.state.clear()  # as the trainer does: the moments are freed before the patch is made
    model.eval()
    # the patch holds what the method stores (a trained reparametrization folded into what it produces)
    tensors = spec.method.fold(model, spec, {n: p.detach().clone() for n, p in params.items()})
    manifest = Manifest(method=a.method, hyper=spec.hyper(), label_names=["0", "1"], base_fingerprint=base.fingerprint,
                        base_precision=a.variant, tensors_sha256="", task="sst2", seq_len=ids.shape[1])  # fmt: skip
    patch = Path(a.work) / "sst2.patch"
    nbytes = save_patch(patch, tensors, manifest, dtype=torch.float16)
    with torch.no_grad():  # evaluate the patch as stored (fp16-rounded deltas)
        for n, p in model.named_parameters():
            if n in tensors:
                p.copy_(p.half().float())
    logits = []
    with torch.inference_mode():
        for i in range(0, len(arrays["dev_labels"]), 64):
            x, m = (torch.from_numpy(arrays[k][i : i + 64]) for k in ("dev_ids", "dev_mask"))
            logits.append(model(x, m).numpy())
        one = tuple(torch.from_numpy(t) for t in protocol.one_sentence(arrays))
        batch1 = protocol.median_ms(lambda: model(*one))
    protocol.write_result(
        a.result, step_ms=timer.median_ms(), dev_accuracy=protocol.accuracy(np.concatenate(logits), arrays["dev_labels"]),
        adapter_kb=nbytes / 1024, batch1_ms=batch1, trainable=sum(p.numel() for p in params.values()),
        patch_file_kb=os.path.getsize(patch) / 1024,
    )  # fmt: skip
    return 0


def serve(a) -> int:
    """Batch-1 as edge_tune deploys the patch (the `serve` phase, a fresh process): a PatchBank over a fresh
    base of the row's precision, its int8 weights packed once as `edge-tune serve` and `predict` run them."""
    import torch

    from edge_tune.bank import PatchBank
    from edge_tune.base import load_base

    torch.set_num_threads(a.threads)
    bank = PatchBank(load_base(a.model_dir, precision=a.variant))
    bank.activate(bank.load(Path(a.work) / "sst2.patch"))
    model = bank.base.model.eval()
    one = tuple(torch.from_numpy(t) for t in protocol.one_sentence(protocol.load_arrays(a.arrays)))
    with torch.inference_mode():
        protocol.add_to_result(a.result, served_batch1_ms=protocol.median_ms(lambda: model(*one)))
    return 0


if __name__ == "__main__":
    from edge_tune.rss import set_openmp_spin

    set_openmp_spin()  # as the `edge-tune` CLI does, before anything loads torch
    args = protocol.worker_args()
    sys.exit(serve(args) if args.phase == "serve" else main(args))
