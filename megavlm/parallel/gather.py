"""Collect every (tp_rank, pp_rank)'s local tensors on global rank 0 (for export and checks)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def gather_shards(local: dict[str, torch.Tensor], tp_rank: int, pp_rank: int, dp_rank: int,
                  dst: int = 0) -> dict[tuple[int, int], dict[str, torch.Tensor]] | None:
    """Returns {(tp_rank, pp_rank): local dict} on ``dst`` (from DP rank 0 only), None elsewhere.
    Uses object collectives: meant for small models and one-off exports, not per-step use."""
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in local.items() if torch.is_tensor(v)}  # skips _extra_state
    payload = ((tp_rank, pp_rank), tensors) if dp_rank == 0 else None
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {payload[0]: payload[1]}
    received = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(payload, received, dst=dst)
    if received is None:
        return None
    return {key: value for key, value in (p for p in received if p is not None)}


def local_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of trainable parameters by local name (megatron DDP keeps them in ``main_grad``)."""
    out = {}
    for name, param in model.named_parameters():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None:
            out[name] = grad
    return out
