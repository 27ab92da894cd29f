"""LayerNorm / RMSNorm for the local spec, usable under sequence parallelism.

megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism. Under SP a norm sees only this
rank's slice of the sequence, so its weight gradient is a partial sum; marking the parameters
``sequence_parallel`` makes megatron-core's ``finalize_model_grads`` all-reduce them over the TP
group. Parameter names are torch's (``weight``, ``bias``), so checkpoints are unchanged.

Zero-centred norms (``config.layernorm_zero_centered_gamma``, Gemma's RMSNorm) scale by
``1 + weight`` and start their weight at 0, as Transformer Engine's ``zero_centered_gamma`` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


class ZeroCenteredLayerNorm(LayerNorm):
    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False):
        super().__init__(hidden_size, eps=eps, sequence_parallel=sequence_parallel)
        torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class ZeroCenteredRMSNorm(RMSNorm):
    """Gemma's RMSNorm: normalised in fp32, times (1 + weight), back in the input's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, sequence_parallel: bool = False):
        super().__init__(hidden_size, eps=eps, sequence_parallel=sequence_parallel)
        torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), self.normalized_shape, eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


_NORMS = {("LayerNorm", False): LayerNorm, ("RMSNorm", False): RMSNorm,
          ("LayerNorm", True): ZeroCenteredLayerNorm, ("RMSNorm", True): ZeroCenteredRMSNorm}


class Norm:
    """Spec entry with megatron-core's norm signature: builds the LayerNorm or RMSNorm that
    ``config.normalization`` names (zero-centred when the config says so), marked for sequence
    parallelism when the config uses it."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = _NORMS.get((config.normalization, bool(config.layernorm_zero_centered_gamma)))
        if norm_cls is None:
            raise ValueError(f"normalization {config.normalization!r} is not supported (LayerNorm or RMSNorm)")
        norm = norm_cls(hidden_size, eps=eps, sequence_parallel=config.sequence_parallel)
        return norm.to(dtype=config.params_dtype)
