"""Build this process's model chunk(s), placed on its device and wrapped in megatron-core's DDP."""
from __future__ import annotations

import contextlib

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from megavlm.config.model import ModelConfig, ParallelConfig
from megavlm.models.registry import get_family
from megavlm.parallel.init import ParallelContext


def build_model(model_cfg: ModelConfig, parallel: ParallelConfig, ctx: ParallelContext, pg_collection,
                dtype: torch.dtype = torch.float32, recompute: bool = False) -> torch.nn.Module:
    """The unwrapped model of this pipeline stage, on ``ctx.device`` in ``dtype``."""
    model_cls = get_family(model_cfg.family).model_cls
    model = model_cls(model_cfg, parallel, pg_collection, pre_process=ctx.is_first_stage,
                      post_process=ctx.is_last_stage, dtype=dtype, recompute=recompute)
    return model.to(device=ctx.device, dtype=dtype)


def ddp_config(train, optimizer, device: torch.device) -> DistributedDataParallelConfig:
    """megatron-core DDP settings from the recipe: fp32 gradient buffers, the distributed
    optimizer's reduce-scatter, and communication overlapped with compute (default on GPUs)."""
    on_gpu = device.type == "cuda"
    overlap_grads = on_gpu if train.overlap_grad_reduce is None else train.overlap_grad_reduce
    overlap_params = (on_gpu and optimizer.distributed) if train.overlap_param_gather is None else train.overlap_param_gather
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=optimizer.distributed,
                                         overlap_grad_reduce=overlap_grads, overlap_param_gather=overlap_params)


@contextlib.contextmanager
def params_in_sync(ddp: DistributedDataParallel):
    """With ``overlap_param_gather`` the all-gather of updated parameters completes during the
    next forward; a checkpoint or an evaluation needs them complete now."""
    if not getattr(ddp, "use_forward_hook", False):
        yield
        return
    ddp.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        ddp.enable_forward_pre_hook()


def wrap_ddp(model: torch.nn.Module, ddp_config: DistributedDataParallelConfig | None = None,
             pg_collection=None) -> DistributedDataParallel:
    """megatron-core DDP: contiguous fp32 grad buffers for trainable parameters only (frozen ones
    get none), bucketed all-reduce or reduce-scatter across DP."""
    ddp_config = ddp_config or DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    kwargs = {"pg_collection": pg_collection} if pg_collection is not None else {}
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model, **kwargs)


def load_local_state(model: torch.nn.Module, state: dict) -> None:
    """load_state_dict that insists on every real tensor (megatron's _extra_state may be absent)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"state dict does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                       f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
