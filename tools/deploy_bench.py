"""Deploying to ONNX Runtime, measured against the torch path, each serving process fresh (peak RSS is its
own), in one invocation:

  - parity on SST-2 dev with the sst2 task patch: the fp32 graph's logits against our fp32 model's (max
    abs difference), the int8 graph's accuracy and label agreement against our int8 model's;
  - serving: a process that loads the base and the four task patches and answers, torch (`edge_tune.bank`)
    against torch-free (`edge_tune.runtime`, the int8 graph + four adapters): peak RSS (VmHWM), start to
    first answer (the interpreter's start included), batch-1 latency on a short sentence (median of 300),
    adapter activate p50 / p99 (µs over 10,000), answers after A -> B -> A equal to A's;
  - ExecuTorch, where installed: the program with the sst2 patch as its inputs on SST-2 dev, one sentence
    at a time (accuracy, label agreement with our int8 model), batch-1 latency, file sizes;
  - PEFT: PEFT -> patch -> PEFT tensors byte-identical, and PeftModel's features on transformers' fp32
    BertModel against ours on SST-2 dev.

    python tools/deploy_bench.py --patches DIR [--out out/deploy_bench] [--threads 2]

DIR holds <task>_<method>.patch files (tools/build_task_patches.py) for sst2, cr, subj and mpqa.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

T0 = time.perf_counter()  # the serving worker's clock starts before any import
ROOT = Path(__file__).resolve().parent.parent
TASKS = ("sst2", "cr", "subj", "mpqa")
SHORT = "a gripping, funny film."


def serve_worker(kind: str, patches: list[str], export: str, threads: int) -> dict:
    """Load the base and the task patches as a serving process would, answer, then time batch-1 and swaps."""
    import statistics

    if kind == "torch":
        import torch

        from edge_tune.bank import PatchBank

        torch.set_num_threads(threads)
        bank = PatchBank(precision="int8")
        names = [bank.load(p) for p in patches]
        bank.activate(names[0])
    else:
        from edge_tune.runtime import PatchBank

        bank = PatchBank(export, threads=threads, load_adapters=False)
        names = [bank.load(Path(export) / f"{Path(p).stem.split('_')[0]}.onnx_adapter") for p in patches]
    first = bank.predict([SHORT])
    first_s = time.perf_counter() - T0
    lat = []
    for i in range(320):
        t = time.perf_counter()
        bank.predict([SHORT])
        if i >= 20:
            lat.append((time.perf_counter() - t) * 1000)
    swaps = []
    for i in range(10000):
        t = time.perf_counter()
        bank.activate(names[i % 2])
        swaps.append((time.perf_counter() - t) * 1e6)
    swaps.sort()
    texts = [SHORT, "dull, lifeless and far too long.", "the plot is nothing but boilerplate cliches."]
    bank.activate(names[0])
    a = bank.predict(texts)
    bank.activate(names[1])
    bank.predict(texts)
    bank.activate(names[0])
    from edge_tune.rss import peak_rss_mb

    return {"kind": kind, "peak_rss_mb": peak_rss_mb(), "first_answer_s": first_s, "first": first[0].label,
            "batch1_ms": statistics.median(lat), "activate_p50_us": swaps[len(swaps) // 2],
            "activate_p99_us": swaps[int(0.99 * len(swaps))], "aba_equal": bank.predict(texts) == a,
            "torch_imported": "torch" in sys.modules}  # fmt: skip


def parity(sst2_patch: str, out: Path) -> dict:
    """fp32 and int8 graphs against our fp32 and int8 models on SST-2 dev under the sst2 patch."""
    import numpy as np
    import torch

    from edge_tune.bank import PatchBank as TorchBank
    from edge_tune.data import collate, read_tsv
    from edge_tune.onnx_export import export_onnx
    from edge_tune.runtime import PatchBank
    from edge_tune.tokens import encode, length_buckets

    dev = read_tsv(ROOT / "data" / "sst2" / "dev.tsv")
    res = {}
    for precision in ("fp32", "int8"):
        export_onnx(out / f"onnx_{precision}", [sst2_patch], precision)
        ort_bank = PatchBank(out / f"onnx_{precision}")
        bank = TorchBank(precision=precision)
        bank.activate(bank.load(sst2_patch))
        tok = encode(bank.base.tokenizer, dev.texts, bank.patches[bank.active].manifest.seq_len)
        order = sorted(range(len(tok)), key=lambda i: len(tok[i]))
        ours, theirs = np.zeros((len(tok), 2), np.float32), np.zeros((len(tok), 2), np.float32)
        run_options = next(iter(ort_bank.adapters.values())).run_options
        for s, e in length_buckets([len(tok[i]) for i in order], 64):
            idx = order[s:e]
            ids, mask = collate([tok[i] for i in idx])
            with torch.inference_mode():
                ours[idx] = bank.base.model(ids, mask).numpy()
            feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
            theirs[idx] = ort_bank.session.run(["logits"], feed, run_options)[0]
        y = np.array(dev.labels)
        res[precision] = {"max_abs_logit_diff": float(np.abs(ours - theirs).max()),
                          "ours_acc": float((ours.argmax(1) == y).mean()),
                          "onnx_acc": float((theirs.argmax(1) == y).mean()),
                          "agreement": float((ours.argmax(1) == theirs.argmax(1)).mean())}  # fmt: skip
    return res


def executorch_figures(patches: list[str], out: Path, threads: int) -> dict | None:
    """The ExecuTorch program (all four patches as inputs) on SST-2 dev one sentence at a time, against our
    int8 model: accuracy, label agreement, batch-1 latency. None where ExecuTorch is not installed."""
    import importlib.util
    import statistics

    if importlib.util.find_spec("executorch") is None:
        return None
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from edge_tune.bank import PatchBank as TorchBank
    from edge_tune.data import read_tsv
    from edge_tune.executorch_export import export_executorch, load_program, run_program

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    export_executorch(out / "executorch", patches)
    export_s = time.perf_counter() - t0
    forward = load_program(out / "executorch")
    bank = TorchBank(precision="int8")
    name = bank.load(patches[0])
    inputs = load_file(out / "executorch" / f"{name}.inputs")
    dev = read_tsv(ROOT / "data" / "sst2" / "dev.tsv")
    ours = [p.label for p in bank.predict(dev.texts, patch=name)]
    labels = bank.patches[name].manifest.label_names
    theirs = []
    for text in dev.texts:
        ids = torch.tensor([bank.base.tokenizer.encode(text).ids[:128]])
        theirs.append(labels[int(run_program(forward, ids, torch.ones_like(ids), inputs).argmax())])
    ids = torch.tensor([bank.base.tokenizer.encode(SHORT).ids])
    lat = []
    for i in range(320):
        t = time.perf_counter()
        run_program(forward, ids, torch.ones_like(ids), inputs)
        if i >= 20:
            lat.append((time.perf_counter() - t) * 1000)
    y = [dev.label_names[i] for i in dev.labels]
    return {"export_s": export_s, "ours_acc": float(np.mean([a == b for a, b in zip(ours, y, strict=True)])),
            "executorch_acc": float(np.mean([a == b for a, b in zip(theirs, y, strict=True)])),
            "agreement": float(np.mean([a == b for a, b in zip(ours, theirs, strict=True)])),
            "batch1_ms": statistics.median(lat),
            "pte_mb": (out / "executorch" / "model.pte").stat().st_size / 2**20,
            "ptd_mb": (out / "executorch" / "model.ptd").stat().st_size / 2**20}  # fmt: skip


def peft_figures(sst2_patch: str, out: Path) -> dict | None:
    """PEFT interop on the sst2 patch: PEFT -> patch -> PEFT byte-identical tensors, and `PeftModel` on
    transformers' fp32 BertModel against our fp32 model with the patch, mean-pooled features over SST-2 dev.
    None where PEFT is not installed."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return None
    sys.modules.setdefault("torchao", None)  # as the PEFT peers run (tools/peers/hf_peft.py)
    import peft
    import torch
    import transformers
    from safetensors.torch import load_file

    from edge_tune.bank import PatchBank as TorchBank
    from edge_tune.base import default_model_dir, load_base
    from edge_tune.data import collate, read_tsv
    from edge_tune.peft_adapter import WEIGHTS, export_peft, import_peft
    from edge_tune.tokens import encode, length_buckets

    first = export_peft(sst2_patch, out / "peft")
    again = export_peft(import_peft(first, out / "peft_back.patch"), out / "peft_again")
    a, b = load_file(first / WEIGHTS), load_file(again / WEIGHTS)
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    hf = transformers.BertModel.from_pretrained(str(default_model_dir()), local_files_only=True)
    model = peft.PeftModel.from_pretrained(hf, str(first)).eval()
    base = load_base(precision="fp32")
    bank = TorchBank(base)
    bank.activate(bank.load(sst2_patch))
    dev = read_tsv(ROOT / "data" / "sst2" / "dev.tsv")
    tok = encode(base.tokenizer, dev.texts, bank.patches[bank.active].manifest.seq_len)
    order = sorted(range(len(tok)), key=lambda i: len(tok[i]))
    worst = 0.0
    for s, e in length_buckets([len(tok[i]) for i in order], 64):
        ids, mask = collate([tok[i] for i in order[s:e]])
        with torch.inference_mode():
            ours = base.model.pool(ids, mask)
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            theirs = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        worst = max(worst, float((ours - theirs).abs().max()))
    return {"round_trip_identical": identical, "tensors": len(a), "max_abs_feature_diff": worst}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--patches", required=True, help="folder of <task>_<method>.patch files (sst2, cr, subj, mpqa)"
    )
    ap.add_argument("--out", default="out/deploy_bench", help="folder for the exports and deploy_bench.json")
    ap.add_argument(
        "--threads", type=int, default=2, help="compute threads of each serving process (default 2)"
    )
    ap.add_argument("--worker", choices=["torch", "onnxruntime"], help=argparse.SUPPRESS)
    ap.add_argument("--export", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.patches)
    patches = [str(next(iter(sorted(folder.glob(f"{t}_*.patch"))), "")) for t in TASKS]
    if args.worker:
        print(json.dumps(serve_worker(args.worker, patches, args.export, args.threads)))
        return 0
    if not all(patches):
        sys.exit(f"error: {folder} needs a <task>_<method>.patch for each of {', '.join(TASKS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from edge_tune.onnx_export import export_onnx

    export_onnx(out / "onnx", patches, "int8")
    rows = []
    for kind in ("torch", "onnxruntime"):  # each in a fresh process
        cmd = [sys.executable, __file__, "--patches", str(folder), "--worker", kind, "--export", str(out / "onnx"),
               "--threads", str(args.threads)]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            sys.exit(f"error: the {kind} worker failed: {p.stderr.strip().splitlines()[-1]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    par = parity(patches[0], out)
    torch_row, ort_row = rows
    print("| serving process | peak RSS MB | start to first answer s | batch-1 ms | activate p50 / p99 µs | A->B->A = A | torch imported |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['peak_rss_mb']:.0f} | {r['first_answer_s']:.2f} | {r['batch1_ms']:.2f} | "
              f"{r['activate_p50_us']:.1f} / {r['activate_p99_us']:.1f} | {r['aba_equal']} | {r['torch_imported']} |")  # fmt: skip
    print(f"\nRSS onnxruntime / torch: {ort_row['peak_rss_mb'] / torch_row['peak_rss_mb']:.2f}x (target <= 0.5x); "
          f"batch-1 {ort_row['batch1_ms'] / torch_row['batch1_ms']:.2f}x (target <= 1.0x)")  # fmt: skip
    print(
        "\n| graph | max abs logit diff vs ours | ours SST-2 dev | ONNX Runtime SST-2 dev | label agreement |"
    )
    print("|---|---|---|---|---|")
    for k, r in par.items():
        print(f"| {k} | {r['max_abs_logit_diff']:.2e} | {r['ours_acc']:.4f} | {r['onnx_acc']:.4f} | {r['agreement']:.4f} |")  # fmt: skip
    et = executorch_figures(patches, out, args.threads)
    if et is None:
        print("\nExecuTorch: not installed here (pip install -e '.[export]'), not measured")
    else:
        print("\n| ExecuTorch (XNNPACK, batch 1) | export s | model.pte MB | model.ptd MB | ours SST-2 dev | ExecuTorch SST-2 dev | label agreement | batch-1 ms |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        print(f"| int8 dynamic linears | {et['export_s']:.0f} | {et['pte_mb']:.1f} | {et['ptd_mb']:.1f} | {et['ours_acc']:.4f} | "
              f"{et['executorch_acc']:.4f} | {et['agreement']:.4f} | {et['batch1_ms']:.2f} |")  # fmt: skip
    pf = peft_figures(patches[0], out)
    if pf is None:
        print("\nPEFT: not installed here, not measured")
    else:
        print(f"\nPEFT: PEFT -> patch -> PEFT {'byte-identical' if pf['round_trip_identical'] else 'DIFFERENT'} "
              f"({pf['tensors']} tensors); PeftModel vs ours (fp32), SST-2 dev mean-pooled features: max abs diff "
              f"{pf['max_abs_feature_diff']:.2e} (target <= 1e-4)")  # fmt: skip
    result = {"serving": rows, "parity": par, "executorch": et, "peft": pf}
    (out / "deploy_bench.json").write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out / 'deploy_bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
