"""Peer: Hugging Face transformers + PEFT on the fp32 model (head, BitFit, LoRA r8, and PEFT's own IA3,
prefix tuning, prompt tuning and P-tuning; full fine-tuning with plain transformers), and PEFT LoRA on a
bitsandbytes 8-bit or NF4 4-bit base (`--variant bnb8|bnb4`). One row per process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402

# ExecuTorch (the export extras) installs torchao, which transformers and PEFT import whenever it is
# installed (RSS and warnings): measured here, PEFT runs as where torchao is not installed.
sys.modules.setdefault("torchao", None)


def build(a):
    import torch
    from transformers import AutoModelForSequenceClassification

    kw = {}
    if a.variant in ("bnb8", "bnb4"):
        from transformers import BitsAndBytesConfig

        # The new classifier head crashes under bnb on CPU unless it is left unquantized.
        q = (
            BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"])
            if a.variant == "bnb8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"])
        )  # fmt: skip
        kw = {"quantization_config": q, "device_map": {"": "cpu"}}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(a.model_dir, num_labels=2, **kw)
    if a.method == "lora":
        from peft import LoraConfig, get_peft_model

        if a.variant:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        cfg = LoraConfig(r=protocol.LORA_RANK, lora_alpha=protocol.LORA_ALPHA, target_modules=["query", "value"],
                         modules_to_save=["classifier"])  # fmt: skip
        model = get_peft_model(model, cfg)
    elif a.method in PEFT_CONFIGS:
        from peft import get_peft_model

        model = get_peft_model(model, PEFT_CONFIGS[a.method]())
    else:  # head, bitfit, full: plain transformers
        for n, p in model.named_parameters():
            head = n.startswith("classifier.")
            p.requires_grad_(head or a.method == "full" or (a.method == "bitfit" and n.endswith(".bias")))
    return model


def _ia3():
    from peft import IA3Config

    return IA3Config(task_type="SEQ_CLS")  # PEFT's BERT placement: key, value, and the FFN's output dense


def _prefix():
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=protocol.PROMPT_TOKENS,
                              prefix_projection=True, encoder_hidden_size=protocol.REPARAM)  # fmt: skip


def _prompt():
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=protocol.PROMPT_TOKENS)


def _ptuning():
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=protocol.PROMPT_TOKENS,
                               encoder_hidden_size=protocol.REPARAM)  # fmt: skip


PEFT_CONFIGS = {"ia3": _ia3, "prefix": _prefix, "prompt": _prompt, "ptuning": _ptuning}


def main() -> int:
    a = protocol.worker_args()
    import torch

    torch.set_num_threads(a.threads)
    arrays = protocol.load_arrays(a.arrays)
    model = build(a)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    head = [p for n, p in named if "classifier" in n]
    rest = [p for n, p in named if "classifier" not in n]
    # the new head at HEAD_LR where the method's own lr is for pretrained weights (full), as edge_tune does
    head_scale = protocol.HEAD_LR / protocol.LR[a.method] if a.method == "full" else 1.0
    groups = [{"params": rest, "scale": 1.0}, {"params": head, "scale": head_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=protocol.LR[a.method], weight_decay=0.0)
    total = len(arrays["train_labels"]) // a.batch
    timer = protocol.StepTimer()
    model.train()
    for step, (ids, mask, y) in enumerate(protocol.batches(arrays, a.batch)):
        with timer:
            for g in opt.param_groups:
                g["lr"] = protocol.lr_at(a.method, step, total) * g["scale"]
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        labels=torch.from_numpy(y))  # fmt: skip
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, protocol.MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.eval()
    logits = []
    with torch.inference_mode():
        for i in range(0, len(arrays["dev_labels"]), 64):
            ids, mask = (torch.from_numpy(arrays[k][i : i + 64]) for k in ("dev_ids", "dev_mask"))
            logits.append(model(input_ids=ids, attention_mask=mask).logits.float().numpy())
        ids1, mask1 = protocol.one_sentence(arrays)
        one = {"input_ids": torch.from_numpy(ids1), "attention_mask": torch.from_numpy(mask1)}
        batch1 = protocol.median_ms(lambda: model(**one))
    import numpy as np

    acc = protocol.accuracy(np.concatenate(logits), arrays["dev_labels"])
    out = Path(a.work) / "adapter"
    if a.method == "lora" or a.method in PEFT_CONFIGS:
        model.save_pretrained(out)  # adapter_model.safetensors: the method's tensors + the saved classifier
        adapter = out / "adapter_model.safetensors"
    else:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        adapter = out / "trainable.safetensors"
        save_file(
            {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, adapter
        )
    protocol.write_result(
        a.result, step_ms=timer.median_ms(), dev_accuracy=acc, adapter_kb=os.path.getsize(adapter) / 1024,
        batch1_ms=batch1, trainable=sum(p.numel() for p in params),
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
