"""QLoRA's frozen base weights in NF4 with double quantisation (torchao's NF4Tensor): 4-bit
normal-float codes in blocks of 64 with their absmax scales themselves quantised to 8 bits in
blocks of 256 (fewer for small layers). The weight is dequantised on the fly inside the matmul (bf16 compute on GPUs)."""
from __future__ import annotations

import logging

import torch

BLOCK_SIZE, SCALER_BLOCK_SIZE = 64, 256


def _torchao_nf4():
    # torchao logs its optional CUDA extensions it cannot load on a CPU-only torch; not our concern.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor as module
    except ImportError:
        try:
            from torchao.dtypes import nf4tensor as module  # torchao < 0.15
        except ImportError:
            raise ImportError("QLoRA (stage.lora.quantize_base: nf4) needs torchao: pip install torchao") from None
    return module


def scaler_block_size(numel: int) -> int:
    """Scales are double-quantised in blocks of 256, or of the largest power of two dividing
    the number of 64-value blocks when that is smaller (small layers)."""
    blocks = numel // BLOCK_SIZE
    size = SCALER_BLOCK_SIZE
    while blocks % size:
        size //= 2
    return size


def to_nf4(weight: torch.Tensor):
    return _torchao_nf4().to_nf4(weight.detach(), BLOCK_SIZE, scaler_block_size(weight.numel()))


def nf4_linear(x: torch.Tensor, weight_nf4) -> torch.Tensor:
    """x @ dequant(W).T in x's dtype; gradients flow to x only (the base is frozen)."""
    return _torchao_nf4().linear_nf4(x, weight_nf4)


def dequantize(weight_nf4) -> torch.Tensor:
    return weight_nf4.get_original_weight()


def nf4_bytes(weight_nf4) -> int:
    return sum(t.numel() * t.element_size() for t in (weight_nf4.quantized_data, weight_nf4.quantized_scalers,
                                                      weight_nf4.quantization_factor, weight_nf4.scaler_mean))
