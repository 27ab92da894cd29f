"""Fuyu (raw patches, Persimmon decoder) and PaliGemma (SigLIP + Gemma, prefix-LM):

* HF parity both ways, fp32: HF -> megavlm gives HF's logits, megavlm -> HF gives the original
  tensors and a model with the same logits; TP=1 here, TP=2 in the one torchrun launch below.
  Fuyu also on real images through the data pipeline: sizes that are not multiples of the patch
  size, two sizes in one batch; its patches and placeholder ids equal HF's Fuyu processor's.
* the prefix-LM mask by perturbation; packed rows keep each sample's prefix block;
* PP=2 training step == one process (same launch); generation with the KV cache == recomputation,
  the prefix-LM prompt bidirectional there too;
* one end-to-end debug stage per family on the embedded data beats the blank-image baseline.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from megavlm.config.model import ParallelConfig
from megavlm.config.schema import ConfigError, with_overrides
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel.init import process_groups
from megavlm.training.build import build_model, load_local_state
from tests import fuyu_paligemma_cases as cases
from tests import hf_variants
from tests.conftest import ROOT, run_torchrun

TOLERANCE = 1e-4


def _converted(ctx, cfg, hf):
    model = build_model(cfg, ParallelConfig(), ctx, process_groups()).eval()
    load_local_state(model, get_family(cfg.family).adapter_cls(cfg).hf_to_megavlm(dict(hf.state_dict())))
    return model


def _logits(model, cfg, batch, **extra):
    with torch.no_grad():
        out = model(batch["input_ids"], **{**cases.model_inputs(batch), **extra})
    return out[..., : cfg.language.vocab_size].float()


@pytest.mark.parametrize("name", cases.CASES)
def test_hf_parity_both_ways(single_process, name):
    cfg = cases.case_config(name)
    family = get_family(cfg.family)
    hf = cases.hf_reference(cfg)
    assert family.config_from_hf(hf.config.to_dict(), "debug") == cfg
    model = _converted(single_process, cfg, hf)
    reference = dict(hf.state_dict())
    exported = family.adapter_cls(cfg).megavlm_to_hf({(0, 0): model.state_dict()})
    assert not hf_variants.export_mismatches(exported, reference)
    back = hf_variants.exported_hf_model(cfg, exported, reference)
    for batch_name, batch in cases.batches_for(name).items():
        ref = cases.hf_logits(cfg, hf, batch)
        diff = (_logits(model, cfg, batch) - ref).abs().max().item()
        again = (cases.hf_logits(cfg, back, batch) - ref).abs().max().item()
        print(f"{name}/{batch_name} TP=1: HF -> megavlm max |logits diff| {diff:.2e}, megavlm -> HF {again:.2e}")
        assert diff < TOLERANCE and again < TOLERANCE
    if cfg.prefix_lm:  # the parity above depends on the prefix mask: a causal one is far off
        batch = cases.synthetic_batch(cfg)
        causal = _logits(model, cfg, batch, prefix_lengths=torch.zeros_like(batch["prefix_lengths"]))
        assert (causal - cases.hf_logits(cfg, hf, batch)).abs().max().item() > 100 * TOLERANCE


LEGACY = {"fuyu": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                   ("model.vision_embed_tokens.", "vision_embed_tokens.")],
          "paligemma": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                        ("model.vision_tower.", "vision_tower.vision_model."),
                        ("model.multi_modal_projector.", "multi_modal_projector.")]}


@pytest.mark.parametrize("family", LEGACY)
def test_hub_checkpoint_names_are_accepted(family):
    """The released checkpoints (adept/fuyu-8b, google/paligemma-3b-pt-224) use transformers 4.x names."""
    cfg = flavor_config(family, "debug")
    state = dict(cases.hf_reference(cfg).state_dict())
    legacy = {}
    for key, value in state.items():
        for new, old in LEGACY[family]:
            if key.startswith(new):
                key = old + key[len(new):]
                break
        legacy[key] = value
    adapter = get_family(family).adapter_cls(cfg)
    ours, theirs = adapter.hf_to_full(legacy), adapter.hf_to_full(state)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert adapter.unused_hf_keys(legacy) == []


def test_published_flavors_round_trip_hf_configs():
    for family, flavor in (("fuyu", "fuyu-8b"), ("paligemma", "paligemma-3b-224")):
        cfg = flavor_config(family, flavor)
        assert get_family(family).config_from_hf(get_family(family).config_to_hf(cfg), flavor) == cfg
    gemma = flavor_config("paligemma", "paligemma-3b-224").language
    assert (gemma.head_dim, gemma.query_groups, gemma.tie_embeddings) == (256, 1, True)
    assert flavor_config("fuyu", "fuyu-8b").patches.max_patches == 36 * 64


def test_fuyu_patches_and_placeholders_equal_hf_processor():
    """Scaled down to fit (or not), padded to whole patches, cut in raster order with a newline
    per row: the data pipeline's patches and ids are HF FuyuImageProcessor's."""
    from PIL import Image
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    from megavlm.data.augment import ImageAug
    from megavlm.data.build import encoder_for, image_backend
    from megavlm.data.patches import PatchGridPlanner

    cfg = flavor_config("fuyu", "debug")
    p = cfg.patches
    proc = FuyuImageProcessorPil(size={"height": p.max_height, "width": p.max_width},
                                 patch_size={"height": p.patch_size, "width": p.patch_size})
    rng = np.random.default_rng(0)
    grids = set()
    for width, height in ((70, 45), (150, 100), (112, 112), (33, 90)):
        image = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        aug, grid = PatchGridPlanner(p).plan(buf.getvalue(), ImageAug(), "s", "test")
        ours = image_backend(cfg).decode([(buf.getvalue(), aug, "s", "test")])[0]
        hf = proc(images=[image], return_tensors="pt")
        theirs = proc.preprocess_with_tokenizer_info(hf["images"], torch.ones(1, 1, 1), hf["image_unpadded_heights"],
                                                     hf["image_unpadded_widths"], cfg.image_token_id,
                                                     p.newline_token_id, True)
        torch.testing.assert_close(ours, theirs["image_patches"][0][0], rtol=0, atol=1e-6)
        encoder = encoder_for(cfg, None, "plain")
        assert encoder.image_ids(grid) == theirs["image_input_ids"][0][0].tolist()
        grids.add((grid.rows, grid.cols))
    assert grids == {(3, 5), (4, 6), (5, 5), (5, 2)}   # 45 and 70 px: partial last patches, padded


# ---- prefix-LM ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paligemma(single_process):
    cfg = cases.case_config("paligemma")
    return cfg, _converted(single_process, cfg, cases.hf_reference(cfg, seed=4))


def test_prefix_lm_mask_by_perturbation(paligemma):
    """A prefix token's output depends on later prefix tokens; no output depends on a later
    answer token (exactly: the same bits)."""
    cfg, model = paligemma
    g = torch.Generator().manual_seed(1)
    text = torch.randint(5, 700, (13,), generator=g)          # 5 prompt tokens, then 8 answer tokens
    prefix = cfg.image_tokens + 5                             # PaliGemma's layout: image, prompt | answer
    batch = {"input_ids": torch.cat([torch.full((cfg.image_tokens,), cfg.image_token_id), text])[None],
             "images": torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g),
             "images_per_sample": torch.tensor([1]), "prefix_lengths": torch.tensor([prefix])}
    base = _logits(model, cfg, batch)[0]

    def moved(position: int) -> torch.Tensor:
        ids = batch["input_ids"].clone()
        ids[0, position] = 5 + (int(ids[0, position]) + 1) % 500
        return (_logits(model, cfg, dict(batch, input_ids=ids))[0] - base).abs().amax(-1)

    last_prompt = moved(prefix - 1)
    assert (last_prompt[: prefix - 1] > 1e-4).all()    # every earlier prefix position, image ones too, sees it
    for position in (prefix, prefix + 4):               # answer tokens: nothing before them moves
        change = moved(position)
        assert torch.equal(change[:position], torch.zeros(position)) and change[position] > 1e-4


def test_packed_rows_keep_each_samples_prefix(paligemma):
    """Two samples packed in one row give the logits each gives alone in a padded row."""
    cfg, model = paligemma
    packed = cases.pp_batches(cfg, packed=True)[0]
    cu = packed["packed_seq_params"].cu_seqlens_q.tolist()
    out = _logits(model, cfg, packed)[0]
    start_image = 0
    for i, (a, b) in enumerate(zip(cu[:2], cu[1:3])):
        n_images = int((packed["input_ids"][0, a:b] == cfg.image_token_id).sum()) // cfg.image_tokens
        alone = {"input_ids": packed["input_ids"][:, a:b],
                 "images": packed["images"][start_image:start_image + n_images],
                 "images_per_sample": torch.tensor([n_images]), "prefix_lengths": packed["prefix_lengths"][i:i + 1]}
        start_image += n_images
        torch.testing.assert_close(out[a:b], _logits(model, cfg, alone)[0], rtol=1e-5, atol=1e-5)
    # prompt + image, twice, then the padding tail (causal); a causal reading of the row differs
    assert packed["prefix_lengths"].tolist() == [4 + cfg.image_tokens] * 2 + [0] and len(cu) == 4
    causal = _logits(model, cfg, packed, prefix_lengths=torch.zeros(3, dtype=torch.long))[0]
    assert (causal[: cu[2]] - out[: cu[2]]).abs().max() > 1e-3


def test_prefix_lm_needs_prefix_lengths(paligemma):
    cfg, model = paligemma
    batch = cases.synthetic_batch(cfg)
    with pytest.raises(ValueError, match="prefix_lengths"):
        model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])


# ---- generation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", cases.TP2_CASES)
def test_generation_kv_cache_equals_recomputation(single_process, name):
    cfg = cases.case_config(name)
    model = _converted(single_process, cfg, cases.hf_reference(cfg, seed=6))
    cached = cases.generate_case(model, cfg, cache=True)
    assert cached == cases.generate_case(model, cfg, cache=False)
    assert [cases.generate_case(model, cfg, cache=True, rows=[r])[0] for r in range(len(cached))] == cached
    if cfg.prefix_lm:   # the first answer token comes from a prompt read in both directions
        prompts, images, per_sample = cases.generation_case(cfg)
        row = prompts[1]
        batch = {"input_ids": torch.tensor([row]), "images": images[per_sample[0]:sum(per_sample[:2])],
                 "images_per_sample": torch.tensor([per_sample[1]])}
        prefix = _logits(model, cfg, batch, prefix_lengths=torch.tensor([len(row)]))[0, -1]
        causal = _logits(model, cfg, batch, prefix_lengths=torch.tensor([0]))[0, -1]
        assert (prefix - causal).abs().max() > 1e-3
        assert cached[1][0] == int(prefix.argmax())


# ---- TP=2, PP=2: one launch -----------------------------------------------------------------------
@pytest.mark.multiproc
def test_tp2_parity_and_pp2_step_one_launch(single_process, tmp_path):
    """TP=2: both families converted from HF straight into TP shards give HF's logits (Fuyu also
    on real images of two sizes), and the gathered shards export to the original tensors and to
    a model with HF's logits; with sequence parallelism too; the TP=2 checkpoint loads at TP=1.
    PP=2: a training step's loss and every gradient equal one process's (Fuyu through the fused
    linear cross-entropy kernel, PaliGemma on packed prefix-LM rows), and greedy generation gives
    one process's tokens, with and without the KV cache."""
    from tests.workers import fuyu_paligemma_layouts as worker

    from megavlm.training.checkpoint import load_model

    run_torchrun(ROOT / "tests" / "workers" / "fuyu_paligemma_layouts.py", 2, ["--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    for layout in ("tp2", "tp2_sp"):
        for name in cases.TP2_CASES:
            result = results[layout][name]
            assert result.pop("export_mismatches") == [], name
            assert set(result) <= set(cases.batches_for(name)) and "synthetic" in result, (layout, name)
            for batch_name, diffs in result.items():
                print(f"{name}/{batch_name} {layout}: HF -> megavlm {diffs['hf_to_megavlm']:.2e}, "
                      f"megavlm -> HF {diffs['megavlm_to_hf']:.2e}")
                assert diffs["hf_to_megavlm"] < TOLERANCE and diffs["megavlm_to_hf"] < TOLERANCE, (layout, name)
    assert "images" in results["tp2"]["fuyu"]
    for name in cases.TP2_CASES:   # the TP=2 dist checkpoint loads at TP=1: the HF tensors again
        cfg = cases.case_config(name)
        model = build_model(cfg, ParallelConfig(), single_process, process_groups())
        load_model(model, tmp_path / f"{name}_tp2_ckpt")
        exported = get_family(cfg.family).adapter_cls(cfg).megavlm_to_hf({(0, 0): model.state_dict()})
        assert not hf_variants.export_mismatches(exported, dict(cases.hf_reference(cfg).state_dict())), name
    for name, (_, packed) in worker.PP_RUNS.items():
        ref = worker.pp_step(name, single_process, process_groups(), ParallelConfig(), (), packed)
        pp2 = torch.load(tmp_path / f"pp2_{name}.pt")
        assert pp2["tokens"] == ref["tokens"] > 0 and pp2["loss"] == pytest.approx(ref["loss"], rel=1e-6), name
        tied = {"language_model.output_layer.weight"} if cases.case_config(name).language.tie_embeddings else set()
        assert set(pp2["grads"]) - tied == set(ref["grads"]), name
        for key, grad in ref["grads"].items():
            assert grad.abs().sum() > 0, (name, key)
            torch.testing.assert_close(pp2["grads"][key], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(),
                                       msg=lambda m: f"{name} {key}: {m}")
    for name in cases.TP2_CASES:
        cfg = cases.case_config(name)
        one = cases.generate_case(_converted(single_process, cfg, cases.hf_reference(cfg, seed=6)), cfg, cache=True)
        assert results["pp2_generation"][name] == {"cached": one, "uncached": one}, name


# ---- configuration errors ---------------------------------------------------------------------
def test_bad_configurations_name_the_key(single_process):
    from megavlm.config.recipe import load_recipe

    fuyu = ROOT / "examples" / "recipes" / "fuyu" / "fuyu_debug.yaml"
    with pytest.raises(ConfigError, match="patches"):
        load_recipe(fuyu, ["model.vision={}"])
    with pytest.raises(ConfigError, match="data.max_tiles"):
        load_recipe(fuyu, ["data.max_tiles=4"])
    with pytest.raises(ConfigError, match="prefix_lm"):
        with_overrides(flavor_config("flamingo", "debug"), ["prefix_lm=true"])
    with pytest.raises(ConfigError, match="num_kv_heads"):   # PaliGemma-3B's one KV head does not split over TP
        load_recipe(ROOT / "examples" / "recipes" / "paligemma" / "paligemma_debug.yaml",
                    ["model.language.num_kv_heads=1"])
    llava = build_model(flavor_config("llava", "debug"), ParallelConfig(), single_process, process_groups())
    with pytest.raises(ValueError, match="causal model"):
        llava(torch.zeros(1, 8, dtype=torch.long), prefix_lengths=torch.tensor([3]))
    fuyu = build_model(flavor_config("fuyu", "debug"), ParallelConfig(), single_process, process_groups())
    with pytest.raises(ValueError, match="patches"):   # ViT-shaped pixels given to a patch-input model
        fuyu(torch.full((1, 8), 3), images=torch.zeros(8, 3, 16, 16), images_per_sample=torch.tensor([8]))


# ---- end to end on the embedded data -------------------------------------------------------------
E2E_STEPS = {"fuyu": 60, "paligemma": 150}


@pytest.mark.slow
@pytest.mark.parametrize("family", E2E_STEPS)
def test_end_to_end_debug_stage_beats_blank_image(single_process, small_embedded, tmp_path, family):
    """The family's one-stage recipe, shortened, at TP=1 in this process: held-out caption token
    accuracy with the image above the same model's with a blank image of the same layout. Then
    the evaluation suite's generating parts on the trained model: VQA exact match and a benchmark
    (greedy, KV cache; the prefix-LM prompt read both ways)."""
    from megavlm.config.recipe import BenchmarkConfig, load_recipe
    from megavlm.data.build import open_eval_source
    from megavlm.eval.benchmark_runner import load_benchmarks, run_benchmarks
    from megavlm.eval.vlm_eval import vqa_exact_match
    from megavlm.training.stages import set_train_mode
    from megavlm.training.trainer import Trainer
    from tests.conftest import data_overrides

    recipe = load_recipe(ROOT / "examples" / "recipes" / family / f"{family}_debug.yaml",
                         data_overrides(small_embedded) + [
                             "parallel.tensor_parallel=1", f"train.max_steps={E2E_STEPS[family]}", "checkpoint.dir=",
                             "eval.max_samples=48", "train.eval_samples=48", "logging.tensorboard=false"])
    trainer = Trainer(recipe)
    metrics = trainer.run()
    image, blank = metrics["caption_token_accuracy"], metrics["caption_token_accuracy_blank"]
    print(f"{family}: caption token accuracy {image:.4f} with the image, {blank:.4f} with a blank image")
    assert image > blank + 0.03

    ctx = trainer._eval_context()
    for chunk in ctx.model_chunks:   # as evaluate_vlm does
        set_train_mode(chunk, False)
    vqa = vqa_exact_match(ctx, open_eval_source(str(small_embedded / "conversations_test.json"), "conversations", None,
                                                "eval.vqa"), "plain", 8, 4, blank=False)
    assert vqa["samples"] == 8 and 0.0 <= vqa["exact_match"] <= 1.0
    pope = load_benchmarks([BenchmarkConfig(name="pope", path=str(small_embedded / "benchmarks" / "pope"),
                                            max_samples=2)])
    result = run_benchmarks(ctx, pope, "plain")["pope"]
    assert result["image"]["samples"] > 0 and result["blank"]["samples"] == result["image"]["samples"]


def test_tokenizer_image_piece_names_the_placeholder(small_embedded):
    """data.image_piece: a tokenizer whose image placeholder is its own piece (Fuyu-8B's |SPEAKER|)."""
    from megavlm.data.tokenizer import load_tokenizer

    path = small_embedded / "tokenizer.model"
    tok = load_tokenizer(path, image_piece="[DEC]")
    assert tok.image_token_id == tok.token_id("[DEC]") != load_tokenizer(path).image_token_id
    with pytest.raises(ValueError, match="SPEAKER"):
        load_tokenizer(path, image_piece="|SPEAKER|")
