"""Training checkpoints: everything a run needs to continue bit-identically after a kill -9 (trainable
tensors, best tensors, AdamW moments, RNG states, data position, early-stopping state), as one safetensors
file with a JSON manifest, written atomically. No pickle anywhere."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import EdgeTuneError
from .optim import AdamW
from .patch import save_tensors
from .tensorfile import parse_header

CKPT_VERSION = 1
CKPT_KEY = "edge_tune_checkpoint"


@dataclass
class LoopState:
    """The trainer's state between optimizer steps."""

    step: int = 0  # optimizer steps done
    best_acc: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    nonfinite_in_a_row: int = 0
    history: list[dict] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)  # the rest of this epoch's batches


def save_checkpoint(
    path: Path,
    identity: dict,
    state: LoopState,
    params: dict[str, torch.Tensor],
    best: dict[str, torch.Tensor],
    opt: AdamW,
    rng: random.Random,
) -> None:
    tensors = {f"param/{n}": p.detach().contiguous() for n, p in params.items()}
    tensors |= {f"best/{n}": t.contiguous() for n, t in best.items()}
    adam_steps = {}
    for n, p in params.items():
        st = opt.state.get(p)
        if st:
            tensors[f"adam_m/{n}"] = st["exp_avg"].contiguous()
            tensors[f"adam_v/{n}"] = st["exp_avg_sq"].contiguous()
            if "rows" in st:  # row-sparse moments (optim.AdamW): the rows they belong to
                tensors[f"adam_rows/{n}"] = st["rows"].contiguous()
            adam_steps[n] = float(st["step"])
    tensors["torch_rng"] = torch.get_rng_state()
    flat = [i for b in state.batches for i in b]
    tensors["batches_flat"] = torch.tensor(flat, dtype=torch.int64)
    tensors["batches_len"] = torch.tensor([len(b) for b in state.batches], dtype=torch.int64)
    py_rng = rng.getstate()
    meta = {
        "version": CKPT_VERSION,
        "identity": identity,
        "loop": {k: v for k, v in state.__dict__.items() if k != "batches"},
        "adam_steps": adam_steps,
        "py_rng": [py_rng[0], list(py_rng[1]), py_rng[2]],
    }
    save_tensors(path, tensors, {CKPT_KEY: json.dumps(meta)})


def load_checkpoint(
    path: Path,
    identity: dict,
    params: dict[str, torch.Tensor],
    opt: AdamW,
    rng: random.Random,
) -> tuple[LoopState, dict[str, torch.Tensor]]:
    """Restore a checkpoint into `params`, `opt` and `rng` (and the torch RNG); returns the loop state and
    the best tensors. Everything is checked before anything is restored."""
    where = str(path)
    blob = path.read_bytes()
    header = parse_header(blob, len(blob), where)
    try:
        meta = json.loads(header.metadata[CKPT_KEY])
    except (KeyError, json.JSONDecodeError):
        raise EdgeTuneError(
            "not an edge_tune checkpoint", where, "delete it or rerun without --resume"
        ) from None
    if meta.get("version") != CKPT_VERSION:
        raise EdgeTuneError(f"checkpoint version {meta.get('version')!r}, expected {CKPT_VERSION}", where)
    diff = sorted(
        k for k in identity.keys() | meta["identity"].keys() if identity.get(k) != meta["identity"].get(k)
    )
    if diff:
        raise EdgeTuneError(
            f"checkpoint was made with other settings ({', '.join(diff)})",
            where,
            "rerun with the same flags, or without --resume to start over",
        )
    from safetensors.torch import load

    tensors = load(blob)
    for n in params:
        if f"param/{n}" not in tensors or tensors[f"param/{n}"].shape != params[n].shape:
            raise EdgeTuneError(f"checkpoint lacks or misshapes {n!r}", where, "file corrupt")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
    for n, p in params.items():
        if n in meta["adam_steps"]:
            opt.state[p] = {
                "step": torch.tensor(meta["adam_steps"][n]),
                "exp_avg": tensors[f"adam_m/{n}"].clone(),
                "exp_avg_sq": tensors[f"adam_v/{n}"].clone(),
            }
            if f"adam_rows/{n}" in tensors:
                opt.state[p]["rows"] = tensors[f"adam_rows/{n}"].clone()
    torch.set_rng_state(tensors["torch_rng"])
    v, internal, gauss = meta["py_rng"]
    rng.setstate((v, tuple(internal), gauss))
    flat, lens = tensors["batches_flat"].tolist(), tensors["batches_len"].tolist()
    batches, pos = [], 0
    for n in lens:
        batches.append(flat[pos : pos + n])
        pos += n
    state = LoopState(**meta["loop"], batches=batches)
    best = {n[len("best/") :]: t for n, t in tensors.items() if n.startswith("best/")}
    return state, best
