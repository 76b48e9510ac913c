"""Peak training RSS, edge_tune against Hugging Face PEFT, each configuration in its own fresh process.

Same job in every row: SST-2 sentences joined to fill 64 tokens, batch 16, 20 optimizer steps, AdamW,
2 threads. PEFT runs on the fp32 model (`AutoModelForSequenceClassification`): LoRA r8 on query/value via
`get_peft_model`, and BitFit as "biases + classifier trainable" (PEFT has no BitFit method). edge_tune
runs the int8 and int4 bases, with and without activation checkpointing.

    python tools/memory_vs_peft.py [--steps 20] [--batch 16] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# ExecuTorch (the export extras) installs torchao, which transformers and PEFT import whenever it is
# installed (RSS and warnings): measured here, PEFT runs as where torchao is not installed.
sys.modules.setdefault("torchao", None)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))  # protocol: the peers' RSS rule

ROWS = [  # (runtime, method, precision, checkpointing)
    ("peft", "bitfit", "fp32", False),
    ("peft", "lora", "fp32", False),
    ("edge_tune", "bitfit", "int8", False),
    ("edge_tune", "bitfit", "int8", True),
    ("edge_tune", "bitfit", "int4", False),
    ("edge_tune", "lora", "int8", False),
    ("edge_tune", "lora", "int8", True),
    ("edge_tune", "lora", "int4", False),
]


def peft_worker(a, texts, labels) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from protocol import peak_rss_mb
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # No edge_tune in this process: nothing of ours may run in the peer's (its entry points set glibc's mmap
    # threshold, which changes PEFT's peak); the parent hands over the model folder.
    mdir = a.model_dir
    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModelForSequenceClassification.from_pretrained(mdir, num_labels=2)
    if a.method == "lora":
        cfg = LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]
        )
        model = get_peft_model(model, cfg)
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith(".bias") or n.startswith("classifier."))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for s in range(a.steps):
        i = s * a.batch % len(texts)
        enc = tok(texts[i : i + a.batch], padding="max_length", truncation=True, max_length=a.seq_len,
                  return_tensors="pt")  # fmt: skip
        out = model(**enc, labels=torch.tensor(labels[i : i + a.batch]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return peak_rss_mb()


def edge_worker(a, texts, labels) -> float:
    from edge_tune.base import load_base
    from edge_tune.data import Dataset
    from edge_tune.methods import MethodSpec
    from edge_tune.rss import apply_process_settings, peak_rss_mb
    from edge_tune.trainer import TrainConfig, train

    apply_process_settings()  # before anything loads, as `edge-tune train` does
    base = load_base(precision=a.precision)
    ds = Dataset(texts, labels, ["0", "1"], "sst2-64")
    dev = Dataset(texts[:64], labels[:64], ["0", "1"], "dev")
    cfg = TrainConfig(MethodSpec(a.method, rank=8, alpha=16.0, targets=("q", "v")), batch_size=a.batch,
                      seq_len=a.seq_len, steps=a.steps, eval_every=a.steps, checkpointing=a.checkpointing,
                      eval_batch_size=a.batch)  # fmt: skip
    train(base, ds, dev, cfg, progress=False)
    return peak_rss_mb()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per row (default 20)")
    ap.add_argument("--batch", type=int, default=16, help="sentences per step (default 16)")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per sentence (default 64)")
    ap.add_argument("--worker", choices=["peft", "edge_tune"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(2)
        d = json.loads(Path(a.data).read_text())
        fn = peft_worker if a.worker == "peft" else edge_worker
        Path(a.result).write_text(json.dumps({"peak_rss_mb": fn(a, d["texts"], d["labels"])}))
        return 0

    from plan_accuracy import full_length_texts

    work = Path(tempfile.mkdtemp(prefix="memory_vs_peft_"))
    texts, labels = full_length_texts(a.seq_len, a.steps * a.batch, 0)
    data = work / "data.json"
    data.write_text(json.dumps({"texts": texts, "labels": labels}))
    results = {}
    # full_length_texts imported torch here: drop its code pages, which a worker cannot trim while shared
    from edge_tune.base import default_model_dir
    from edge_tune.rss import trim_resident_memory

    trim_resident_memory()
    for runtime, method, precision, ck in ROWS:
        res = work / "r.json"
        cmd = [sys.executable, __file__, "--worker", runtime, "--method", method, "--precision", precision,
               "--data", str(data), "--result", str(res), "--steps", str(a.steps), "--batch", str(a.batch),
               "--seq-len", str(a.seq_len), "--model-dir", str(default_model_dir())] + (["--checkpointing"] if ck else [])  # fmt: skip
        print(f"running {runtime} {method} {precision}{' checkpointing' if ck else ''} ...", flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
        ok = p.returncode == 0
        err = "" if ok else (p.stderr.strip().splitlines() or ["failed"])[-1]
        results[runtime, method, precision, ck] = json.loads(res.read_text())["peak_rss_mb"] if ok else err
    print(f"\n{'runtime':10} {'method':7} {'base':5} {'ckpt':5} {'peak RSS MB':>12} {'vs PEFT':>8}")
    for (runtime, method, precision, ck), v in results.items():
        peft = results.get(("peft", method, "fp32", False))
        if isinstance(v, str):
            print(f"{runtime:10} {method:7} {precision:5} {str(ck):5} {v}")
            continue
        ratio = f"{v / peft:.2f}x" if isinstance(peft, float) else "n/a"
        print(f"{runtime:10} {method:7} {precision:5} {str(ck):5} {v:12.0f} {ratio:>8}")
    print(f"(batch {a.batch}, seq {a.seq_len} tokens, {a.steps} steps, 2 threads; targets: LoRA <= 0.45x, "
          "BitFit <= 0.5x PEFT)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
