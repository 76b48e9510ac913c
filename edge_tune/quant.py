"""Weight formats of the frozen base: int8 per-row and int4 group-wise, and their reference (de)quantizers.

int8: symmetric, one fp32 scale per output row (linear) or per vocabulary row (embedding); q in [-127, 127].
int4: symmetric, one fp16 scale per group of GROUP_SIZE input columns; q in [-8, 7] stored as q + 8,
      two values a byte (column 2j in the low nibble, 2j+1 in the high nibble). quantize_int4 makes a row's
      group scales integer multiples m in [1, 16] of one unit u (the row's largest scale / 16), so that
      q x m fits int8 and the row is exactly an int8 row with scale u (int4_as_int8): the dynamic int4 op
      then runs on the int8 cores, with no per-group float work.
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


def _round_up_fp16(x: Tensor, bits: int) -> Tensor:
    """x > 0 rounded up to a value with at most `bits` significant bits that fp16 holds exactly (below fp16's
    smallest normal, 2^-14, to a multiple of that range's step for `bits`)."""
    _, exp = torch.frexp(x)  # x = mantissa x 2^exp, mantissa in [0.5, 1): exact, unlike log2
    step = torch.exp2((exp - 1).clamp_min(-14).float() - (bits - 1))
    return torch.ceil(x / step) * step


def quantize_int4(w: Tensor, group_size: int = GROUP_SIZE, fold: bool = True) -> tuple[Tensor, Tensor]:
    """w: (rows, cols) float, cols % group_size == 0 -> (packed uint8 (rows, cols/2), scale fp16 (rows, cols/group)).

    Each group's scale is m x u: u per row, the row's largest amax / 7 rounded up to 7 significant bits and
    divided by 16 (so m x u is exact in fp16), m in [1, 16] per group: of the two multiples around the
    group's amax / 7, the one with the smaller squared error (the lower one clips the group's extreme to 7
    or -8 steps), and 16 for the row's largest group. On MiniLM's linear weights this keeps 20.1 dB SQNR
    against 19.9 dB for free fp16 scales of amax / 7, which `fold=False` makes (weights int4_linear_dynamic
    runs on its group path; tools/int4_formats.py compares the two)."""
    rows, cols = w.shape
    if cols % group_size or group_size % 2:
        raise ValueError(f"int4 needs cols ({cols}) divisible by an even group size ({group_size})")
    if not fold:
        g = w.float().reshape(rows, cols // group_size, group_size)
        # Round the scale to fp16 first so that quantization and dequantization use the same number.
        free = (g.abs().amax(dim=2) / 7.0).clamp_min(1e-7).half()
        q = torch.round(g / free.float()[..., None]).clamp_(-8, 7).to(torch.int8).reshape(rows, cols)
        return pack_int4(q), free
    groups = cols // group_size
    q = torch.empty(rows, cols, dtype=torch.int8)
    scale = torch.empty(rows, groups, dtype=torch.float16)
    for r0 in range(0, rows, 4096):  # row chunks: the search's temporaries stay small for the embedding table
        g = w[r0 : r0 + 4096].float().reshape(-1, groups, group_size)
        ideal = g.abs().amax(dim=2) / 7.0
        u = _round_up_fp16(ideal.amax(dim=1).clamp_min(1e-7), 7) / 16
        ratio = ideal / u[:, None]
        top = ideal.argmax(dim=1, keepdim=True)  # the row's largest group takes 16: then u = largest / 16
        best_m = best_err = best_q = None
        for m in (torch.floor(ratio).clamp_(1, 16), torch.ceil(ratio).clamp_(1, 16)):
            m.scatter_(1, top, 16.0)
            s = m * u[:, None]
            qm = torch.round(g / s[..., None]).clamp_(-8, 7)
            err = (qm * s[..., None] - g).pow_(2).sum(dim=2)
            if best_m is None:
                best_m, best_err, best_q = m, err, qm
            else:
                pick = err < best_err
                best_m = torch.where(pick, m, best_m)
                best_q = torch.where(pick[..., None], qm, best_q)
        s = best_m * u[:, None]
        if not torch.isfinite(s).all() or s.amax() > 65504:
            raise ValueError("int4: weights too large for fp16 group scales")
        scale[r0 : r0 + 4096] = s.half()
        q[r0 : r0 + 4096] = best_q.reshape(-1, cols).to(torch.int8)
    return pack_int4(q), scale


def int4_as_int8(packed: Tensor, scale: Tensor) -> tuple[Tensor, Tensor] | None:
    """The int4 weight as exactly equal int8 values times a row scale, where its group scales allow it:
    (q int8 (rows, cols) = the int4 value x m, u fp32 (rows,)) when every row's scales are m x u with m an
    integer in [0, 16] and u = the row's largest scale / 16 (quantize_int4's weights always), else None.
    The dynamic int4 op's rule (cpp_ext/int4_fold.h's fold_row does the same test)."""
    rows, groups = scale.shape
    if rows == 0 or groups == 0:
        return None
    s = scale.float()
    top = s.amax(dim=1)
    u = top / 16
    m = torch.round(s * (16 / top)[:, None])
    if (
        not ((top > 0) & torch.isfinite(top)).all()
        or not ((m >= 0) & (m <= 16) & (m * u[:, None] == s)).all()
    ):
        return None
    q = unpack_int4(packed).reshape(rows, groups, -1).to(torch.int16) * m.to(torch.int16)[..., None]
    return q.reshape(rows, -1).to(torch.int8), u


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
