"""LLaVA's MLP projector fused: GEMM with a bias + GELU epilogue, and its backward epilogue.

Forward: z = x W1^T + b1 and a = GELU(z) leave one Triton GEMM together (no separate bias and
GELU passes over the [tokens, hidden] activation); only z is saved, a is recomputed in backward
(eager PyTorch saves both). The second projection is a cuBLAS GEMM. Backward: dz = (dy W2) *
GELU'(z) is a second Triton GEMM with the GELU derivative fused into its epilogue; the weight
gradients are cuBLAS GEMMs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import check_device, interpreted, maybe_autotune

EPILOGUE_NONE, EPILOGUE_BIAS_GELU, EPILOGUE_GELU_GRAD = 0, 1, 2
_RSQRT2 = 0.7071067811865476
_RSQRT_2PI = 0.3989422804014327

_GPU_CONFIGS = [
    triton.Config({"BM": 128, "BN": 256, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 128, "BK": 32}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
]


@maybe_autotune(_GPU_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _gemm_epilogue(a, b, c, bias, aux, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                   EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """c = epilogue(a @ b): a [M, K], b [K, N] (any strides), aux [M, N] like c."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a_tile = tl.load(a + rm[:, None] * s_am + kk[None, :] * s_ak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b_tile = tl.load(b + kk[:, None] * s_bk + rn[None, :] * s_bn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:  # the CPU interpreter computes bf16/fp16 dots in fp32
            a_tile = a_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        acc += tl.dot(a_tile, b_tile)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * s_cm + rn[None, :] * s_cn
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:  # z = acc (saved for backward), out = GELU(z)
        tl.store(aux + offs, acc.to(aux.dtype.element_ty), mask=mask)
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif EPILOGUE == 2:  # out = acc * GELU'(z)
        z = tl.load(aux + offs, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        acc = acc * (cdf + z * pdf)
    tl.store(c + offs, acc.to(c.dtype.element_ty), mask=mask)


def gemm_epilogue(a: torch.Tensor, b: torch.Tensor, epilogue: int, bias=None, aux=None) -> torch.Tensor:
    """epilogue(a @ b) with a [M, K], b [K, N]; for EPILOGUE_BIAS_GELU ``aux`` receives z."""
    check_device(a, b)
    M, K = a.shape
    N = b.shape[1]
    out = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if interpreted():
        meta = {"BM": 16, "BN": 16, "BK": 16}
    else:
        meta = {}

    def grid(m):
        return triton.cdiv(M, m["BM"]), triton.cdiv(N, m["BN"])

    _gemm_epilogue[grid](a, b, out, bias if bias is not None else out, aux if aux is not None else out, M, N, K,
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
                         EPILOGUE=epilogue, HAS_BIAS=bias is not None, UPCAST=interpreted(), **meta)
    return out


class _FusedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        z = torch.empty(x2.shape[0], w1.shape[0], dtype=x.dtype, device=x.device)
        a = gemm_epilogue(x2, w1.t(), EPILOGUE_BIAS_GELU, bias=b1, aux=z)
        y = torch.addmm(b2, a, w2.t()) if b2 is not None else a @ w2.t()
        ctx.save_for_backward(x2, w1, w2, z)
        ctx.has_b1, ctx.has_b2, ctx.shape = b1 is not None, b2 is not None, shape
        return y.view(*shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w1, w2, z = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        a = F.gelu(z)  # recomputed: cheaper than keeping a second [tokens, hidden] activation
        dw2 = dy2.t() @ a
        db2 = dy2.sum(0) if ctx.has_b2 else None
        dz = gemm_epilogue(dy2, w2, EPILOGUE_GELU_GRAD, aux=z)
        dw1 = dz.t() @ x2
        db1 = dz.sum(0) if ctx.has_b1 else None
        dx = (dz @ w1).view(ctx.shape)
        return dx, dw1, db1, dw2, db2


def fused_mlp(x: torch.Tensor, w1: torch.Tensor, b1, w2: torch.Tensor, b2=None) -> torch.Tensor:
    """GELU(x W1^T + b1) W2^T + b2 with the first bias + GELU fused into the GEMM."""
    return _FusedMLP.apply(x, w1, b1, w2, b2)


def reference_mlp(x, w1, b1, w2, b2=None):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
