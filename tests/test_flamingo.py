"""Flamingo: Perceiver resampler + gated cross-attention over a frozen LLM, against HF IDEFICS,
under TP/PP, its media mask, and a short learning run on the embedded interleaved documents."""
import pytest
import torch
from safetensors.torch import save_file

from megavlm.config.model import ParallelConfig
from megavlm.config.schema import with_overrides
from megavlm.models.common.language_model import build_language_model
from megavlm.models.common.transformer_config import language_transformer_config
from megavlm.models.flamingo.fusion import media_mask
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel.init import process_groups
from megavlm.training.build import build_model, load_local_state
from tests.conftest import ROOT, run_torchrun
from tests.workers import flamingo_step

FAMILY = get_family("flamingo")


def tiny_idefics(cfg, seed: int = 0, gates: str = "ones"):
    """IDEFICS built from config. Its gates start at 0 (the image would not matter): 'ones'."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    torch.manual_seed(seed)
    hf_config = dict(FAMILY.config_to_hf(cfg), alpha_initializer=gates)
    return IdeficsForVisionText2Text(IdeficsConfig(**hf_config)).eval()


def ours_from_hf(ctx, cfg, hf):
    model = build_model(cfg, ParallelConfig(), ctx, process_groups())
    load_local_state(model, FAMILY.adapter_cls(cfg).hf_to_megavlm(dict(hf.state_dict())))
    return model.eval()


@pytest.mark.parametrize("variant", ["debug", "vector-gates+added-vocab", "interval-2+all-previous"])
def test_logits_match_idefics_both_ways(single_process, variant):
    overrides = {"debug": [],
                 "vector-gates+added-vocab": ["flamingo.gate_type=vector", "flamingo.hf_additional_vocab=2"],
                 "interval-2+all-previous": ["language.num_layers=4", "flamingo.cross_attention_interval=2",
                                             "flamingo.media_attention=all_previous"]}[variant]
    cfg = with_overrides(flavor_config("flamingo", "debug"), overrides)
    hf = tiny_idefics(cfg, seed=3)
    model = ours_from_hf(single_process, cfg, hf)
    batch = flamingo_step.batches(micro_batch_size=4)[0]
    with torch.no_grad():
        ours = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])
        ref = hf(input_ids=batch["input_ids"], **FAMILY.hf_inputs(cfg, batch)).logits
        blank = model(batch["input_ids"], images=torch.zeros_like(batch["images"]),
                      images_per_sample=batch["images_per_sample"])
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours - blank).abs().max().item() > 1e-3   # the images really enter the logits

    # megavlm -> HF: identical tensors; the converted-back model gives the same logits
    adapter = FAMILY.adapter_cls(cfg)
    exported = adapter.megavlm_to_hf({(0, 0): model.state_dict()})
    state = hf.state_dict()
    assert sorted(set(state) - set(exported)) == adapter.unused_hf_keys(dict(state)) == \
        ["model.vision_model.post_layernorm.bias", "model.vision_model.post_layernorm.weight"]
    assert all(torch.equal(exported[k], state[k]) for k in exported)
    hf_config, complete = FAMILY.complete_for_hf(cfg, exported)
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    back = IdeficsForVisionText2Text(IdeficsConfig(**hf_config)).eval()
    back.load_state_dict(complete, strict=True)
    with torch.no_grad():
        again = back(input_ids=batch["input_ids"], **FAMILY.hf_inputs(cfg, batch)).logits
    assert (ours - again).abs().max().item() < 1e-4
    assert FAMILY.config_from_hf(hf_config, cfg.flavor) == cfg


def test_closed_gates_give_the_frozen_llm_exactly(single_process):
    """Gates at their initial 0: the same logits as the LLM alone, loaded from its own checkpoint
    (the fusion layers keep the LLM's keys)."""
    cfg = flavor_config("flamingo", "debug")
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), single_process, process_groups()).eval()
    llm = build_language_model(cfg.language, language_transformer_config(cfg, ParallelConfig()), "local").eval()
    llm_state = {k: v for k, v in model.language_model.state_dict().items() if ".gated_xattn." not in k}
    missing, unexpected = llm.load_state_dict(llm_state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    batch = flamingo_step.batches(micro_batch_size=4)[0]
    ids = batch["input_ids"]
    with torch.no_grad():
        fused = model(ids, images=batch["images"], images_per_sample=batch["images_per_sample"])
        plain = llm(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)
        for layer in model.language_model.decoder.layers:
            layer.gated_xattn.alpha_dense.fill_(0.5)
        opened = model(ids, images=batch["images"], images_per_sample=batch["images_per_sample"])
    assert torch.equal(fused, plain)
    assert not torch.equal(opened, plain)


def test_media_mask_for_zero_one_and_three_images():
    s, latents = 8, 2
    ids = torch.full((3, s), 9)
    ids[1, 2] = 3                       # one image at position 2
    ids[2, [0, 3, 6]] = 3               # three images
    per_sample = torch.tensor([0, 1, 3])
    blocked = media_mask(ids, per_sample, 3, 3, latents)
    assert blocked.shape == (3, 1, s, 3 * latents)
    seen = (~blocked[:, 0]).view(3, s, 3, latents)
    assert torch.equal(seen.all(-1), seen.any(-1))        # a token sees all latents of an image or none
    image_seen = seen.any(-1)                               # [b, s, images]
    # no image: nothing anywhere
    assert not image_seen[0].any()
    # one image: tokens before the marker see nothing, from the marker on image 0
    assert not image_seen[1, :2].any() and image_seen[1, 2:, 0].all() and not image_seen[1, :, 1:].any()
    # three images: each token sees only the most recent marker at or before it
    expected = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    assert torch.equal(image_seen[2].float().argmax(-1), expected) and torch.equal(image_seen[2].sum(-1), torch.ones(s, dtype=torch.long))
    # the option: all previous images
    previous = (~media_mask(ids, per_sample, 3, 3, 1, all_previous=True)[:, 0])
    assert torch.equal(previous[2].sum(-1), torch.tensor([1, 1, 1, 2, 2, 2, 3, 3]))
    # packed samples: a token never sees an image of the sample packed before it
    packed = torch.tensor([[3, 9, 9, 9, 3, 9, 9, 9]])
    cu = torch.tensor([0, 2, 8], dtype=torch.int32)
    seen = ~media_mask(packed, torch.tensor([2]), 3, 2, 1, all_previous=True, cu_seqlens=cu)[0, 0]
    assert torch.equal(seen.long(), torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0], [0, 1], [0, 1], [0, 1], [0, 1]]))
    with pytest.raises(ValueError, match="do not match the images"):
        media_mask(ids, torch.tensor([0, 2, 3]), 3, 3, latents)


def test_text_before_the_first_image_never_sees_an_image(single_process):
    cfg = flamingo_step.CFG
    model = ours_from_hf(single_process, cfg, tiny_idefics(cfg, seed=5))
    batch = flamingo_step.batches(micro_batch_size=4)[0]
    other = torch.randn_like(batch["images"])
    with torch.no_grad():
        a = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])
        b = model(batch["input_ids"], images=other, images_per_sample=batch["images_per_sample"])
    first = {1: 5, 3: 2}   # rows with images: position of the first marker (flamingo_step.MARKERS)
    for row, pos in first.items():
        assert torch.equal(a[row, :pos], b[row, :pos])
        assert (a[row, pos:] - b[row, pos:]).abs().max() > 1e-3
    assert torch.equal(a[0], b[0])                          # the text-only sample


def test_frames_of_one_media_item_share_the_latents(single_process):
    cfg = with_overrides(flavor_config("flamingo", "debug"), ["flamingo.max_frames=3"])
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), single_process, process_groups()).eval()
    frames = torch.randn(2, 3, 3, 56, 56)                    # 2 media items of 3 frames
    with torch.no_grad():
        model.resampler.frame_embeddings.normal_()
        latents = model.media_latents(frames, torch.tensor([2]), 1)
        swapped = model.media_latents(frames[:, [1, 0, 2]], torch.tensor([2]), 1)
        model.resampler.frame_embeddings.zero_()
        unordered = [model.media_latents(f, torch.tensor([2]), 1) for f in (frames, frames[:, [1, 0, 2]])]
    assert latents.shape == (1, 2, 8, 64)
    # without frame embeddings the frames are a set (order changes only the summation order);
    # with them the order matters
    unordered_diff = (unordered[0] - unordered[1]).abs().max()
    assert (latents - swapped).abs().max() > 100 * unordered_diff
    with pytest.raises(ValueError, match="max_frames"):
        model.media_latents(torch.randn(1, 4, 3, 56, 56), torch.tensor([1]), 1)
    with pytest.raises(ValueError, match="max_frames"):
        FAMILY.config_to_hf(cfg)


@pytest.mark.multiproc
def test_tp2_and_pp2_match_one_process(single_process, tmp_path):
    cfg = flamingo_step.CFG
    hf = {k: v.contiguous() for k, v in tiny_idefics(cfg, seed=7).state_dict().items()}
    save_file(hf, tmp_path / "init.safetensors")
    run_torchrun(ROOT / "tests" / "workers" / "flamingo_step.py", 2,
                 ["--init", str(tmp_path / "init.safetensors"), "--out", str(tmp_path)])
    flamingo_step.run("ref", ParallelConfig(), hf, str(tmp_path))
    ref = torch.load(tmp_path / "ref.pt")
    assert ref["tokens"] > 0
    trained = {k for k, g in ref["grads"].items() if g.abs().sum() > 0}
    assert any(k.startswith("resampler.") for k in trained) and any(".gated_xattn." in k for k in trained)
    assert not any(k.startswith(("vision.", "language_model.embedding")) for k in ref["grads"])
    for layout in ("tp2", "pp2"):
        got = torch.load(tmp_path / f"{layout}.pt")
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6), layout
        assert set(got["grads"]) == set(ref["grads"]), layout
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{layout} {name}: {m}")
    tp2 = torch.load(tmp_path / "tp2.pt")
    assert (tp2["logits"] - ref["logits"]).abs().max().item() < 1e-5
    # the PP=2 and TP=2 dist checkpoints load into one process with every tensor in place (TP=2:
    # the resampler's parallel linears sit in a ModuleList, which must not save them as replicated)
    from megavlm.training.checkpoint import load_model

    for ckpt in ("ckpt_pp2", "ckpt_tp2"):
        model = build_model(cfg, ParallelConfig(), single_process, process_groups())
        load_model(model, tmp_path / ckpt)
        exported = FAMILY.adapter_cls(cfg).megavlm_to_hf({(0, 0): model.state_dict()})
        assert all(torch.equal(exported[k], hf[k]) for k in exported), ckpt


@pytest.mark.slow
def test_short_pretraining_learns_to_use_the_image(single_process, small_embedded, tmp_path):
    """Step 0 (text LM, blocks closed) then a short multimodal pre-training with the LLM frozen:
    few-shot caption accuracy with the real query image is clearly above a blank one."""
    from megavlm.config.recipe import load_recipe
    from megavlm.training.trainer import Trainer

    recipes, d = ROOT / "examples" / "recipes" / "flamingo", small_embedded
    common = ["data.embedded=null", f"data.train={d}/interleaved_train.jsonl",
              f"data.validation={d}/interleaved_val.jsonl", f"data.tokenizer={d}/tokenizer.model",
              f"eval.few_shot_captions={d}/captions_test.jsonl", "eval.max_samples=48", "eval.few_shot=[0,2]",
              "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", "logging.progress=false",
              "train.log_interval=1000", "train.eval_samples=32"]
    lm = Trainer(load_recipe(recipes / "flamingo_debug_lm.yaml", common + [
        f"checkpoint.dir={tmp_path}/lm", "train.max_steps=60"])).run()
    assert lm["caption_0shot_token_accuracy"] == lm["caption_0shot_token_accuracy_blank"]   # gates closed
    trainer = Trainer(load_recipe(recipes / "flamingo_debug_pretrain.yaml", common + [
        f"checkpoint.dir={tmp_path}/pretrain", f"stage.init_from={tmp_path}/lm", "train.max_steps=100"]))
    frozen_llm = {k: v.clone() for k, v in trainer.model.language_model.state_dict().items()
                  if torch.is_tensor(v) and ".gated_xattn." not in k}
    metrics = trainer.run()
    print(lm, metrics)
    for shots in (0, 2):
        real, blank = (metrics[f"caption_{shots}shot_token_accuracy{s}"] for s in ("", "_blank"))
        assert real > blank + 0.03, (shots, real, blank)
    after = trainer.model.language_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_llm.items())     # the LLM stayed frozen
