"""One training (or evaluation) step over megatron-core's pipeline schedules.

The schedule runs every micro-batch through all pipeline stages (1F1B when PP > 1). Losses are
token *sums*; with ``calculate_per_token_loss`` megatron-core's ``finalize_model_grads`` divides the
gradients by the supervised-token count of the whole global batch (all micro-batches, all DP
ranks), and ``reduce_losses`` reports the matching per-token loss.

A step whose loss or gradient norm is NaN/Inf makes no optimizer update, on every rank (the flag
is all-reduced over the world, so TP/PP/DP ranks always agree).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from megavlm.training.resilience import flags


LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor, dict]]


def lm_loss_fn(head) -> LossFn:
    """Next-token loss of the last stage's output through an LM head (losses/lm_loss.py):
    returns (sum, tokens, {name: [sum, tokens]})."""

    def loss(output: torch.Tensor, batch: dict):
        total, tokens = head.loss(output, batch["labels"])
        report = torch.stack([total.detach().float(), tokens.float()])
        return total, tokens.int(), {"lm_loss": report}

    return loss


def model_inputs(batch: dict) -> dict:
    """The keyword arguments a model's forward takes from a batch."""
    keys = ("input_ids", "images", "images_per_sample", "position_ids", "attention_mask", "packed_seq_params",
            "text_ids", "text_mask", "prefix_lengths")
    return {k: batch[k] for k in keys if k in batch}


def _forward_step(loss_fn: LossFn, data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    output = model(**model_inputs(batch))
    return output, partial(_apply_loss, loss_fn, batch)


def _apply_loss(loss_fn: LossFn, batch: dict, output: torch.Tensor):
    return loss_fn(output, batch)


def configure_schedule(model_chunks: list, grad_scale_func=None) -> None:
    """Hooks the schedule needs on the shared TransformerConfig (done once after wrapping in DDP)."""
    config = get_model_config(model_chunks[0])
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = grad_scale_func
    no_sync = [chunk.no_sync for chunk in model_chunks if hasattr(chunk, "no_sync")]
    config.no_sync_func = (no_sync[0] if len(no_sync) == 1 else no_sync) or None


def pipeline_seq_length(model_chunks: list, seq_length: int) -> int:
    """Rows of the tensor pipeline stages exchange: the sequence, plus any rows a family sends
    along with it (Flamingo's media latents, models/flamingo/model.py)."""
    inner = getattr(model_chunks[0], "module", model_chunks[0])
    return seq_length + getattr(inner, "pipeline_extra_rows", 0)


@dataclass
class StepResult:
    losses: dict[str, float]         # per-token loss over the global batch, by name
    tokens: int                      # supervised tokens in the global batch
    grad_norm: float | None = None
    skipped: bool = False            # no optimizer update (fp16 overflow, or not finite)
    not_finite: bool = False         # the loss or the gradient norm was NaN/Inf (on some rank)
    bad_micro_batches: list[int] = field(default_factory=list)   # this rank's, with a non-finite loss


def forward_backward(model_chunks: list, batches: list[dict], loss_fn: LossFn, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False) -> StepResult:
    """Run all micro-batches in ``batches`` (this DP rank's share of the global batch)."""
    schedule = get_forward_backward_func()
    reports = schedule(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=iter(batches),
        model=model_chunks,
        num_microbatches=len(batches),
        seq_length=pipeline_seq_length(model_chunks, seq_length),
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    result = reduce_losses(reports)
    result.bad_micro_batches = [i for i, r in enumerate(reports)
                                if not all(bool(torch.isfinite(v).all()) for v in r.values())]
    return result


def reduce_losses(reports: list[dict]) -> StepResult:
    """Sum [loss, tokens] pairs over micro-batches and DP ranks; share the result with all stages."""
    names = sorted(reports[0]) if reports else []
    totals = torch.stack([sum(r[n] for r in reports) for n in names]) if names else None
    if parallel_state.is_pipeline_last_stage():
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    # Other stages learn names and values from the last stage.
    payload = [names, totals.tolist() if totals is not None else None]
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:
        dist.broadcast_object_list(payload, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pp_group)
    names, values = payload
    losses = {n: v[0] / max(v[1], 1.0) for n, v in zip(names, values)}
    tokens = int(values[0][1]) if values else 0
    return StepResult(losses=losses, tokens=tokens)


def _all_finite(values) -> bool:
    """Collective over the world: every rank's values are finite."""
    bad = flags([0 if all(v is not None and math.isfinite(v) for v in values) else 1])
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not int(bad)


def _clip_and_update(optimizer, grad_norm: float) -> bool:
    """The rest of megatron-core's ``ChainedOptimizer.step`` once the norm is known: clip by the
    total norm, then update."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = inner.get_parameters()
        if getattr(inner, "is_stub_optimizer", False) or not params or inner.config.clip_grad <= 0.0:
            continue
        clip_grad_by_total_norm_fp32(params, max_norm=inner.config.clip_grad, total_norm=grad_norm,
                                     use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return optimizer.step_with_ready_grads()


def train_step(model_chunks: list, optimizer, batches: list[dict], loss_fn: LossFn, seq_length: int,
               micro_batch_size: int) -> StepResult:
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    result = forward_backward(model_chunks, batches, loss_fn, seq_length, micro_batch_size)
    with torch.no_grad():
        if optimizer.prepare_grads():  # fp16 loss-scale overflow: the scaler backs off, no update
            result.skipped = True
            return result
        grad_norm = float(optimizer.get_grad_norm())
        result.grad_norm = grad_norm
        if not _all_finite([grad_norm, *result.losses.values()]):
            result.skipped = result.not_finite = True
            return result
        result.skipped = not _clip_and_update(optimizer, grad_norm)
    return result
