"""Bytes per GPU of a training layout: counted where they can be counted, estimated where not.

Parameters, gradient buffers and optimizer state are *counted*: the model of one pipeline stage
is built on the meta device with megatron-core's process groups for the layout (over a fake
process group of the layout's world size, so one CPU process stands in for any rank of any
cluster), the stage applied (freezing, LoRA), wrapped in megatron-core's DDP (its fp32 gradient
buffers, padded as it pads them) and given megatron-core's optimizer (its fp32 main copies,
sharded over data parallelism by the distributed optimizer). Adam keeps two fp32 moments per
main element. QLoRA's NF4 base weights are counted at their NF4 size.

Activations are *estimated* per micro-batch from the formulas in ``activations.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megavlm.peft.nf4 import BLOCK_SIZE, scaler_block_size

ADAM_MOMENTS = 2   # exp_avg and exp_avg_sq, fp32 each


@dataclass
class StateBytes:
    """Bytes of the model state one rank holds."""

    params: int
    grads: int
    optimizer: int
    trainable_params: int = 0   # elements, for the table

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


class _MetaPlacement(TorchFunctionMode):
    """Every tensor megatron-core places (on "cuda", on the CPU) goes to the meta device instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") is not None:
            kwargs["device"] = torch.device("meta")
        if func is torch.Tensor.to:   # positional devices: a torch.device or a string ("cuda", "cpu")
            args = tuple(torch.device("meta") if i > 0 and isinstance(a, (torch.device, str)) else a
                         for i, a in enumerate(args))
        if func in (torch.Tensor.cuda, torch.Tensor.cpu, torch.Tensor.pin_memory):
            return args[0]
        return func(*args, **kwargs)


class _MetaTypeNames(TorchFunctionMode):
    """megatron-core's optimizer checks ``param.type()`` against the CUDA type names: a meta
    parameter answers with the name its CUDA twin would have."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].is_meta:
            return "torch.cuda." + out.rsplit(".", 1)[-1]
        return out


@contextlib.contextmanager
def _on_meta():
    with torch.device("meta"), _MetaPlacement():
        yield


def recipe_dtype(recipe) -> torch.dtype:
    from megavlm.training.trainer import DTYPES

    return DTYPES[recipe.train.dtype]


def layout_rank(tp: int, pp: int, dp: int, pp_rank: int) -> int:
    """The global rank of (tp rank 0, dp rank 0, ``pp_rank``) in megatron-core's default order
    (tensor parallelism fastest, then data, then pipeline)."""
    return pp_rank * tp * dp


@contextlib.contextmanager
def fake_layout(tp: int, pp: int, dp: int, pp_rank: int = 0):
    """megatron-core's parallel state for one rank of a TP x PP x DP world, in this process alone.
    Collectives on the fake process group return at once without moving data; nothing built
    here may run a real step."""
    from megatron.core import parallel_state, tensor_parallel
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from megavlm.parallel import init as pinit
    from megavlm.parallel.cpu_compat import apply_cpu_compat

    if dist.is_initialized():
        raise RuntimeError("the planner builds layouts in a process of its own: a process group is already initialised")
    apply_cpu_compat()
    rank = layout_rank(tp, pp, dp, pp_rank)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp * pp * dp)
    try:
        # no gloo groups: over a fake world they would wait for peers that do not exist (they only
        # serve checkpoint gathering, which sizes nothing)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 create_gloo_process_groups=False)
        if parallel_state.get_pipeline_model_parallel_rank() != pp_rank:
            raise RuntimeError(f"rank {rank} is not pipeline stage {pp_rank} in megatron-core's rank order")
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        yield
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        pinit._SOLO_GROUPS.clear()
        dist.destroy_process_group()


def _without_quantisation(stage):
    """The stage with QLoRA's NF4 conversion left out (it needs real values); the planner counts
    those base weights at their NF4 size instead."""
    if stage.lora is None or stage.lora.quantize_base != "nf4":
        return stage, False
    return dataclasses.replace(stage, lora=dataclasses.replace(stage.lora, quantize_base="none")), True


def nf4_size(numel: int, dtype: torch.dtype) -> int:
    """Bytes of a weight in NF4 with double quantisation: 4-bit codes, an int8 scale per block
    of 64, one factor (in the weight's dtype) per block of scales, and one mean."""
    blocks = numel // BLOCK_SIZE
    itemsize = torch.empty((), dtype=dtype).element_size()
    return numel // 2 + blocks + (blocks // scaler_block_size(numel)) * itemsize + itemsize


def build_meta_stage(recipe, tp: int, pp: int, sequence_parallel: bool = False):
    """The model of the current fake rank's pipeline stage, on the meta device, its stage
    applied. Returns (model, names of QLoRA base weights to count at their NF4 size)."""
    from megatron.core import parallel_state

    from megavlm.config.model import ParallelConfig
    from megavlm.models.registry import get_family
    from megavlm.parallel import init as pinit
    from megavlm.peft.lora import lora_modules
    from megavlm.training.stages import apply_stage

    parallel = dataclasses.replace(recipe.parallel, tensor_parallel=tp, pipeline_parallel=pp,
                                   sequence_parallel=sequence_parallel)
    stage, quantised = _without_quantisation(recipe.stage)
    model_cls = get_family(recipe.model.family).model_cls
    with _on_meta():
        model = model_cls(recipe.model, parallel, pinit.process_groups(),
                          pre_process=parallel_state.is_pipeline_first_stage(),
                          post_process=parallel_state.is_pipeline_last_stage(),
                          dtype=recipe_dtype(recipe), recompute=recipe.train.recompute)
        model = model.to(dtype=recipe_dtype(recipe))   # as build_model casts it
        apply_stage(model, stage)
    nf4 = {id(m.weight) for m in lora_modules(model)} if quantised else set()
    return model, nf4


def _ddp_buffers(ddp) -> list:
    return list(ddp.buffers) + list(getattr(ddp, "expert_parallel_buffers", []))


def state_bytes_of(model: torch.nn.Module, ddp, optimizer, half_params: bool, nf4_ids: set = frozenset()) -> StateBytes:
    """Bytes of parameters, gradient buffers and optimizer state of a built rank (real or meta).

    With the distributed optimizer megatron-core moves trainable parameters into DDP's
    contiguous, padded parameter buffer: those count at the buffer's size."""
    from megavlm.peft.lora import lora_modules
    from megavlm.peft.nf4 import nf4_bytes

    buffered = {id(p) for b in _ddp_buffers(ddp) if b.param_data is not None for p in b.params}
    params = sum(nf4_size(p.numel(), p.dtype) if id(p) in nf4_ids else p.numel() * p.element_size()
                 for p in model.parameters() if id(p) not in buffered)
    params += sum(b.param_data.numel() * b.param_data.element_size()
                  for b in _ddp_buffers(ddp) if b.param_data is not None)
    params += sum(nf4_bytes(m.weight_nf4) for m in lora_modules(model) if m.weight_nf4 is not None)
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in _ddp_buffers(ddp))
    main = sum(p.numel() for p in main_params(optimizer))
    per_element = 4 * ADAM_MOMENTS + (4 if half_params else 0)   # + the fp32 main copy of a bf16/fp16 weight
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return StateBytes(params, grads, main * per_element, trainable)


def main_params(optimizer) -> list[torch.Tensor]:
    """The fp32 tensors megatron-core's optimizer(s) step: one per trainable parameter (or its
    data-parallel shard under the distributed optimizer)."""
    return [p for opt in _torch_optimizers(optimizer) for group in opt.param_groups for p in group["params"]]


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron-core's (chained) optimizer; a rank with nothing to
    train (a pipeline stage of frozen layers) has none."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt.optimizer for opt in inner if getattr(opt, "optimizer", None) is not None]


def measured_optimizer_bytes(optimizer, half_params: bool) -> int:
    """What a real optimizer holds after a step: Adam's moments, and the fp32 main copies when
    the model's weights are bf16/fp16."""
    moments = sum(t.numel() * t.element_size() for opt in _torch_optimizers(optimizer) for state in opt.state.values()
                  for key, t in state.items() if key in ("exp_avg", "exp_avg_sq"))
    copies = sum(p.numel() * p.element_size() for p in main_params(optimizer)) if half_params else 0
    return moments + copies


def build_ddp_and_optimizer(model: torch.nn.Module, recipe, device: torch.device, meta: bool = False):
    """megatron-core DDP and optimizer for ``model`` exactly as the trainer builds them (with
    ``meta``: DDP's buffers on the meta device)."""
    from megatron.core.optimizer import get_megatron_optimizer

    from megavlm.training.build import ddp_config, wrap_ddp
    from megavlm.training.stages import megatron_optimizer_config, optimizer_groups

    with (_on_meta() if meta else contextlib.nullcontext()):
        ddp = wrap_ddp(model, ddp_config(recipe.train, recipe.optimizer, device))
    config = megatron_optimizer_config(recipe.optimizer, recipe_dtype(recipe))
    with (_MetaTypeNames() if meta else contextlib.nullcontext()):
        groups = optimizer_groups(recipe.stage, recipe.optimizer, config, recipe.model.vision_layers)
        optimizer = get_megatron_optimizer(config, [ddp], config_overrides=groups, use_gloo_process_groups=not meta)
    return ddp, optimizer


def layout_state_bytes(recipe, tp: int, pp: int, dp: int, pp_rank: int = 0,
                       sequence_parallel: bool = False) -> StateBytes:
    """Counted state bytes of (tp rank 0, dp rank 0) of pipeline stage ``pp_rank``."""
    with fake_layout(tp, pp, dp, pp_rank), warnings.catch_warnings():
        # a stage of frozen layers has no optimizer: expected here, where every stage is priced
        warnings.filterwarnings("ignore", message=".*there is no optimizer on RANK")
        model, nf4 = build_meta_stage(recipe, tp, pp, sequence_parallel)
        ddp, optimizer = build_ddp_and_optimizer(model, recipe, torch.device("meta"), meta=True)
        return state_bytes_of(model, ddp, optimizer, recipe_dtype(recipe) != torch.float32, nf4)


def saved_activation_bytes(run_forward, model: torch.nn.Module) -> int:
    """Bytes of the tensors autograd saves while ``run_forward()`` runs its forward passes (each
    storage once; parameters and what the backward rebuilds under recompute are not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        if torch._C._current_graph_task_id() == -1:   # -1: not inside a backward pass
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run_forward()
    return sum(seen.values())
