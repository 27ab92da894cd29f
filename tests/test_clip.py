"""CLIP / SigLIP (model.family: clip): HF parity both ways (TP=1 here; TP=2, and the objectives under
TP=2 and DP=2 against one process over the whole batch, in one torchrun launch); the objectives
against HF's losses; a debug CLIP trained on the embedded data retrieves far above chance, is
scored by tools/evaluate.py, and its ViT starts a LLaVA stage 1 that reports the CLIP similarity
of its captions; HF CLIP/SigLIP towers into LLaVA and InternVL; the converter both ways."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megavlm.config.model import ParallelConfig
from megavlm.config.schema import ConfigError, with_overrides
from megavlm.models.common import hf_blocks
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel.init import process_groups
from megavlm.training.build import build_model, load_local_state
from tests import clip_cases
from tests.conftest import ROOT, data_overrides, run_torchrun

FAMILY = get_family("clip")
TOLERANCE = 1e-4
RECIPES = ROOT / "examples" / "recipes" / "clip"


def _ours(ctx, cfg, hf_state):
    model = build_model(cfg, ParallelConfig(), ctx, process_groups()).eval()
    load_local_state(model, FAMILY.adapter_cls(cfg).hf_to_megavlm(hf_state))
    return model


@pytest.mark.parametrize("name", [*clip_cases.VARIANTS, *clip_cases.ODD_HEAD_VARIANTS])
def test_hf_parity_both_ways(single_process, name):
    cfg = clip_cases.variant_config(name)
    hf = clip_cases.hf_reference(cfg, seed=3)
    back = FAMILY.config_from_hf(hf.config.to_dict(), cfg.flavor)
    back.vision.padded_heads = cfg.vision.padded_heads  # a megavlm layout choice, not in HF's config
    assert (back.vision, back.language) == (cfg.vision, cfg.language)
    c, b = cfg.contrastive, back.contrastive
    assert (b.loss, b.embed_dim, b.image_pooling, b.text_pooling, b.causal_text) == \
        (c.loss, c.embed_dim, c.image_pooling, c.text_pooling, c.causal_text)

    reference = dict(hf.state_dict())
    model = _ours(single_process, cfg, reference)
    batch = clip_cases.pairs(cfg)
    ref = clip_cases.hf_logits(cfg, hf, batch)
    diff = (clip_cases.megavlm_logits(model, batch) - ref).abs().max().item()
    print(f"{name}: HF -> megavlm max |logits diff| {diff:.2e}")
    assert diff < TOLERANCE

    exported = FAMILY.adapter_cls(cfg).megavlm_to_hf({(0, 0): model.state_dict()})
    assert set(exported) == set(reference)
    assert [k for k, v in exported.items() if not torch.equal(v, reference[k])] == []
    again = clip_cases.hf_logits(cfg, clip_cases.exported_hf_model(cfg, exported), batch)
    diff = (again - ref).abs().max().item()
    print(f"{name}: megavlm -> HF max |logits diff| {diff:.2e}")
    assert diff < TOLERANCE


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_objectives_equal_hf_losses(single_process, name):
    """InfoNCE and the sigmoid loss (sums over rows / rows) against HF's return_loss on the same pairs."""
    cfg = clip_cases.variant_config(name)
    hf = clip_cases.hf_reference(cfg, seed=4)
    model = _ours(single_process, cfg, dict(hf.state_dict()))
    batch = clip_cases.synthetic_pairs(cfg, 5, seed=2)
    masked = {"attention_mask": batch["text_mask"]} if cfg.contrastive.text_pooling != "last" else {}
    with torch.no_grad():
        ref = hf(input_ids=batch["text_ids"], pixel_values=batch["images"], return_loss=True, **masked).loss
        (total, rows), = model(**batch).values()
    assert (total / rows).item() == pytest.approx(ref.item(), rel=1e-5)


def test_an_empty_micro_batch_joins_with_zero_gradients(single_process):
    """All of a micro-batch's samples skipped: no rows, a zero loss and a zero gradient for every
    parameter (the gathers of the other ranks still get this rank's part)."""
    model = build_model(flavor_config("clip", "debug"), ParallelConfig(), single_process, process_groups())
    empty = clip_cases.synthetic_pairs(model.model_config, 2)
    (total, rows), = model(**{k: v[:0] for k, v in empty.items()}).values()
    total.backward()
    assert rows == 0 and total.item() == 0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("pooling, causal", [("eot", True), ("mean", False), ("mean", True)])
def test_text_embeddings_do_not_depend_on_padding(single_process, pooling, causal):
    """A text padded to a longer row has the embedding of the same text unpadded: CLIP's causal
    end-of-text token never sees the padding after it; mean pooling hides it from attention and
    from the mean."""
    cfg = with_overrides(flavor_config("clip", "debug"), [f"contrastive.text_pooling={pooling}",
                                                         f"contrastive.causal_text={causal}"])
    model = build_model(cfg, ParallelConfig(), single_process, process_groups()).eval()
    ids = torch.randint(5, 700, (1, 9), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 7)], 1).long()
    with torch.no_grad():
        short = model.embed_texts(ids, torch.ones_like(ids))
        long = model.embed_texts(padded, mask)
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-6)


@pytest.mark.multiproc
def test_tp2_parity_and_objectives_at_tp2_and_dp2(single_process, tmp_path):
    """One torchrun launch: HF parity at TP=2; each objective's loss and every gradient at TP=2 and
    at DP=2 (3 + 3 rows, 4 + 2, and 6 + 0) equal one process's over the 6 rows."""
    from tests.workers import clip_step

    full = {}
    for loss, flavor in clip_step.OBJECTIVE_FLAVORS.items():
        cfg = flavor_config("clip", flavor)
        model = build_model(cfg, ParallelConfig(), single_process, process_groups())
        with torch.no_grad():  # a scale and bias away from their initial values
            model.objective.logit_scale.add_(0.3)
        full[loss] = FAMILY.adapter_cls(cfg).plan.unshard({(0, 0): {k: v for k, v in model.state_dict().items()
                                                                    if torch.is_tensor(v)}})
        save_file({k: v.contiguous() for k, v in full[loss].items()}, tmp_path / f"{loss}_init.safetensors")
    run_torchrun(ROOT / "tests" / "workers" / "clip_step.py", 2, ["--out", str(tmp_path)])
    parity = json.loads((tmp_path / "parity_tp2.json").read_text())
    for name, result in parity.items():
        print(f"{name} TP=2: HF -> megavlm {result['logits_diff']:.2e}, "
              f"megavlm -> HF {result['export_logits_diff']:.2e}")
        assert result["logits_diff"] < TOLERANCE and result["export_logits_diff"] < TOLERANCE, name
        assert result["export_mismatches"] == [] and result["export_missing"] == [], name
    for loss in clip_step.OBJECTIVE_FLAVORS:
        clip_step.objective_step(loss, ParallelConfig(), full[loss], str(tmp_path), f"{loss}_one")
        ref = torch.load(tmp_path / f"{loss}_one.pt")
        assert ref["losses"][loss] > 0
        for layout in ("tp2", *clip_step.DP_SPLITS):
            got = torch.load(tmp_path / f"{loss}_{layout}.pt")
            print(f"{loss} {layout}: loss {got['losses'][loss]:.6f} vs one process {ref['losses'][loss]:.6f}")
            assert got["losses"][loss] == pytest.approx(ref["losses"][loss], rel=1e-5)
            assert set(got["grads"]) == set(ref["grads"])
            for key, grad in ref["grads"].items():
                scale = grad.abs().max().item() + 1e-8
                torch.testing.assert_close(got["grads"][key], grad, rtol=1e-4, atol=1e-5 * scale,
                                           msg=lambda m: f"{loss} {layout} {key}: {m}")


# ---- a debug CLIP trained on the embedded data (conftest.py: trained_clip) ---------------------
def test_debug_clip_retrieves_far_above_chance(trained_clip):
    _, m = trained_clip
    print("held-out retrieval (48 pairs):", {k: round(v, 4) for k, v in m.items() if not k.startswith("val/")})
    assert min(m["i2t_r1"], m["t2i_r1"]) > 4 * m["retrieval_chance_r1"]
    assert min(m["i2t_r5"], m["t2i_r5"]) > 2.5 * m["retrieval_chance_r5"]
    assert m["similarity_matched"] - m["similarity_shuffled"] > 0.5
    assert m["val/i2t_r1"] > 4 * m["val/retrieval_chance_r1"]


def test_evaluate_tool_scores_a_contrastive_checkpoint(trained_clip, small_embedded, tmp_path):
    ckpt, _ = trained_clip
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--ckpt", str(ckpt), "--embedded",
                           str(small_embedded), "--out", str(tmp_path), "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["benchmarks"]
    captions = results["captions"]["image"]["metrics"]
    assert captions["i2t_r1"] > 3 * captions["retrieval_chance_r1"]
    flickr = results["flickr30k_retrieval"]["image"]["metrics"]
    assert flickr["i2t_r1"] > flickr["retrieval_chance_r1"] and "similarity_matched" in flickr

def test_evaluate_tool_refuses_generation_benchmarks_for_a_contrastive_checkpoint(trained_clip, small_embedded,
                                                                                  capsys):
    ckpt, _ = trained_clip
    code = _tool("evaluate").main(["--ckpt", str(ckpt), "--benchmarks", f"pope={small_embedded}/benchmarks/pope"])
    assert code == 2 and "cannot generate answers" in capsys.readouterr().err


def test_llava_stage1_from_the_clip_vit_reports_clip_similarity(trained_clip, small_embedded, tmp_path):
    """stage.init_components_from: the CLIP stage's ViT (its first layers) into LLaVA's vision
    tower; eval.clip_model: the same CLIP scores the captions the VLM generates."""
    from megavlm.config.recipe import load_recipe
    from megavlm.training.checkpoint import load_model, read_model_config
    from megavlm.training.trainer import Trainer

    ckpt, _ = trained_clip
    common = data_overrides(small_embedded) + [
        "parallel.tensor_parallel=1", f"checkpoint.dir={tmp_path}", "train.max_steps=2", "eval.max_samples=6",
        "train.eval_samples=16", f"eval.clip_model={ckpt}", "eval.caption_max_new_tokens=6"]
    recipe = load_recipe(RECIPES / "llava_debug_stage1_from_clip.yaml",
                         common + [f"stage.init_components_from={{vision: {ckpt}}}"])
    trainer = Trainer(recipe)
    clip = build_model(read_model_config(ckpt), ParallelConfig(), trainer.ctx, process_groups())
    load_model(clip, ckpt)
    llava = trainer.model.vision.state_dict()
    for key in ("position_embeddings", "encoder.layers.0.self_attention.linear_qkv.weight",
                "encoder.layers.1.mlp.linear_fc2.weight", "ln_pre.weight"):
        assert torch.equal(llava[key], clip.vision.state_dict()[key]), key
    metrics = trainer.run()
    print({k: round(v, 4) for k, v in metrics.items() if k.startswith("clip_similarity")})
    assert metrics["clip_similarity_reference"] > 0.5
    assert -1 <= metrics["clip_similarity"] <= 1 and -1 <= metrics["clip_similarity_blank"] <= 1

    wrong = load_recipe(RECIPES / "llava_debug_stage1_from_clip.yaml", common + [
        f"stage.init_components_from={{vision: {ckpt}}}", "model.vision.hidden_size=48"])
    with pytest.raises(ConfigError, match=r"stage.init_components_from.vision.*has shape \(64,\) in .* but \(48,\)"):
        Trainer(wrong)
    with pytest.raises(ConfigError, match="eval.clip_model"):
        load_recipe(RECIPES / "llava_debug_stage1_from_clip.yaml", common + ["eval.captions=null"])


@pytest.mark.parametrize("family, tower", [("llava", "clip"), ("llava", "siglip"), ("internvl", "clip"),
                                           ("internvl", "siglip-5-heads-padded")])
def test_vlm_vision_tower_from_an_hf_clip_or_siglip(family, tower):
    """stage.init_components_from_hf.vision: an HF CLIPModel / SiglipModel checkpoint (its vision
    tower) into a LLaVA or InternVL whose model.vision has the tower's shape."""
    cfg = clip_cases.variant_config(tower)
    hf_state = dict(clip_cases.hf_reference(cfg, seed=6).state_dict())
    vision = dict(vars(cfg.vision), feature_layer=-2 if family == "llava" else -1, keep_class_token=False,
                  post_norm=family == "internvl", layer_scale=None, qk_norm=False)
    overrides = [f"vision.{k}={'null' if v is None else v}" for k, v in vision.items()]
    vlm = with_overrides(flavor_config(family, "debug"), overrides)
    local = get_family(family).adapter_cls(vlm).components_to_megavlm({"vision": hf_state})
    expected = {}
    assert hf_blocks.stand_alone_clip_tower(hf_state, expected, "vision.", vlm.vision)
    assert set(local) == set(expected) and all(torch.equal(local[k], expected[k]) for k in local)
    assert torch.equal(local["vision.encoder.layers.0.mlp.linear_fc1.weight"],
                       hf_state["vision_model.encoder.layers.0.mlp.fc1.weight"])


def _tool(name: str):
    """A tools/*.py module, to call its main() in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_converter_both_ways_with_verify(single_process, tmp_path, capsys, name):
    """tools/convert_checkpoint.py: HF CLIPModel / SiglipModel -> megavlm -> HF, --verify each way
    (the image-text logits of both models), and the exported tensors are the original ones."""
    from safetensors.torch import load_file

    cfg = clip_cases.variant_config(name)
    hf = clip_cases.hf_reference(cfg, seed=8)
    hf.save_pretrained(tmp_path / "hf")
    tool = _tool("convert_checkpoint")
    for args in (["hf-to-megavlm", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")],
                 ["megavlm-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]):
        code = tool.main([*args, "--verify"])
        out = capsys.readouterr().out
        assert code == 0 and "OK" in out, out
        print(out.strip().splitlines()[-1])
    back, original = load_file(tmp_path / "back" / "model.safetensors"), hf.state_dict()
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in back)
