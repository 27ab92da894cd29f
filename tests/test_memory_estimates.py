"""FLOPs, activation and model-state estimates against what the debug models really do."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megavlm.config.recipe import StageConfig
from megavlm.models.registry import flavor_config
from megavlm.parallel import init as pinit
from megavlm.training.activations import Placement, activation_estimate
from megavlm.training.bench import build_harness, ours_step
from megavlm.training.flops import sample_flops
from megavlm.training.memory import nf4_size, saved_activation_bytes
from megavlm.training.step import forward_backward

BATCH, SEQ = 4, 48
pytestmark = pytest.mark.usefixtures("own_world")


@pytest.mark.parametrize("family,trainable", [
    ("llava", ["connector"]), ("blip2", ["connector", "llm"]), ("flamingo", ["connector", "fusion"]),
    ("internvl", ["vision", "connector", "llm"])])
def test_flops_formula_matches_counted_matmuls(family, trainable):
    cfg = flavor_config(family, "debug")
    h = build_harness(cfg, StageConfig(name="s", trainable=trainable), BATCH, SEQ, torch.float32)
    try:
        with FlopCounterMode(display=False) as counter:
            ours_step(h)()
    finally:
        pinit.destroy()
    images = [1] * BATCH
    estimate = sum(sample_flops(cfg, SEQ, n, set(trainable)).total for n in images)
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.12)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("trainable", [["connector"], ["vision", "connector", "llm"]])
def test_activation_estimate_within_15_percent_of_saved_tensors(trainable, recompute):
    cfg = flavor_config("llava", "debug")
    h = build_harness(cfg, StageConfig(name="s", trainable=trainable), BATCH, 64, torch.float32, recompute=recompute)
    try:
        measured = saved_activation_bytes(lambda: forward_backward([h.ddp], h.batches[:1], h.loss_fn, 64, BATCH),
                                          h.model)
    finally:
        pinit.destroy()
    estimate = activation_estimate(cfg, set(trainable), BATCH, 64, 1,
                                   Placement(1, False, 4, "full" if recompute else "off"), cfg.language.num_layers)
    assert sum(estimate.terms.values()) == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("shape,dtype", [((256, 64), torch.float32), ((192, 128), torch.bfloat16)])
def test_nf4_size_matches_torchao(shape, dtype):
    pytest.importorskip("torchao")
    from megavlm.peft.nf4 import nf4_bytes, to_nf4

    weight = torch.randn(shape, dtype=dtype)
    assert nf4_size(weight.numel(), dtype) == nf4_bytes(to_nf4(weight))


def test_counted_state_bytes_equal_a_real_rank():
    """Meta-device count (fake process group) == the real model, DDP buffers and Adam state after a step."""
    from megavlm.config.recipe import load_recipe
    from megavlm.training.memory import layout_state_bytes, measured_optimizer_bytes

    recipe = load_recipe("examples/recipes/quickstart/llava_debug_stage3.yaml", ["parallel.tensor_parallel=1"])
    counted = layout_state_bytes(recipe, tp=1, pp=1, dp=1)
    h = build_harness(recipe.model, recipe.stage, BATCH, SEQ, torch.float32)
    try:
        ours_step(h)()
        params = sum(p.numel() * p.element_size() for p in h.model.parameters())
        grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in h.ddp.buffers)
        optimizer = measured_optimizer_bytes(h.optimizer, half_params=False)
    finally:
        pinit.destroy()
    assert (counted.params, counted.grads, counted.optimizer) == (params, grads, optimizer)
