"""LoRA and QLoRA on the tensor-parallel linears."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from megavlm.config.model import ParallelConfig
from megavlm.config.recipe import LoRAConfig, StageConfig
from megavlm.data.synthetic import synthetic_batches
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel.init import process_groups
from megavlm.peft.lora import lora_modules, merge_lora, unmerge_lora
from megavlm.training.build import build_model
from megavlm.training.stages import apply_stage
from tests.conftest import PARALLEL_WORKER, reference_step, run_torchrun, tiny_hf_llava

CFG = flavor_config("llava", "debug")
ALL = ["q", "k", "v", "o", "gate", "up", "down"]


def _model(ctx, state=None, lora=None):
    model = build_model(CFG, ParallelConfig(), ctx, process_groups()).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
    if lora is not None:
        apply_stage(model, StageConfig(trainable=["connector", "lora"], lora=lora))
    return model


def _logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])


def _randomize_b(model, std=0.3):
    g = torch.Generator().manual_seed(5)
    for module in lora_modules(model):
        for adapter in module.lora.values():
            adapter.lora_B.data.copy_(torch.randn(adapter.lora_B.shape, generator=g) * std)


@pytest.fixture(scope="module")
def base(single_process):
    model = _model(single_process)
    return model.state_dict(), synthetic_batches(CFG, 2, 48, micro_batch_size=2, seed=1)[0]


def test_fresh_adapters_leave_outputs_unchanged_and_merge_exactly(single_process, base):
    state, batch = base
    reference = _logits(_model(single_process, state), batch)
    model = _model(single_process, state, LoRAConfig(rank=4, targets=ALL))
    assert torch.equal(_logits(model, batch), reference)  # B = 0
    assert {p.megavlm_component for p in model.parameters() if p.requires_grad} == {"connector", "lora"}
    _randomize_b(model)
    adapted = _logits(model, batch)
    assert (adapted - reference).abs().max() > 1e-2
    merge_lora(model)
    torch.testing.assert_close(_logits(model, batch), adapted, rtol=1e-4, atol=1e-4)
    unmerge_lora(model)
    torch.testing.assert_close(_logits(model, batch), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.state_dict()["language_model.decoder.layers.0.self_attention.linear_qkv.weight"],
                               state["language_model.decoder.layers.0.self_attention.linear_qkv.weight"],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("targets", [["q"], ["v", "o"], ["gate", "down"]])
def test_target_selection_touches_only_its_slice(single_process, base, targets):
    state, batch = base
    model = _model(single_process, state, LoRAConfig(rank=2, targets=targets))
    _randomize_b(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight") and "language_model" in k}
    merge_lora(model)
    changed = {k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])}
    modules = {"q": "linear_qkv", "k": "linear_qkv", "v": "linear_qkv", "o": "linear_proj", "gate": "linear_fc1",
               "up": "linear_fc1", "down": "linear_fc2"}
    assert {k.split(".")[-2] for k in changed} == {modules[t] for t in targets}
    qkv = "language_model.decoder.layers.0.self_attention.linear_qkv.weight"
    if qkv in changed:  # only the targets' rows of each fused [q q k v] group move
        rows = (model.state_dict()[qkv] - before[qkv]).abs().sum(1).view(2, 4, 16).sum(-1) > 0
        expected = ["q" in targets, "q" in targets, "k" in targets, "v" in targets]
        assert rows.tolist() == [expected] * 2


def test_nf4_round_trip_within_the_format_bound():
    from megavlm.peft.nf4 import BLOCK_SIZE, dequantize, nf4_bytes, to_nf4

    weight = torch.randn(256, 128) * 0.02
    restored = dequantize(to_nf4(weight))
    blocks = weight.view(-1, BLOCK_SIZE)
    error = (restored.view(-1, BLOCK_SIZE) - blocks).abs()
    # NF4's widest gap between codes (-1 -> -0.6962) is 0.3038 of the block's absmax: nearest-code
    # rounding errs by at most half of it; the scales, double-quantised to 8 bits, add at most
    # half a step of 1/127 of the largest scale.
    absmax = blocks.abs().amax(1, keepdim=True)
    assert torch.all(error <= 0.5 * 0.3038 * absmax + 0.5 * absmax.max() / 127 + 1e-7)
    assert error.mean() < 0.1 * weight.abs().mean()
    assert nf4_bytes(to_nf4(weight)) * 8 / weight.numel() < 4.3  # bits per parameter


def test_qlora_trains_adapters_over_a_frozen_nf4_base(single_process, base):
    state, batch = base
    model = _model(single_process, state, LoRAConfig(rank=4, targets=ALL, quantize_base="nf4"))
    assert all(m.weight is None and m.weight_nf4 is not None for m in lora_modules(model))
    reference = _logits(_model(single_process, state), batch)
    out = _logits(model, batch)
    assert (out - reference).abs().max() < 0.25  # the 4-bit base stays close to the fp32 one
    model.train()
    logits = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])
    logits.float().pow(2).mean().backward()
    adapters = [a for m in lora_modules(model) for a in m.lora.values()]
    assert all(a.lora_B.grad is not None and a.lora_B.grad.abs().sum() > 0 for a in adapters)


def test_peft_export_loads_into_the_hf_converted_model(single_process, base, tmp_path):
    from peft import PeftModel

    from megavlm.peft.export import write_peft

    state, batch = base
    lora = LoRAConfig(rank=4, alpha=8, targets=ALL)
    model = _model(single_process, state, lora)
    _randomize_b(model)
    adapter = get_family("llava").adapter_cls(CFG)
    tensors = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    full = adapter.plan.unshard({(0, 0): tensors})
    write_peft(tmp_path / "peft", {k: v for k, v in full.items() if ".lora." in k}, lora, adapter)
    hf = tiny_hf_llava(CFG)
    hf.load_state_dict(adapter.megavlm_to_hf({(0, 0): tensors}), strict=False)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=batch["input_ids"], pixel_values=batch["images"]).logits
    assert (ref - _logits(model, batch)).abs().max() < 1e-4


@pytest.mark.multiproc
def test_lora_at_tp2_matches_tp1(single_process, tmp_path):
    hf_state = {k: v.clone() for k, v in tiny_hf_llava(CFG, seed=3).state_dict().items()}
    save_file(hf_state, tmp_path / "init.safetensors")
    # full-form adapters with non-zero B, so every factor gets a gradient at the first step
    model = _model(single_process, lora=LoRAConfig(rank=4, alpha=8, targets=ALL))
    _randomize_b(model)
    adapter = get_family("llava").adapter_cls(CFG)
    full = adapter.plan.unshard({(0, 0): {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}})
    save_file({k: v.contiguous() for k, v in full.items() if ".lora." in k}, tmp_path / "lora.safetensors")
    run_torchrun(PARALLEL_WORKER, 2, ["--init", str(tmp_path / "init.safetensors"), "--layouts", "2x1", "--out",
                                      str(tmp_path), "--samples", "2", "--lora-init", str(tmp_path / "lora.safetensors")])
    got = torch.load(tmp_path / "tp2_pp1.pt")
    ref = reference_step(single_process, CFG, hf_state, samples=2, lora_init=tmp_path / "lora.safetensors")
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert set(got["lora_grads"]) == set(ref["lora_grads"]) and len(ref["lora_grads"]) == 2 * 2 * len(ALL)
    for name, grad in ref["lora_grads"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got["lora_grads"][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _stage3(tmp_path, data_dir, recipe, *extra):
    from megavlm.config.recipe import load_recipe
    from tests.conftest import QUICKSTART, data_overrides

    base = ["parallel.tensor_parallel=1", f"checkpoint.dir={tmp_path / 'ckpt'}", "stage.init_from=",
            "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_samples=8", "eval.max_samples=8",
            "eval.vqa=null", "train.log_interval=1000", "stage.lora.rank=4"]
    return load_recipe(QUICKSTART / recipe, data_overrides(data_dir, captions=False) + base + list(extra))


def _losses(ckpt):
    import json

    rows = [json.loads(line) for line in (ckpt / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.parametrize("recipe", ["llava_debug_stage3_lora.yaml", "llava_debug_stage3_qlora.yaml"])
def test_adapter_only_checkpoints_resume_exactly(single_process, small_embedded, tmp_path, recipe):
    from megavlm.training.trainer import Trainer

    Trainer(_stage3(tmp_path / "a", small_embedded, recipe, "train.max_steps=4")).run()
    first = _stage3(tmp_path / "b", small_embedded, recipe, "train.max_steps=4", "train.exit_at_step=2")
    trainer = Trainer(first)
    trainer.run()
    saved = trainer.ckpt.latest()
    files = sum(f.stat().st_size for f in (saved / "model").rglob("*") if f.is_file())
    trainable = sum(p.numel() * 4 for p in trainer.model.parameters() if p.requires_grad)
    everything = sum(v.numel() * 4 for v in trainer.model.state_dict().values() if torch.is_tensor(v))
    assert files < 4 * trainable + 200_000 < everything  # adapters, connector, their Adam moments: small
    Trainer(first, resume=True).run()
    a, b = _losses(tmp_path / "a" / "ckpt"), _losses(tmp_path / "b" / "ckpt")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and all(a[s] == b[s] for s in a)
    assert (tmp_path / "b" / "ckpt" / "peft" / "adapter_model.safetensors").is_file()
