"""Peer: ExecuTorch's training runtime (executorch.extension.training), in its own venv. `--phase prep`
exports the fp32 model with its loss through torch.export + _export_forward_backward to a .pte (BitFit:
only biases and the classifier require grad) plus a forward-only batch-1 program; `--phase train` (a fresh
process) runs forward_backward + the runtime's SGD (its only optimizer; re-created each step to follow the
protocol's learning-rate schedule, so no momentum) for `--steps` steps.

Static shapes: ExecuTorch programs are exported at fixed shapes (batch x seq_len for training, the batch-1
sentence's length for latency). Dev accuracy: the portable kernels run ~7 s a training step here, so the
dev set is scored by PyTorch with the bias values ExecuTorch trained (the same arithmetic, far faster)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402


def model_and_trainable(a):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        a.model_dir, num_labels=2, attn_implementation="eager"
    )
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # dropout's RNG does not export to the portable runtime
    train = {n for n, _ in model.named_parameters() if n.endswith(".bias") or n.startswith("classifier.")}
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
    return model, train


def prep(a) -> None:
    import torch
    from executorch.exir import EdgeCompileConfig, to_edge
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    model, _ = model_and_trainable(a)
    arrays = protocol.load_arrays(a.arrays)

    class Train(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, ids, mask, y):
            logits = self.net(input_ids=ids, attention_mask=mask).logits
            return torch.nn.functional.cross_entropy(logits, y), logits.detach()

    class Infer(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, ids, mask):
            return self.net(input_ids=ids, attention_mask=mask).logits

    b = a.batch
    sample = tuple(torch.from_numpy(arrays[k][:b]) for k in ("train_ids", "train_mask", "train_labels"))
    ep = _export_forward_backward(export(Train(model), sample, strict=False))
    prog = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    (Path(a.work) / "train.pte").write_bytes(prog.buffer)
    one = tuple(torch.from_numpy(t) for t in protocol.one_sentence(arrays))
    with torch.no_grad():
        ep1 = export(Infer(model).eval(), one, strict=False)
    (Path(a.work) / "infer.pte").write_bytes(to_edge(ep1).to_executorch().buffer)


def train(a, steps: int) -> None:
    import numpy as np
    import torch
    from executorch.extension.pybindings.portable_lib import _load_for_executorch
    from executorch.extension.training import _load_for_executorch_for_training, get_sgd_optimizer

    torch.set_num_threads(a.threads)
    arrays = protocol.load_arrays(a.arrays)
    mod = _load_for_executorch_for_training(str(Path(a.work) / "train.pte"))
    timer = protocol.StepTimer()
    for step, (ids, mask, y) in enumerate(protocol.batches(arrays, a.batch)):
        if step >= steps:
            break
        with timer:
            mod.forward_backward(
                "forward", (torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(y))
            )
            opt = get_sgd_optimizer(mod.named_parameters(), protocol.lr_at("bitfit", step, steps))
            opt.step(mod.named_gradients())
    trained = {n: t.clone() for n, t in mod.named_parameters().items()}
    infer = _load_for_executorch(str(Path(a.work) / "infer.pte"))
    one = tuple(torch.from_numpy(t) for t in protocol.one_sentence(arrays))
    batch1 = protocol.median_ms(lambda: infer.forward(one), repeats=10, warmup=3)
    n_train = sum(t.numel() for t in trained.values())
    rss_training = protocol.peak_rss_mb()  # before PyTorch scores the dev set in this process
    model, _ = model_and_trainable(a)
    state = model.state_dict()
    with torch.no_grad():
        for n, t in trained.items():
            key = n if n in state else n.removeprefix("net.")
            if key not in state:
                raise KeyError(f"ExecuTorch parameter {n} has no PyTorch counterpart")
            state[key].copy_(t)
    model.eval()
    logits = []
    with torch.inference_mode():
        for i in range(0, len(arrays["dev_labels"]), 64):
            x, m = (torch.from_numpy(arrays[k][i : i + 64]) for k in ("dev_ids", "dev_mask"))
            logits.append(model(input_ids=x, attention_mask=m).logits.numpy())
    acc = protocol.accuracy(np.concatenate(logits), arrays["dev_labels"])
    protocol.write_result(
        a.result, step_ms=timer.median_ms(), dev_accuracy=acc, adapter_kb=n_train * 4 / 1024, batch1_ms=batch1,
        trainable=n_train, steps=min(steps, len(timer.times)),
        note=f"{len(timer.times)} steps only (portable kernels, 1 thread); SGD; accuracy scored by PyTorch",
    )  # fmt: skip
    import json

    row = json.loads(Path(a.result).read_text())
    row["peak_rss_mb"] = rss_training
    Path(a.result).write_text(json.dumps(row))


if __name__ == "__main__":
    argv = sys.argv[1:]
    phase, steps = "train", 20
    for flag in ("--phase", "--steps"):
        if flag in argv:
            i = argv.index(flag)
            val = argv[i + 1]
            del argv[i : i + 2]
            phase, steps = (val, steps) if flag == "--phase" else (phase, int(val))
    args = protocol.worker_args(argv)
    prep(args) if phase == "prep" else train(args, steps)
