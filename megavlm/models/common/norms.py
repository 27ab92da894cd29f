"""LayerNorm / RMSNorm for the local spec, usable under sequence parallelism.

megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism. Under SP a norm sees only this
rank's slice of the sequence, so its weight gradient is a partial sum; marking the parameters
``sequence_parallel`` makes megatron-core's ``finalize_model_grads`` all-reduce them over the TP
group. Parameter names are torch's (``weight``, ``bias``), so checkpoints are unchanged.
"""
from __future__ import annotations

import torch


def _mark_sequence_parallel(module: torch.nn.Module, sequence_parallel: bool) -> None:
    for param in module.parameters():
        param.sequence_parallel = sequence_parallel


class LayerNorm(torch.nn.LayerNorm):
    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False):
        super().__init__(hidden_size, eps=eps)
        _mark_sequence_parallel(self, sequence_parallel)


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, hidden_size: int, eps: float = 1e-6, sequence_parallel: bool = False):
        super().__init__(hidden_size, eps=eps)
        _mark_sequence_parallel(self, sequence_parallel)


class Norm:
    """Spec entry with megatron-core's norm signature: builds the LayerNorm or RMSNorm that
    ``config.normalization`` names, marked for sequence parallelism when the config uses it."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization {config.normalization!r} is not supported (LayerNorm or RMSNorm)")
        norm = norm_cls(hidden_size, eps=eps, sequence_parallel=config.sequence_parallel)
        return norm.to(dtype=config.params_dtype)
