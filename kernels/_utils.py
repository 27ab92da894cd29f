"""Shared helpers: interpreter detection, block sizes, autotuning only where it can run."""
from __future__ import annotations

import os

import torch
import triton


def interpreted() -> bool:
    """TRITON_INTERPRET=1 runs kernels on the CPU (correct, ~1 ms per program: small shapes only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not interpreted():
            raise RuntimeError(f"Triton kernels need CUDA tensors (got {t.device}); on a CPU set "
                               "TRITON_INTERPRET=1 before importing megavlm.kernels, or use the torch implementation")


def block(n: int, lo: int = 16, hi: int = 4096) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def maybe_autotune(configs: list, key: list[str]):
    """triton.autotune on GPUs; the interpreter has no benchmark timer, so the first config there."""
    def wrap(kernel):
        if interpreted() or not configs:
            return kernel
        return triton.autotune(configs=configs, key=key)(kernel)
    return wrap
