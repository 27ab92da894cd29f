"""One-process training harness for the benchmark tools: a model of a flavor with a stage
applied, megatron-core DDP and optimizer, synthetic batches, and a timed step loop."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Harness:
    cfg: object
    model: torch.nn.Module
    ddp: object
    optimizer: object
    loss_fn: object
    batches: list
    seq: int
    batch: int


def build_harness(cfg, stage, batch: int, seq: int, dtype: torch.dtype, lr: float = 1e-4,
                  images_per_sample: int = 1, fill: float = 1.0, recompute: bool = False) -> Harness:
    from megatron.core.optimizer import get_megatron_optimizer

    from megavlm.config.model import ParallelConfig
    from megavlm.config.recipe import OptimizerConfig
    from megavlm.data.synthetic import synthetic_batches
    from megavlm.models.common.layer_specs import lm_head
    from megavlm.parallel import init as pinit
    from megavlm.training.build import build_model, wrap_ddp
    from megavlm.training.stages import apply_stage, megatron_optimizer_config, optimizer_groups
    from megavlm.training.step import configure_schedule, lm_loss_fn

    ctx = pinit.initialize(ParallelConfig(), seed=0)
    model = build_model(cfg, ParallelConfig(), ctx, pinit.process_groups(), dtype=dtype, recompute=recompute)
    apply_stage(model, stage)
    ddp = wrap_ddp(model)
    configure_schedule([ddp])
    opt_cfg = OptimizerConfig(lr=lr)
    mcfg = megatron_optimizer_config(opt_cfg, dtype)
    optimizer = get_megatron_optimizer(mcfg, [ddp], config_overrides=optimizer_groups(
        stage, opt_cfg, mcfg, cfg.vision_layers))
    batches = synthetic_batches(cfg, batch, seq, micro_batch_size=batch, seed=0, image_pattern=(images_per_sample,),
                                device=ctx.device, fill=fill)
    loss_fn = lm_loss_fn(lm_head(cfg, pinit.process_groups().tp, model.output_weight))
    return Harness(cfg, model, ddp, optimizer, loss_fn, batches, seq, batch)


def time_steps(step, steps: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``step()`` after ``warmup`` untimed calls (synchronised on GPUs)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        begin = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    return times


def ours_step(h: Harness):
    from megavlm.training.step import train_step

    return lambda: train_step([h.ddp], h.optimizer, h.batches, h.loss_fn, h.seq, h.batch)


def median(times: list[float]) -> float:
    return statistics.median(times)
