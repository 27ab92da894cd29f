"""megatron-core's distributed optimizer at DP>1 (with overlapped gradient reduce and parameter
all-gather) equals the plain optimizer, and its DP=2 checkpoint resumes at DP=1."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from megavlm.config.model import ParallelConfig
from megavlm.models.registry import get_family
from tests.conftest import ROOT, run_torchrun, tiny_hf_llava
from tests.workers import distopt_step

WORKER = ROOT / "tests" / "workers" / "distopt_step.py"


@pytest.fixture(scope="module")
def runs(single_process, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distopt")
    hf = {k: v.clone() for k, v in tiny_hf_llava(distopt_step.CFG, seed=4).state_dict().items()}
    save_file(hf, tmp / "init.safetensors")
    run_torchrun(WORKER, 2, ["--init", str(tmp / "init.safetensors"), "--layout", "1x1", "--out", str(tmp),
                             "--checkpoint", str(tmp / "ckpt")])
    run_torchrun(WORKER, 4, ["--init", str(tmp / "init.safetensors"), "--layout", "2x1", "--out", str(tmp)])
    results = {p.stem: torch.load(p) for p in tmp.glob("*.pt")}
    return tmp, hf, results


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["1x1", "2x1"], ids=["dp2", "tp2xdp2"])
def test_distributed_optimizer_matches_plain(runs, layout):
    _, hf, results = runs
    plain, dist = results[f"plain_{layout}"], results[f"distributed_{layout}"]
    assert dist["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    init = get_family("llava").adapter_cls(distopt_step.CFG).hf_to_megavlm(hf)
    assert set(dist["params"]) == set(plain["params"])
    for name, param in plain["params"].items():
        torch.testing.assert_close(dist["params"][name], param, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    moved = max((plain["params"][k] - init[k]).abs().max().item() for k in plain["params"] if k in init)
    assert moved > 0.5 * distopt_step.LR  # the steps really changed the weights


@pytest.mark.multiproc
def test_dp2_distributed_checkpoint_resumes_at_dp1(runs):
    from megavlm.config.recipe import CheckpointConfig
    from megavlm.training.checkpoint import CheckpointManager
    from megavlm.training.step import train_step

    tmp, hf, results = runs
    dp2 = results["distributed_1x1"]
    ctx, adapter, model, ddp, optimizer, loss_fn = distopt_step.build(ParallelConfig(), True, hf)
    manager = CheckpointManager(CheckpointConfig(dir=str(tmp / "ckpt")), distopt_step.CFG)
    manager.load(manager.latest(), model, optimizer)
    loaded = distopt_step.full_params(ctx, adapter, model, ddp)
    for name, param in dp2["params_at_2"].items():
        assert torch.equal(loaded[name], param), name
    result = train_step([ddp], optimizer, distopt_step.step_batches(3), loss_fn, distopt_step.SEQ, 1)
    assert result.losses["lm_loss"] == pytest.approx(dp2["losses"][2], rel=1e-6)
    final = distopt_step.full_params(ctx, adapter, model, ddp)
    for name, param in dp2["params"].items():
        torch.testing.assert_close(final[name], param, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
