"""Weight formats of the frozen base: int8 per-row and int4 group-wise, and their reference (de)quantizers.

int8: symmetric, one fp32 scale per output row (linear) or per vocabulary row (embedding); q in [-127, 127].
int4: symmetric, one fp16 scale per group of GROUP_SIZE input columns; q in [-8, 7] stored as q + 8,
      two values a byte (column 2j in the low nibble, 2j+1 in the high nibble).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GROUP_SIZE = 32  # int4 group along the input dimension (columns)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w: (rows, cols) float -> (q int8 (rows, cols), scale fp32 (rows,))."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """q: (rows, cols) int8, scale: (rows,) fp32 -> (rows, cols) fp32."""
    return q.float().mul_(scale[:, None])  # in place: one (rows, cols) fp32 tensor made, not two


def pack_int4(q: Tensor) -> Tensor:
    """q: (rows, cols) int8 in [-8, 7], cols even -> (rows, cols // 2) uint8."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """packed: (rows, cols // 2) uint8 -> (rows, cols) int8 in [-8, 7]."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def quantize_int4(w: Tensor, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor]:
    """w: (rows, cols) float, cols % group_size == 0 -> (packed uint8 (rows, cols/2), scale fp16 (rows, cols/group))."""
    rows, cols = w.shape
    if cols % group_size or group_size % 2:
        raise ValueError(f"int4 needs cols ({cols}) divisible by an even group size ({group_size})")
    g = w.float().reshape(rows, cols // group_size, group_size)
    # Round the scale to fp16 first so that quantization and dequantization use the same number.
    scale = (g.abs().amax(dim=2) / 7.0).clamp_min(1e-7).half()
    q = torch.round(g / scale.float()[..., None]).clamp_(-8, 7).to(torch.int8).reshape(rows, cols)
    return pack_int4(q), scale


def dequantize_int4(packed: Tensor, scale: Tensor) -> Tensor:
    """packed: (rows, cols/2) uint8, scale: (rows, groups) fp16 -> (rows, cols) fp32."""
    q = unpack_int4(packed)
    rows, cols = q.shape
    groups = scale.shape[1]
    return (q.float().reshape(rows, groups, cols // groups) * scale.float()[..., None]).reshape(rows, cols)


def quantize(w: Tensor, precision: str) -> dict[str, Tensor]:
    """The stored buffers of one frozen weight, by precision: {'weight'} | {'w_q', 'scale'}."""
    if precision == "fp32":
        return {"weight": w.float().contiguous()}
    if precision == "int8":
        q, s = quantize_int8(w)
    elif precision == "int4":
        q, s = quantize_int4(w)
    else:
        raise ValueError(f"unknown precision {precision!r}")
    return {"w_q": q, "scale": s}


def dequantize(buffers: dict[str, Tensor]) -> Tensor:
    if "weight" in buffers:
        return buffers["weight"]
    q, s = buffers["w_q"], buffers["scale"]
    return dequantize_int8(q, s) if q.dtype == torch.int8 else dequantize_int4(q, s)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (frozen and trainable)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
