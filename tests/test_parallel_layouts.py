"""TP / PP / DP layouts against one process, and HF parity at TP=2.

The ``parallel_runs`` fixture (conftest) runs the LLaVA debug step in one 4-process torchrun
job under TP1xPP1 (DP=4), TP2 (DP=2), PP2 (DP=2) and TP2xPP2, each from the same HF weights and
global batch, and computes the single-process reference in the test process.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from megavlm.config.schema import with_overrides
from megavlm.models.registry import flavor_config, get_family
from tests.conftest import PARALLEL_WORKER, reference_step, run_torchrun, tiny_hf_llava

LAYOUTS = ["tp1_pp1", "tp2_pp1", "tp1_pp2", "tp2_pp2"]
LR = 1e-3  # make_optimizer's learning rate: post-step parameters agree to a small fraction of it


def assert_grads_close(got: dict, ref: dict, label: str) -> None:
    assert set(got) == set(ref)
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{label} {name}: {m}")


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_gradients_match_single_process(parallel_runs, layout):
    ref, got = parallel_runs["ref"], parallel_runs["results"][layout]
    assert got["tokens"] == ref["tokens"] > 0
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert_grads_close(got["grads"], ref["grads"], layout)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", LAYOUTS)
def test_optimizer_step_matches_single_process(parallel_runs, layout):
    ref, got = parallel_runs["ref"], parallel_runs["results"][layout]
    for name, param in ref["params"].items():
        torch.testing.assert_close(got["params"][name], param, rtol=0, atol=0.05 * LR, msg=lambda m: f"{layout} {name}: {m}")
    moved = max((ref["params"][k] - parallel_runs["hf_state"][k]).abs().max().item() for k in ref["params"])
    assert moved > 0.5 * LR  # the step really changed the weights


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_back_to_hf_is_identical(parallel_runs, layout):
    exported, init = parallel_runs["results"][layout]["exported"], parallel_runs["hf_state"]
    for name, tensor in exported.items():
        assert torch.equal(tensor, init[name]), name
    adapter = get_family("llava").adapter_cls(parallel_runs["cfg"])
    assert sorted(set(init) - set(exported)) == adapter.unused_hf_keys(init)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["tp1_pp1", "tp2_pp1"])
def test_logits_match_hf(parallel_runs, layout):
    batch = parallel_runs["ref"]["batches"][1]
    with torch.no_grad():
        ref = parallel_runs["hf"](input_ids=batch["input_ids"], pixel_values=batch["images"]).logits
    diff = (parallel_runs["results"][layout]["logits"] - ref).abs().max().item()
    assert diff < 1e-4, f"{layout}: max |logits - HF| = {diff}"


@pytest.mark.multiproc
def test_tied_embeddings_under_pipeline_parallelism(single_process, tmp_path):
    """Tied input/output embeddings: the last stage's copy gets the first stage's gradient."""
    override = "language.tie_embeddings=true"
    cfg = with_overrides(flavor_config("llava", "debug"), [override])
    hf_state = {k: v.clone() for k, v in tiny_hf_llava(cfg, seed=1).state_dict().items()}
    save_file(hf_state, tmp_path / "init.safetensors")
    run_torchrun(PARALLEL_WORKER, 2, ["--init", str(tmp_path / "init.safetensors"), "--layouts", "1x2",
                                      "--out", str(tmp_path), "--override", override])
    got = torch.load(tmp_path / "tp1_pp2.pt")
    ref = reference_step(single_process, cfg, hf_state)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert_grads_close(got["grads"], ref["grads"], "tied pp2")


KERNELS = ["kernels.cross_entropy=triton", "kernels.connector=triton"]


@pytest.mark.multiproc
@pytest.mark.parametrize("kernels", [KERNELS, ["kernels.fused_linear_cross_entropy=true"]],
                         ids=["triton-ce+connector", "fused-linear-ce"])
def test_kernels_at_tp2_match_torch_at_tp1(single_process, tmp_path, kernels):
    """The Triton paths, selected by config only, at TP=2 (interpreter) give the PyTorch path's
    loss and gradients at TP=1."""
    cfg = flavor_config("llava", "debug")
    hf_state = {k: v.clone() for k, v in tiny_hf_llava(cfg, seed=2).state_dict().items()}
    save_file(hf_state, tmp_path / "init.safetensors")
    args = ["--init", str(tmp_path / "init.safetensors"), "--layouts", "2x1", "--out", str(tmp_path), "--samples", "2"]
    for override in kernels:
        args += ["--override", override]
    run_torchrun(PARALLEL_WORKER, 2, args)
    got = torch.load(tmp_path / "tp2_pp1.pt")
    ref = reference_step(single_process, cfg, hf_state, samples=2)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert_grads_close(got["grads"], ref["grads"], " ".join(kernels))
