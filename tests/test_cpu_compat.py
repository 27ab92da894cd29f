"""The CPU compatibility layer for megatron-core: unit checks and the smoke test.

The smoke test (a TP=2 x PP=2 training step, a megatron-core optimizer step and a dist
checkpoint round trip, all over gloo) fails loudly when a megatron-core upgrade breaks the layer.
"""
import importlib.metadata

import pytest
import torch

from megavlm.config.model import ParallelConfig
from megavlm.models.registry import get_family
from megavlm.parallel.cpu_compat import CpuRNGStatesTracker, cpu_compat_active
from megavlm.parallel.init import process_groups
from megavlm.training.build import build_model, load_local_state

CHECKED_MEGATRON_CORE = "0.16.1"


def test_megatron_core_is_the_checked_version():
    installed = importlib.metadata.version("megatron-core")
    assert installed == CHECKED_MEGATRON_CORE, (
        f"megatron-core {installed} is installed but the CPU compatibility layer (megavlm/parallel/cpu_compat.py) "
        f"was checked against {CHECKED_MEGATRON_CORE}: run this file's smoke tests, fix the layer, then bump the pin")


def test_layer_is_active_without_cuda(single_process):
    assert cpu_compat_active() != torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is off when CUDA is present")
def test_cuda_placements_become_cpu(single_process):
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).to("cuda", torch.float16).dtype == torch.float16
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    assert torch.ones(2).type(torch.float64).dtype == torch.float64
    assert torch.cuda.current_device() == torch.device("cpu")


def test_rng_tracker_forks_are_independent_and_deterministic():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before)  # the default stream is untouched
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)  # the forked stream advanced
    replay = CpuRNGStatesTracker()
    replay.set_states({"model-parallel-rng": torch.Generator().manual_seed(123).get_state()})
    with replay.fork():
        assert torch.equal(torch.rand(3), a)
    with pytest.raises(RuntimeError, match="already exists"):
        tracker.add("other", 123)


@pytest.mark.multiproc
def test_smoke_tp2_pp2_step_matches_one_process(parallel_runs):
    ref, got = parallel_runs["ref"], parallel_runs["results"]["tp2_pp2"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


@pytest.mark.multiproc
def test_smoke_dist_checkpoint_from_tp2_pp2_loads_at_tp1(parallel_runs, single_process):
    from megatron.core import dist_checkpointing

    cfg = parallel_runs["cfg"]
    model = build_model(cfg, ParallelConfig(), single_process, process_groups())
    load_local_state(model, dist_checkpointing.load(model.sharded_state_dict(), str(parallel_runs["ckpt"])))
    adapter = get_family("llava").adapter_cls(cfg)
    loaded = adapter.megavlm_to_hf({(0, 0): model.state_dict()})
    stepped = parallel_runs["results"]["tp2_pp2"]["params"]
    assert set(loaded) == set(stepped)
    for name, tensor in stepped.items():
        assert torch.equal(loaded[name], tensor), name
