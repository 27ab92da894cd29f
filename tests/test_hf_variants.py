"""Every HF layout in tests/hf_variants.py, both ways, fp32: HF -> megavlm gives HF's logits
(max |diff| < 1e-4), the config read back from HF's config.json is megavlm's, and megavlm -> HF
gives the original tensors and a model with the same logits. TP=1 here, TP=2 in one launch."""
from __future__ import annotations

import json

import pytest
import torch

from megavlm.config.model import ParallelConfig
from megavlm.models.registry import get_family
from megavlm.parallel.init import process_groups
from megavlm.training.build import build_model, load_local_state
from tests import hf_variants
from tests.conftest import ROOT, run_torchrun

TOLERANCE = 1e-4


def _megavlm_logits(model, cfg, b):
    with torch.no_grad():
        out = model(b["input_ids"], images=b["images"], images_per_sample=b["images_per_sample"])
    return out[..., : cfg.language.vocab_size].float()


@pytest.mark.parametrize("name", [*hf_variants.VARIANTS, *hf_variants.ODD_HEAD_VARIANTS])
def test_variant_both_ways(single_process, name):
    cfg = hf_variants.variant_config(name)
    family = get_family(cfg.family)
    hf = hf_variants.hf_reference(cfg, seed=3)
    back = family.config_from_hf(hf.config.to_dict(), cfg.flavor)
    # megavlm layout choices, not in HF's config
    back.vision.tensor_parallel, back.vision.padded_heads = cfg.vision.tensor_parallel, cfg.vision.padded_heads
    if cfg.flamingo is not None:
        back.flamingo.resampler_padded_heads = cfg.flamingo.resampler_padded_heads
    assert (back.vision, back.language, back.flamingo) == (cfg.vision, cfg.language, cfg.flamingo)

    reference = dict(hf.state_dict())
    adapter = family.adapter_cls(cfg)
    model = build_model(cfg, ParallelConfig(), single_process, process_groups()).eval()
    load_local_state(model, adapter.hf_to_megavlm(reference))
    b = hf_variants.batch(cfg)
    ref = hf_variants.hf_logits(cfg, hf, b)
    diff = (_megavlm_logits(model, cfg, b) - ref).abs().max().item()
    print(f"{name}: HF -> megavlm max |logits diff| {diff:.2e}")
    assert diff < TOLERANCE

    exported = adapter.megavlm_to_hf({(0, 0): model.state_dict()})
    assert not hf_variants.export_mismatches(exported, reference)
    again = hf_variants.hf_logits(cfg, hf_variants.exported_hf_model(cfg, exported, reference), b)
    assert (again - ref).abs().max().item() < TOLERANCE


def test_unsupported_hf_fields_are_named():
    cases = [
        ("internvl-qkv-bias-free", lambda c: c["vision_config"].update(use_mask_token=True), "vision_config.use_mask_token"),
        ("internvl-qkv-bias-free", lambda c: c["text_config"].update(use_sliding_window=True),
         "text_config.use_sliding_window"),
        ("llava-gqa1-cls", lambda c: c["text_config"].update(attention_bias=True), "text_config.attention_bias"),
        ("llava-gqa1-cls", lambda c: c["text_config"].update(mlp_bias=True), "text_config.mlp_bias"),
        ("llava-gqa1-cls", lambda c: c["text_config"]["rope_parameters"].update(rope_type="llama3"),
         "text_config.rope_parameters.rope_type"),
        ("llava-gqa1-cls", lambda c: c["text_config"].update(model_type="gemma"), "text_config.model_type"),
        ("blip2-opt-qkv-bias-free", lambda c: c["text_config"].update(enable_bias=False), "text_config.enable_bias"),
    ]
    for name, edit, field in cases:
        cfg = hf_variants.variant_config(name)
        family = get_family(cfg.family)
        hf_config = json.loads(json.dumps(family.config_to_hf(cfg)))
        edit(hf_config)
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            family.config_from_hf(hf_config)


@pytest.mark.parametrize("quantize", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("name", hf_variants.PEFT_VARIANTS)
def test_peft_export_reproduces_megavlm(single_process, tmp_path, name, quantize):
    """The trainer's export (adapters + hf_base/) loaded by PEFT over the HF class gives megavlm's logits."""
    from megavlm.peft.lora import full_precision_state

    cfg = hf_variants.variant_config(name)
    adapter = get_family(cfg.family).adapter_cls(cfg)
    model = build_model(cfg, ParallelConfig(), single_process, process_groups()).eval()
    load_local_state(model, adapter.hf_to_megavlm(dict(hf_variants.hf_reference(cfg, seed=4).state_dict())))
    lora = hf_variants.add_lora(model, cfg, quantize)
    b = hf_variants.batch(cfg)
    ours = _megavlm_logits(model, cfg, b)
    ref = hf_variants.peft_logits(cfg, lora, {(0, 0): full_precision_state(model)}, adapter, tmp_path, b)
    assert (ours - ref).abs().max().item() < TOLERANCE


def test_a_family_that_cannot_export_fails_at_recipe_load():
    from megavlm.config.recipe import LoRAConfig
    from megavlm.config.schema import ConfigError
    from megavlm.peft.export import export_problem

    opt = hf_variants.variant_config("blip2-opt-qkv-bias-free")
    assert "gate" in export_problem(opt, LoRAConfig(targets=["q", "gate"]))
    retrieval = hf_variants.variant_config("blip2-opt-qkv-bias-free")
    retrieval.head = "qformer"
    assert "no HF decoder" in export_problem(retrieval, LoRAConfig())
    from megavlm.config.recipe import load_recipe
    from tests.conftest import QUICKSTART

    with pytest.raises(ConfigError, match="stage.lora.export_peft"):
        load_recipe(QUICKSTART / "llava_debug_stage3_lora.yaml",
                    ["model.family=blip2", "model.flavor=debug", "stage.lora.export_peft=true",
                     "stage.lora.targets=[q,gate]"])


@pytest.mark.multiproc
def test_variants_at_tp2(tmp_path):
    """One 2-process launch: every variant converted from HF straight into TP=2 shards gives HF's
    logits, and its shards gathered and exported give the original HF tensors; LoRA and QLoRA
    adapters at TP=2, exported for PEFT, give megavlm's logits in every family."""
    run_torchrun(ROOT / "tests" / "workers" / "hf_variants_tp.py", 2, ["--out", str(tmp_path / "tp2.json")])
    results = json.loads((tmp_path / "tp2.json").read_text())
    assert set(results["variants"]) == set(hf_variants.VARIANTS)
    assert len(results["peft"]) == 2 * len(hf_variants.PEFT_VARIANTS)
    for name, diff in results["peft"].items():
        assert diff < TOLERANCE, (name, diff)
    for name, result in results["variants"].items():
        assert result["logits_diff"] < TOLERANCE, (name, result)
        assert result["export_mismatches"] == [], (name, result)
        assert result["export_logits_diff"] < TOLERANCE, (name, result)

    # modules kept whole on both TP ranks: their gradients equal one process's (not summed over TP),
    # the gradient norm counts them on TP rank 0 only, and a TP=2 checkpoint loads at TP=1
    from megavlm.parallel import init as pinit
    from megavlm.training.checkpoint import load_model
    from tests.workers import hf_variants_tp

    ctx = pinit.initialize(ParallelConfig(), seed=0)
    for variant, (rank0, rank1) in results["whole_counted_by_rank"].items():
        assert rank0 and all(rank0) and not any(rank1), variant
        ref = hf_variants_tp.whole_grads(variant, ctx, process_groups(), ParallelConfig())["grads"]
        tp2 = torch.load(tmp_path / f"{variant}_grads.pt")
        assert set(tp2) == set(ref) and ref, variant
        # HF starts the Q-Former's query tokens at zero: the LayerNorm right after them gets no weight gradient
        assert all(grad.abs().sum() > 0 for name, grad in ref.items() if name != "qformer.layernorm.weight"), variant
        for name, grad in ref.items():
            # fp32 sums in another order: tolerances scale with the tensor's largest gradient
            # (counting a whole module's gradient twice would be off by 2x)
            torch.testing.assert_close(tp2[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item() + 1e-10,
                                       msg=lambda m: f"{variant} {name}: {m}")
    first = next(iter(hf_variants.WHOLE_MODULES))
    cfg = hf_variants.variant_config(first)
    model = build_model(cfg, ParallelConfig(), ctx, process_groups())
    load_model(model, tmp_path / f"{first}_ckpt")
    exported = get_family(cfg.family).adapter_cls(cfg).megavlm_to_hf({(0, 0): model.state_dict()})
    assert not hf_variants.export_mismatches(exported, dict(hf_variants.hf_reference(cfg, seed=5).state_dict()))


def test_heads_tp_does_not_divide_fail_at_recipe_load():
    from megavlm.config.recipe import load_recipe
    from megavlm.config.schema import ConfigError
    from tests.conftest import QUICKSTART

    recipe = QUICKSTART / "llava_debug_stage3_lora.yaml"  # tensor_parallel: 2
    with pytest.raises(ConfigError, match=r"model\.vision\.num_heads.*ViT's self-attention has 5 heads.*"
                                          r"tensor_parallel=2"):
        load_recipe(recipe, ["model.vision.hidden_size=60", "model.vision.num_heads=5"])
    with pytest.raises(ConfigError, match=r"model\.language\.num_kv_heads.*1 heads"):
        load_recipe(recipe, ["model.language.num_kv_heads=1"])
    assert load_recipe(recipe, ["parallel.tensor_parallel=1", "model.vision.hidden_size=60",
                                "model.vision.num_heads=5"]).model.vision.num_heads == 5
    # BLIP-2 stage 1 (head: qformer) splits its Q-Former with the model: dummy heads are the way
    blip2 = ROOT / "examples" / "recipes" / "blip2" / "blip2_debug_stage1.yaml"  # tensor_parallel: 2
    odd = ["model.qformer.hidden_size=80", "model.qformer.num_heads=5"]
    with pytest.raises(ConfigError, match=r"model\.qformer\.num_heads.*Q-Former's self- and cross-attention has 5"):
        load_recipe(blip2, odd)
    assert load_recipe(blip2, odd + ["model.qformer.padded_heads=6"]).model.qformer.built_heads == 6
    flamingo = ROOT / "examples" / "recipes" / "flamingo" / "flamingo_debug_pretrain.yaml"
    with pytest.raises(ConfigError, match=r"model\.flamingo\.resampler_heads.*resampler's attention has 3"):
        load_recipe(flamingo, ["parallel.tensor_parallel=2", "model.flamingo.resampler_heads=3"])
    assert load_recipe(flamingo, ["parallel.tensor_parallel=2", "model.flamingo.resampler_heads=3",
                                  "model.flamingo.resampler_padded_heads=4"]).model.flamingo.resampler_built_heads == 4


def _dummy_rows(grad: torch.Tensor, heads: int, real: int, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The real heads' and the dummy heads' part of a head-major gradient along ``dim``."""
    per_head = grad.shape[dim] // heads
    return grad.narrow(dim, 0, real * per_head), grad.narrow(dim, real * per_head, (heads - real) * per_head)


def _padded_attentions(model, cfg) -> list[tuple[torch.nn.Module, int, int]]:
    """(attention module, built heads, real heads) of every padded attention in the model."""
    if cfg.family == "flamingo":
        f = cfg.flamingo
        return [(layer.attention, f.resampler_built_heads, f.resampler_heads) for layer in model.resampler.layers]
    found = [(layer.self_attention, cfg.vision.built_heads, cfg.vision.num_heads)
             for layer in model.vision.encoder.layers]
    if cfg.qformer is not None:
        q = cfg.qformer
        found += [(a, q.built_heads, q.num_heads) for layer in model.qformer.layers
                  for a in (layer.attention, layer.cross_attention) if a is not None]
    return found


@pytest.mark.parametrize("name", ["internvl-5-heads-padded", "blip2-5-heads-padded",
                                  "flamingo-3-heads-padded-resampler"])
def test_dummy_heads_get_no_gradient(single_process, name):
    """Zero dummy heads stay zero under training: every gradient that reaches them is exactly 0
    (zero q/k/v give a zero head output, whose output-projection columns are zero too), in the
    ViT (with InternViT's QK-norm), the Q-Former's self- and cross-attention and the resampler."""
    from megavlm.config.recipe import StageConfig
    from megavlm.training.stages import apply_stage

    cfg = hf_variants.variant_config(name)
    adapter = get_family(cfg.family).adapter_cls(cfg)
    model = build_model(cfg, ParallelConfig(), single_process, process_groups())
    load_local_state(model, adapter.hf_to_megavlm(dict(hf_variants.hf_reference(cfg, seed=1).state_dict())))
    apply_stage(model, StageConfig(trainable=["vision", "connector", "llm"]))
    b = hf_variants.batch(cfg)
    model(b["input_ids"], images=b["images"], images_per_sample=b["images_per_sample"]).pow(2).mean().backward()
    attentions = _padded_attentions(model, cfg)
    assert attentions and all(built > real for _, built, real in attentions)
    for attention, built, real in attentions:
        inputs = [m for m in ("linear_qkv", "linear_q", "linear_kv") if hasattr(attention, m)]
        grads = [(getattr(attention, m).weight.grad, 0) for m in inputs] + [(attention.linear_proj.weight.grad, 1)]
        if hasattr(getattr(attention, "q_layernorm", None), "weight"):  # InternViT's QK-norm
            grads.append((attention.q_layernorm.weight.grad, 0))
        for grad, dim in grads:
            kept, dummy = _dummy_rows(grad, built, real, dim)
            assert kept.abs().sum() > 0 and torch.all(dummy == 0), (name, attention)
