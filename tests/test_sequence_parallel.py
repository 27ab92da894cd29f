"""Sequence parallelism on the local spec over gloo: TP=2 + SP equals one process, loss and every
gradient (norms, ViT, connector, embeddings included), for LLaVA, BLIP-2's decoder and InternVL."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from megavlm.config.model import ParallelConfig
from tests.conftest import ROOT, run_torchrun
from tests.workers import sp_step


@pytest.fixture(scope="module")
def sp_runs(single_process, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    weights = {family: sp_step.initial_weights(family) for family in sp_step.FAMILIES}
    for family, full in weights.items():
        save_file(full, tmp / f"{family}.safetensors")
    run_torchrun(ROOT / "tests" / "workers" / "sp_step.py", 2, ["--init-dir", str(tmp), "--out", str(tmp)])
    got = {family: torch.load(tmp / f"{family}.pt") for family in sp_step.FAMILIES}
    (tmp / "ref").mkdir()
    for family, full in weights.items():
        sp_step.run(family, ParallelConfig(), full, str(tmp / "ref"))
    ref = {family: torch.load(tmp / "ref" / f"{family}.pt") for family in sp_step.FAMILIES}
    return got, ref


def test_the_vit_token_count_needs_padding_at_tp2():
    assert (sp_step.model_config("llava").vision.num_patches + 1) % 2 == 1


@pytest.mark.multiproc
@pytest.mark.parametrize("family", list(sp_step.FAMILIES))
def test_tp2_sequence_parallel_matches_one_process(sp_runs, family):
    got, ref = sp_runs[0][family], sp_runs[1][family]
    assert got["tokens"] == ref["tokens"] > 0
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert set(got["grads"]) == set(ref["grads"])
    norms = [k for k in ref["grads"] if "norm" in k or "ln_pre" in k]
    assert norms, "the comparison must include norm gradients"
    for name, grad in ref["grads"].items():
        scale = grad.abs().max().item()
        assert scale > 0, f"{family} {name}: zero reference gradient"
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m: f"{family} {name}: {m}")
