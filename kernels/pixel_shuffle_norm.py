"""InternVL's connector front: pixel shuffle (downsample 0.5: each output token gathers a 2x2
block of ViT tokens, 4x the channels) fused with the LayerNorm that follows, forward and backward.

One program normalises one output token: it gathers its four C-channel chunks straight from the
ViT grid (no shuffled copy in memory), normalises over 4C, and writes. Backward recomputes the
statistics, writes the input gradient back to the four source tokens (each input token feeds
exactly one output token) and leaves per-token dgamma/dbeta terms for one reduction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import block, check_device


@triton.jit
def _source_rows(out_row, side, BLOCK_C4: tl.constexpr, C: tl.constexpr):
    """Input token (row of the [n*S*S, C] view) and channel of each of the 4C output channels."""
    half = side // 2
    img = out_row // (half * half)
    rem = out_row % (half * half)
    i = rem // half
    j = rem % half
    cols = tl.arange(0, BLOCK_C4)
    chunk = cols // C
    src_token = img * side * side + (2 * i + chunk // 2) * side + (2 * j + chunk % 2)
    return src_token, cols % C, cols


@triton.jit
def _shuffle_norm_fwd(x, w, b, y, mean_out, rstd_out, side, eps, C: tl.constexpr, BLOCK_C4: tl.constexpr):
    row = tl.program_id(0)
    src, ch, cols = _source_rows(row, side, BLOCK_C4, C)
    valid = cols < 4 * C
    v = tl.load(x + src.to(tl.int64) * C + ch, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(v, axis=0) / (4 * C)
    diff = tl.where(valid, v - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / (4 * C) + eps)
    gamma = tl.load(w + cols, mask=valid, other=0.0).to(tl.float32)
    beta = tl.load(b + cols, mask=valid, other=0.0).to(tl.float32)
    out = diff * rstd * gamma + beta
    tl.store(y + row.to(tl.int64) * 4 * C + cols, out.to(y.dtype.element_ty), mask=valid)
    tl.store(mean_out + row, mean)
    tl.store(rstd_out + row, rstd)


@triton.jit
def _shuffle_norm_bwd(x, w, dy, dx, dw_part, db_part, mean_in, rstd_in, side, C: tl.constexpr,
                      BLOCK_C4: tl.constexpr):
    row = tl.program_id(0)
    src, ch, cols = _source_rows(row, side, BLOCK_C4, C)
    valid = cols < 4 * C
    v = tl.load(x + src.to(tl.int64) * C + ch, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(dy + row.to(tl.int64) * 4 * C + cols, mask=valid, other=0.0).to(tl.float32)
    gamma = tl.load(w + cols, mask=valid, other=0.0).to(tl.float32)
    mean = tl.load(mean_in + row)
    rstd = tl.load(rstd_in + row)
    xhat = tl.where(valid, (v - mean) * rstd, 0.0)
    gx = g * gamma
    c1 = tl.sum(xhat * gx, axis=0) / (4 * C)
    c2 = tl.sum(gx, axis=0) / (4 * C)
    grad_in = (gx - (xhat * c1 + c2)) * rstd
    tl.store(dx + src.to(tl.int64) * C + ch, grad_in.to(dx.dtype.element_ty), mask=valid)
    tl.store(dw_part + row.to(tl.int64) * 4 * C + cols, g * xhat, mask=valid)
    tl.store(db_part + row.to(tl.int64) * 4 * C + cols, g, mask=valid)


def _check(x: torch.Tensor) -> tuple[int, int, int]:
    n, s1, s2, c = x.shape
    if s1 != s2 or s1 % 2:
        raise ValueError(f"pixel shuffle needs a square grid with an even side, got {s1}x{s2}")
    return n, s1, c


class _PixelShuffleNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        check_device(x)
        n, side, c = _check(x)
        x = x.contiguous()
        rows = n * (side // 2) ** 2
        y = torch.empty(rows, 4 * c, dtype=x.dtype, device=x.device)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        _shuffle_norm_fwd[(rows,)](x, weight, bias, y, mean, rstd, side, eps, C=c, BLOCK_C4=block(4 * c, lo=4, hi=1 << 16))
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.side, ctx.c = side, c
        return y.view(n, (side // 2) ** 2, 4 * c)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        rows = mean.shape[0]
        dy = dy.reshape(rows, 4 * ctx.c).contiguous()
        dx = torch.empty_like(x)
        dw_part = torch.empty(rows, 4 * ctx.c, dtype=torch.float32, device=x.device)
        db_part = torch.empty_like(dw_part)
        _shuffle_norm_bwd[(rows,)](x, weight, dy, dx, dw_part, db_part, mean, rstd, ctx.side, C=ctx.c,
                                   BLOCK_C4=block(4 * ctx.c, lo=4, hi=1 << 16))
        return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype), None


def pixel_shuffle_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x [n, S, S, C] ViT tokens on their grid -> LayerNorm(pixel_shuffle(x)) as [n, (S/2)^2, 4C]."""
    return _PixelShuffleNorm.apply(x, weight, bias, eps)


def reference_pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """InternVL's pixel shuffle at ratio 0.5 (its 'v2' order), x [n, S, S, C] -> [n, S/2, S/2, 4C]."""
    n, s1, s2, c = x.shape
    x = x.reshape(n, s1, s2 // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, s2 // 2, s1 // 2, c * 4)
    return x.permute(0, 2, 1, 3).contiguous()


def reference_pixel_shuffle_norm(x, weight, bias, eps: float = 1e-5):
    n = x.shape[0]
    shuffled = reference_pixel_shuffle(x)
    return F.layer_norm(shuffled.reshape(n, -1, shuffled.shape[-1]), (shuffled.shape[-1],), weight, bias, eps)
