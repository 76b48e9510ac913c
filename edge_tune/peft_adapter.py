"""LoRA patches as PEFT adapters, and PEFT LoRA adapters as patches.

Out: `adapter_config.json` + `adapter_model.safetensors` that `PeftModel.from_pretrained` loads onto
transformers' `BertModel` of the same base with no missing or unexpected keys (the update is the same,
(alpha / r) B A on the same linears). The head cannot go with it: this project mean-pools the last hidden
states, while transformers' sequence classifier reads the CLS token through its pooler, so a head trained
here is wrong there. It is written beside the adapter as `edge_tune_head.safetensors` (with its label
names), never folded into a classifier silently.

In: a PEFT LoRA adapter for this base (BertModel or BertFor*: an optional `bert.` prefix) becomes a patch;
every key or shape that does not map is named in one line. The head comes from `edge_tune_head.safetensors`
in the folder (an adapter exported here) or from another patch of the same labels (`head_from`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .base import default_model_dir, hf_layer_names, load_base, read_config
from .errors import EdgeTuneError
from .patch import Manifest, load_patch, save_patch

CONFIG, WEIGHTS, HEAD = "adapter_config.json", "adapter_model.safetensors", "edge_tune_head.safetensors"
# our LoRA target -> the module path inside a BERT layer ("attention.self.query", ...)
_TARGET_PATH = {t: p.removeprefix("encoder.layer.0.") for t, p in hf_layer_names(0).items()}
_PATH_TARGET = {p: t for t, p in _TARGET_PATH.items()}
_KEY = re.compile(r"^base_model\.model\.(?:bert\.)?encoder\.layer\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def export_peft(patch_path: str | Path, out_dir: str | Path) -> Path:
    """Write a LoRA patch as a PEFT adapter folder (and its head beside it); returns the folder."""
    patch = load_patch(patch_path)
    m = patch.manifest
    if m.method != "lora":
        raise EdgeTuneError(f"PEFT export takes LoRA patches; this one is {m.method}", patch_path,
                            "train with --method lora")  # fmt: skip
    spec = m.spec()
    tensors = {}
    for name, t in patch.tensors.items():
        if name.startswith("head."):
            continue
        mod, _, which = name.rpartition(".")  # encoder.layers.3.q, lora_A
        _, _, layer, target = mod.split(".")
        tensors[f"base_model.model.{hf_layer_names(int(layer))[target]}.{which}.weight"] = (
            t.float().contiguous()
        )
    paths = sorted(re.escape(_TARGET_PATH[t]) for t in spec.targets)
    config = {
        "peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "r": spec.rank, "lora_alpha": spec.alpha,
        # a regex, not module-name suffixes: "output.dense" would match the attention output too
        "target_modules": rf".*encoder\.layer\.\d+\.({'|'.join(paths)})$",
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": str(default_model_dir()),
    }  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS)
    head = {k: patch.tensors[k].float().contiguous() for k in ("head.weight", "head.bias")}
    save_file(head, out / HEAD, metadata={"label_names": json.dumps(m.label_names), "pooling": "mean",
                                          "task": m.task, "seq_len": str(m.seq_len)})  # fmt: skip
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    return out


def import_peft(adapter_dir: str | Path, out: str | Path, head_from: str | Path | None = None,
                task: str = "") -> Path:  # fmt: skip
    """Write the PEFT LoRA adapter in `adapter_dir` as a patch at `out`; returns `out`."""
    folder = Path(adapter_dir)
    try:
        config = json.loads((folder / CONFIG).read_text())
        tensors = load_file(folder / WEIGHTS)
    except FileNotFoundError as e:
        raise EdgeTuneError(f"no {Path(e.filename).name}", folder, "pass a PEFT adapter folder") from None
    except Exception as e:  # bad JSON, an unreadable file, safetensors' own error type
        raise EdgeTuneError(f"unreadable adapter ({e.__class__.__name__})", folder) from None
    r, alpha = _check_config(config, folder)
    cfg = read_config(default_model_dir())
    dims = {"q": (cfg.hidden_size,) * 2, "k": (cfg.hidden_size,) * 2, "v": (cfg.hidden_size,) * 2,
            "o": (cfg.hidden_size,) * 2, "ff1": (cfg.hidden_size, cfg.intermediate_size),
            "ff2": (cfg.intermediate_size, cfg.hidden_size)}  # fmt: skip  # (in, out)
    found, problems, skipped = {}, [], []
    for key, t in sorted(tensors.items()):
        k = _KEY.match(key)
        if k is None or k.group(2) not in _PATH_TARGET or int(k.group(1)) >= cfg.num_hidden_layers:
            (skipped if re.search(r"\.(classifier|pooler)\.", key) else problems).append(key)
            continue
        layer, target, which = int(k.group(1)), _PATH_TARGET[k.group(2)], k.group(3)
        n_in, n_out = dims[target]
        want = (r, n_in) if which == "A" else (n_out, r)
        if tuple(t.shape) != want:
            problems.append(f"{key} has shape {tuple(t.shape)}, expected {want}")
            continue
        found[f"encoder.layers.{layer}.{target}.lora_{which}"] = t.float()
    if problems:
        raise EdgeTuneError(f"does not map onto this base: {'; '.join(problems[:5])}"
                            + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""), folder)  # fmt: skip
    if not found:
        raise EdgeTuneError("no LoRA factors in the adapter", folder)
    targets = tuple(t for t in _TARGET_PATH if any(n.endswith(f".{t}.lora_A") for n in found))
    for layer in range(cfg.num_hidden_layers):  # a layer the adapter leaves alone: a zero update there
        for t in targets:
            n_in, n_out = dims[t]
            found.setdefault(f"encoder.layers.{layer}.{t}.lora_A", torch.zeros(r, n_in))
            found.setdefault(f"encoder.layers.{layer}.{t}.lora_B", torch.zeros(n_out, r))
    head, labels, seq_len = _head(folder, head_from)
    if skipped:
        print(f"note: {len(skipped)} head tensor(s) left out ({skipped[0]}, ...): transformers' classifier reads the "
              "CLS pooler and this project mean-pools, so that head does not transfer")  # fmt: skip
    base = load_base(precision="int8")
    m = Manifest("lora", {"rank": r, "alpha": float(alpha), "targets": list(targets)}, labels, base.fingerprint,
                 base.precision, "", task=task or folder.name, seq_len=seq_len)  # fmt: skip
    save_patch(out, found | head, m)
    load_patch(out, base)  # validated as any patch is
    return Path(out)


def _check_config(config: dict, where: Path) -> tuple[int, float]:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, only LORA imports")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            problems.append(f"{key} is {config.get(key)!r} (only {ok!r} maps)")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(key):
            problems.append(f"{key} is set (per-module ranks or layers do not map)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, int | float):
        problems.append(f"r {r!r} / lora_alpha {alpha!r} are not a positive rank and a number")
    if problems:
        raise EdgeTuneError("adapter config: " + "; ".join(problems), where / CONFIG)
    if config.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r); this project by alpha / r
        alpha = alpha * r**0.5
    return r, alpha


def _head(folder: Path, head_from: str | Path | None) -> tuple[dict, list[str], int]:
    if head_from is not None:
        p = load_patch(head_from)
        return (
            {k: p.tensors[k].float() for k in ("head.weight", "head.bias")},
            p.manifest.label_names,
            p.manifest.seq_len,
        )
    if (folder / HEAD).is_file():
        from safetensors import safe_open

        with safe_open(folder / HEAD, "pt") as f:
            meta = f.metadata() or {}
            head = {k: f.get_tensor(k) for k in ("head.weight", "head.bias")}
        return head, json.loads(meta["label_names"]), int(meta.get("seq_len", 128))
    raise EdgeTuneError("the adapter carries no head this project can use", folder,
                        "give --head-from PATCH (a patch with the task's labels)")  # fmt: skip
