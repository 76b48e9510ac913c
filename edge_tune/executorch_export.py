"""The base as an ExecuTorch program for phones: lowered to XNNPACK with int8 dynamic per-channel linears
(the PT2E XNNPACK quantizer: on the int8 base's dequantized weights it finds our int8 weights again), the weights ExecuTorch keeps outside the program in `model.ptd`
(program-data separation), and the patch as `forward`'s inputs (the LoRA-as-inputs pattern): one program
serves every LoRA patch of its shape (targets among q, k, v, o and rank), and head-only patches as rank-r
zeros. Batch 1 (a phone answers one sentence at a time); the sequence length is dynamic, 2 to
`max_tokens`.

    edge-tune export --format executorch --patch sst2.patch --patch cr.patch --out et

writes model.pte, model.ptd, tokenizer.json, executorch.json (the program's shape) and <task>.inputs
(each patch's forward inputs, safetensors). `load_program` + `run_program` run it through
`executorch.runtime`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import EdgeTuneError, PatchError

SQUARE = ("q", "k", "v", "o")  # the (D, D) linears, whose LoRA factors stack into one input
EXPORTABLE = ("lora", "head", "zeroshot", "fewshot")
DATA_TAG = "_default_external_constant"  # ExecuTorch's tag of the constants it writes to the .ptd  # methods whose patches are the program's inputs


def _fp32(m: nn.Module) -> Tensor:
    """A frozen linear's or embedding's weight in fp32: the fp32 base's, or the int8 base's dequantized."""
    from .quant import dequantize_int8

    return m.weight.detach().clone() if m.precision == "fp32" else dequantize_int8(m.w_q, m.scale)


class PlainClassifier(nn.Module):
    """The base in plain torch ops (export-friendly: no edge_tune:: ops), its weights in fp32 (an int8 base's
    dequantized: the XNNPACK quantizer's symmetric per-channel int8 of them is our int8 exactly); LoRA on
    `targets` (B scaled by alpha / r) and the head are forward inputs."""

    def __init__(self, base, targets: tuple[str, ...]):
        super().__init__()
        enc = base.model.encoder
        self.targets, self.heads = targets, base.config.num_attention_heads
        if base.precision not in ("fp32", "int8"):
            raise EdgeTuneError(
                f"an {base.precision} base does not export to ExecuTorch", None, "use int8 or fp32"
            )
        self.register_buffer("word", _fp32(enc.word))
        self.register_buffer("pos", enc.pos.detach().clone())
        self.register_buffer("typ", enc.typ.detach().clone())
        self.emb_ln = _layer_norm(enc.emb_ln)
        self.layers = nn.ModuleList()
        for layer in enc.layers:
            m = nn.Module()
            for t in ("q", "k", "v", "o", "ff1", "ff2"):
                src = getattr(layer, t)
                lin = nn.Linear(src.in_features, src.out_features)
                lin.weight.data, lin.bias.data = _fp32(src), src.bias.detach().clone()
                setattr(m, t, lin)
            m.ln1, m.ln2 = _layer_norm(layer.ln1), _layer_norm(layer.ln2)
            self.layers.append(m)

    def forward(
        self, ids: Tensor, mask: Tensor, lora_a: Tensor, lora_b: Tensor, head_w: Tensor, head_b: Tensor
    ):
        """ids, mask (1, T) int64; lora_a (layers, targets, r, D), lora_b (layers, targets, D, r); head_w (L, D),
        head_b (L,) -> probabilities (1, L)."""
        B, T = ids.shape
        D = self.word.shape[1]
        x = self.emb_ln(F.embedding(ids, self.word) + self.pos[:T] + self.typ)
        bias = (1.0 - mask.to(x.dtype))[:, None, None, :] * -1e9
        split = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        for i, layer in enumerate(self.layers):
            out = {}
            for t in ("q", "k", "v"):
                out[t] = layer.get_submodule(t)(x)
                if t in self.targets:
                    j = self.targets.index(t)
                    out[t] = out[t] + (x @ lora_a[i, j].t()) @ lora_b[i, j].t()
            s = split(out["q"]) @ split(out["k"]).transpose(-1, -2) / math.sqrt(D // self.heads) + bias
            a = (s.softmax(-1) @ split(out["v"])).transpose(1, 2).reshape(B, T, D)
            o = layer.o(a)
            if "o" in self.targets:
                j = self.targets.index("o")
                o = o + (a @ lora_a[i, j].t()) @ lora_b[i, j].t()
            x = layer.ln1(x + o)
            x = layer.ln2(x + layer.ff2(F.gelu(layer.ff1(x))))
        m = mask.to(x.dtype)[..., None]
        feats = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return (feats @ head_w.t() + head_b).softmax(-1)


def _layer_norm(src: nn.LayerNorm) -> nn.LayerNorm:
    ln = nn.LayerNorm(src.normalized_shape, eps=src.eps)
    ln.load_state_dict(src.state_dict())
    return ln


def patch_inputs(patch, targets: tuple[str, ...], rank: int, layers: int) -> dict[str, Tensor]:
    """A LoRA (or head-only) patch as the program's inputs: LoRA stacked, B scaled; zeros where it has none."""
    D = patch.tensors["head.weight"].shape[1]
    a, b = torch.zeros(layers, len(targets), rank, D), torch.zeros(layers, len(targets), D, rank)
    if patch.manifest.method == "lora":
        scale = patch.manifest.hyper["alpha"] / patch.manifest.hyper["rank"]
        for i in range(layers):
            for j, t in enumerate(targets):
                a[i, j] = patch.tensors[f"encoder.layers.{i}.{t}.lora_A"]
                b[i, j] = patch.tensors[f"encoder.layers.{i}.{t}.lora_B"] * scale
    return {
        "lora_a": a,
        "lora_b": b,
        "head_w": patch.tensors["head.weight"],
        "head_b": patch.tensors["head.bias"],
    }


def program_shape(patches: list) -> tuple[tuple[str, ...], int]:
    """The LoRA targets and rank every patch fits (one line naming the first that does not)."""
    lora = [p for p in patches if p.manifest.method == "lora"]
    targets = tuple(lora[0].manifest.hyper["targets"]) if lora else ("q", "v")
    rank = lora[0].manifest.hyper["rank"] if lora else 1
    for p in patches:
        m = p.manifest
        if m.method not in EXPORTABLE:
            raise PatchError(f"a {m.method} patch is not a forward input of the ExecuTorch program", p.path,
                             "ExecuTorch export takes LoRA (targets among q, k, v, o) and head-only patches")  # fmt: skip
        if m.method == "lora" and (tuple(m.hyper["targets"]) != targets or m.hyper["rank"] != rank):
            raise PatchError(f"LoRA r{m.hyper['rank']} on {','.join(m.hyper['targets'])} does not fit the program's "
                             f"r{rank} on {','.join(targets)}", p.path, "export patches of one LoRA shape together")  # fmt: skip
    if not set(targets) <= set(SQUARE):
        raise PatchError(
            f"LoRA on {','.join(targets)}: the ExecuTorch program takes targets among q, k, v, o", None
        )
    return targets, rank


@contextlib.contextmanager
def _quiet():
    """ExecuTorch's stack logs, at import and export, the CUDA libraries torchao cannot load here and a page
    of deprecations: none of it is the user's to act on."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree", "torch.export", "executorch")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def export_executorch(out: str | Path, patch_paths: list[str], max_tokens: int = 128) -> list[Path]:
    """`edge-tune export --format executorch`: see the module doc. Returns the files written."""
    with _quiet():
        return _export(out, patch_paths, max_tokens)


def _export(out: str | Path, patch_paths: list[str], max_tokens: int) -> list[Path]:
    import shutil

    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as e:
        raise EdgeTuneError(
            f"ExecuTorch is not installed ({e.name})", None, 'pip install -e ".[export]"'
        ) from None
    from safetensors.torch import save_file

    from .base import load_base
    from .patch import atomic_write, load_patch

    if not patch_paths:
        raise EdgeTuneError("the ExecuTorch export needs at least one patch", "--patch", "pass --patch P")
    base = load_base(precision="int8")
    patches = [load_patch(p, base) for p in patch_paths]
    targets, rank = program_shape(patches)
    layers = len(base.model.encoder.layers)
    model = PlainClassifier(base, targets).eval()
    example = (torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long),
               *patch_inputs(patches[0], targets, rank, layers).values())  # fmt: skip
    T = torch.export.Dim("tokens", min=2, max=max_tokens)
    dynamic = ({1: T}, {1: T}, None, None, None, None)
    with torch.no_grad():
        graph = torch.export.export(model, example, dynamic_shapes=dynamic).module()
        quantizer = XNNPACKQuantizer().set_global(
            get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
        )
        graph = prepare_pt2e(graph, quantizer)
        graph(*example)
        graph = convert_pt2e(graph)
        # the XNNPACK-packed weights too go to the .ptd (the non-delegated constants go by external_constants)
        delegate_external_constants_pass_unlifted(graph, lambda node: DATA_TAG)
        program = to_edge_transform_and_lower(
            torch.export.export(graph, example, dynamic_shapes=dynamic, strict=True),
            partitioner=[XnnpackPartitioner()],
        ).to_executorch(ExecutorchBackendConfig(external_constants=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.pte", program.buffer)
    program.write_tensor_data_to_file(str(out))
    (out / f"{DATA_TAG}.ptd").replace(out / "model.ptd")
    shutil.copyfile(base.model_dir / "tokenizer.json", out / "tokenizer.json")
    shape = {"format": "edge_tune.executorch", "format_version": 1, "base_fingerprint": base.fingerprint,
             "lora_targets": list(targets), "lora_rank": rank, "max_tokens": max_tokens, "batch": 1}  # fmt: skip
    atomic_write(out / "executorch.json", json.dumps(shape, indent=1).encode())
    written = [out / f for f in ("model.pte", "model.ptd", "tokenizer.json", "executorch.json")]
    for p in patches:
        meta = {
            "task": p.name,
            "label_names": json.dumps(p.manifest.label_names),
            "seq_len": str(p.manifest.seq_len),
        }
        inputs = {k: v.contiguous() for k, v in patch_inputs(p, targets, rank, layers).items()}
        atomic_write(out / f"{p.name}.inputs", lambda tmp, t=inputs, m=meta: save_file(t, tmp, metadata=m))
        written.append(out / f"{p.name}.inputs")
    return written


def load_program(export_dir: str | Path):
    """The exported program's `forward` method, loaded through `executorch.runtime` (weights from model.ptd)."""
    with _quiet():
        from executorch.runtime import Runtime

    d = Path(export_dir)
    return Runtime.get().load_program(d / "model.pte", data_path=d / "model.ptd").load_method("forward")


def run_program(forward, ids: Tensor, mask: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    """Probabilities (1, L) of one sentence from a loaded program's `forward` under a patch's `inputs`."""
    return forward.execute(
        [ids, mask, inputs["lora_a"], inputs["lora_b"], inputs["head_w"], inputs["head_b"]]
    )[0]
