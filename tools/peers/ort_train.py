"""Peer: ONNX Runtime on-device training (onnxruntime-training 1.19.2, its artifacts + training API), run in
its own venv. `--phase prep` exports the fp32 model to ONNX (opset 14: gradient building failed at 17) and
generates the training artifacts with only the method's tensors trainable; `--phase train` (a fresh
process, so peak RSS is the training runtime's own) trains, evaluates, times batch-1 inference on the
training module and exports the inference graph; `--phase serve` times batch-1 on that graph in an
InferenceSession (a fresh process: ONNX Runtime's deployed path).

Methods: bitfit (every bias + classifier) and lora (r8 on query/value + classifier). For LoRA the factors
are exported non-zero (the exporter folds identical zero-initialised B matrices into one shared
initializer) and B is zeroed in the checkpoint before training."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402


def prep(a) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        a.model_dir, num_labels=2, attn_implementation="eager"
    )
    if a.method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=protocol.LORA_RANK, lora_alpha=protocol.LORA_ALPHA, target_modules=["query", "value"]
        )
        model = get_peft_model(model, cfg).base_model.model
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-3)  # non-zero so that the exporter keeps one initializer per factor
    model.eval()
    ids = torch.ones(2, 8, dtype=torch.long)
    onnx_path = Path(a.work) / "model.onnx"
    torch.onnx.export(model, (ids, torch.ones_like(ids)), str(onnx_path), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], opset_version=14, dynamo=False, do_constant_folding=False,
                      dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}, "logits": {0: "b"}})  # fmt: skip
    import onnx
    from onnxruntime.training import artifacts

    m = onnx.load(str(onnx_path))
    names = [i.name for i in m.graph.initializer]
    if a.method == "bitfit":
        train = [n for n in names if n.endswith(".bias") or n.startswith("classifier.")]
    else:
        train = [n for n in names if "lora_" in n or n.startswith("classifier.")]
    frozen = [n for n in names if n not in train]
    (Path(a.work) / "art").mkdir(exist_ok=True)
    artifacts.generate_artifacts(m, requires_grad=train, frozen_params=frozen, loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.AdamW, artifact_directory=str(Path(a.work) / "art"),
                                 additional_output_names=["logits"])  # fmt: skip
    (Path(a.work) / "trainable.txt").write_text("\n".join(train))


def train(a) -> None:
    import numpy as np
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    art = Path(a.work) / "art"
    arrays = protocol.load_arrays(a.arrays)
    state = CheckpointState.load_checkpoint(str(art / "checkpoint"))
    module = Module(str(art / "training_model.onnx"), state, str(art / "eval_model.onnx"))
    if a.method == "lora":  # parameters can be written only once a module has registered the device
        for n in (Path(a.work) / "trainable.txt").read_text().split():
            if "lora_B" in n:
                state.parameters[n] = np.zeros_like(state.parameters[n].data)
    opt = Optimizer(str(art / "optimizer_model.onnx"), module)
    total = len(arrays["train_labels"]) // a.batch
    timer = protocol.StepTimer()
    module.train()
    for step, (ids, mask, y) in enumerate(protocol.batches(arrays, a.batch)):
        with timer:
            opt.set_learning_rate(protocol.lr_at(a.method, step, total))
            module(ids, mask, y)
            opt.step()
            module.lazy_reset_grad()
    module.eval()
    # the eval graph still takes labels and returns (loss, logits) (logits kept by additional_output_names)
    logits = []
    for i in range(0, len(arrays["dev_labels"]), 64):
        sl = slice(i, i + 64)
        out = module(arrays["dev_ids"][sl], arrays["dev_mask"][sl], arrays["dev_labels"][sl])
        logits.append(out[1] if isinstance(out, list | tuple) else out)
    one = (*protocol.one_sentence(arrays), arrays["dev_labels"][:1])
    batch1 = protocol.median_ms(lambda: module(*one))
    n_train = module.get_contiguous_parameters(trainable_only=True).shape()[0]
    protocol.write_result(
        a.result, step_ms=timer.median_ms(), dev_accuracy=protocol.accuracy(np.concatenate(logits), arrays["dev_labels"]),
        adapter_kb=n_train * 4 / 1024, batch1_ms=batch1, trainable=int(n_train),
        note="fp32 model; no gradient clipping in the training API; adapter = trainable fp32 tensors",
    )  # fmt: skip
    # for `serve`, after the result (and its peak RSS) is written: the export holds a second copy of the model
    module.export_model_for_inferencing(str(Path(a.work) / "inference.onnx"), ["logits"])


def serve(a) -> None:
    """Batch-1 as ONNX Runtime deploys the trained model: the inference graph `train` exported, in an
    InferenceSession (all graph optimizations, the protocol's threads), in a fresh process."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = a.threads, 1
    sess = ort.InferenceSession(
        str(Path(a.work) / "inference.onnx"), opts, providers=["CPUExecutionProvider"]
    )
    ids, mask = protocol.one_sentence(protocol.load_arrays(a.arrays))
    feed = {"input_ids": ids, "attention_mask": mask}
    protocol.add_to_result(a.result, served_batch1_ms=protocol.median_ms(lambda: sess.run(["logits"], feed)))


if __name__ == "__main__":
    args = protocol.worker_args()
    {"prep": prep, "train": train, "serve": serve}[args.phase](args)
