"""BLIP-2: HF parity (generation and retrieval heads), the three stage-1 objectives under TP and
DP, the ITG mask, and a short stage 1 -> stage 2 run that learns retrieval."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from megavlm.config.model import ParallelConfig
from megavlm.config.schema import with_overrides
from megavlm.data.synthetic import synthetic_batches
from megavlm.losses.blip2 import itg_mask, query_mask
from megavlm.models.registry import flavor_config, get_family
from megavlm.parallel.init import process_groups
from megavlm.training.build import build_model, load_local_state
from tests.conftest import ROOT, run_torchrun

FAMILY = get_family("blip2")


def _perturbed(model):
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _hf(cfg, cls, seed=0):
    torch.manual_seed(seed)
    return _perturbed(cls(transformers.Blip2Config.from_dict(FAMILY.config_to_hf(cfg))))


def _ours(ctx, cfg, hf_state):
    model = build_model(cfg, ParallelConfig(), ctx, process_groups()).eval()
    adapter = FAMILY.adapter_cls(cfg)
    local = adapter.hf_to_megavlm(hf_state)
    missing, unexpected = model.load_state_dict(local, strict=False)
    assert not unexpected
    return model, adapter, [k for k in missing if not k.endswith("_extra_state")]


@pytest.mark.parametrize("flavor", ["debug", "debug-llama"])
def test_generation_logits_match_hf_and_export_is_identical(single_process, flavor):
    cfg = flavor_config("blip2", flavor)
    hf = _hf(cfg, transformers.Blip2ForConditionalGeneration)
    model, adapter, missing = _ours(single_process, cfg, hf.state_dict())
    assert not missing
    batch = synthetic_batches(cfg, 2, 40, micro_batch_size=2, seed=1, image_pattern=(1, 1))[0]
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], pixel_values=batch["images"]).logits
        out = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])
    assert (out - ref).abs().max() < 1e-4
    exported = adapter.megavlm_to_hf({(0, 0): {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}})
    original = hf.state_dict()
    positions = "language_model.model.decoder.embed_positions.weight"
    for key, tensor in exported.items():
        if key == positions:  # OPT's first two position rows are an offset no position ever reads
            tensor, original_tensor = tensor[2:], original[key][2:]
        else:
            original_tensor = original[key]
        assert torch.equal(tensor, original_tensor), key
    assert set(original) - set(exported) <= {"language_model.lm_head.weight"}  # tied to the embeddings
    back = FAMILY.config_from_hf(hf.config.to_dict(), flavor)
    assert (back.vision, back.language, back.qformer.num_query_tokens) == (cfg.vision, cfg.language, 8)


def test_itm_and_itc_heads_match_hf_retrieval(single_process):
    cfg = with_overrides(flavor_config("blip2", "debug"), ["head=qformer"])
    hf = _hf(cfg, transformers.Blip2ForImageTextRetrieval)
    model, _, missing = _ours(single_process, cfg, hf.state_dict())
    assert {k.split(".")[0] for k in missing} == {"heads", "itg_bias", "temp"}  # ITG head + temperature: not in HF
    g = torch.Generator().manual_seed(2)
    images, ids = torch.randn(3, 3, 56, 56, generator=g), torch.randint(8, 200, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        ref_itm = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_image_text_matching_head=True)
        ref_itc = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_image_text_matching_head=False)
        vit = model.image_features(images)
        itm = model.heads["itm"](model.qformer(image=vit, text_ids=ids, mask=query_mask(8, mask))[:, :8]).mean(1)
        queries = model.qformer(image=vit)
        text = model.qformer(text_ids=ids, mask=query_mask(0, mask), use_queries=False)
        img = F.normalize(model.heads["vision_projection"](queries), dim=-1)
        txt = F.normalize(model.heads["text_projection"](text[:, 0]), dim=-1)
        itc = torch.einsum("bqe,ne->bnq", img, txt).amax(-1)
    assert (itm - ref_itm.logits_per_image).abs().max() < 1e-4
    assert (itc - ref_itc.logits_per_image).abs().max() < 1e-4


def test_itg_mask_pattern():
    text_mask = torch.tensor([[1, 1, 1, 0]])
    allowed = ~itg_mask(2, text_mask)[0, 0]
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],   # queries see queries only
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],   # text sees all queries and itself / earlier text
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],   # the padding position itself is never attended to (its output is unused)
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


@pytest.mark.multiproc
def test_losses_tp2_and_itc_dp2_match_one_process(single_process, tmp_path):
    from tests.workers import blip2_step

    model = build_model(blip2_step.CFG, ParallelConfig(), single_process, process_groups())
    with torch.no_grad():
        model.itg_bias.normal_(0, 0.1)
    adapter = FAMILY.adapter_cls(blip2_step.CFG)
    full = adapter.plan.unshard({(0, 0): {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}})
    save_file({k: v.contiguous() for k, v in full.items()}, tmp_path / "init.safetensors")
    run_torchrun(ROOT / "tests" / "workers" / "blip2_step.py", 2,
                 ["--init", str(tmp_path / "init.safetensors"), "--out", str(tmp_path)])
    for objective in ("itc", "itm", "itg"):
        weights = {k: float(k == objective) for k in ("itc", "itm", "itg")}
        blip2_step.run(f"tp1_{objective}", weights, ParallelConfig(), full, str(tmp_path))
    checks = [("tp2_itc", "tp1_itc"), ("tp2_itm", "tp1_itm"), ("tp2_itg", "tp1_itg"), ("dp2_itc", "tp1_itc")]
    for got_name, ref_name in checks:
        got, ref = (torch.load(tmp_path / f"{n}.pt") for n in (got_name, ref_name))
        objective = ref_name.split("_")[1]
        assert got["losses"][objective] == pytest.approx(ref["losses"][objective], rel=1e-5), got_name
        assert set(got["grads"]) == set(ref["grads"])
        moved = [k for k, g in ref["grads"].items() if g.abs().sum() > 0]
        assert moved, got_name
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{got_name} {name}: {m}")


@pytest.mark.slow
def test_short_stage1_learns_retrieval_and_stage2_starts_from_it(single_process, small_embedded, tmp_path):
    from megavlm.config.recipe import load_recipe
    from megavlm.training.trainer import Trainer
    from tests.conftest import data_overrides

    recipes = ROOT / "examples" / "recipes" / "blip2"
    common = data_overrides(small_embedded) + ["parallel.tensor_parallel=1", "train.eval_samples=32",
                                               "train.log_interval=1000"]
    stage1 = load_recipe(recipes / "blip2_debug_stage1.yaml", common + [
        f"checkpoint.dir={tmp_path}/stage1", "train.max_steps=200", "eval.max_samples=48"])
    metrics = Trainer(stage1).run()
    print(metrics)
    chance = metrics["retrieval_chance_r1"]
    best = max(metrics[k] for k in ("i2t_r1_itc", "t2i_r1_itc", "i2t_r1_itm", "t2i_r1_itm"))
    assert best > 3 * chance and metrics["val/itc"] < 2.5  # ln(32) = 3.47 is chance for ITC
    stage2 = load_recipe(recipes / "blip2_debug_stage2.yaml", common + [
        f"checkpoint.dir={tmp_path}/stage2", f"stage.init_from={tmp_path}/stage1", "train.max_steps=2",
        "eval.max_samples=16"])
    trainer = Trainer(stage2)  # its Q-Former starts from stage 1 (the projection and LLM start fresh)
    assert torch.equal(trainer.model.qformer.query_tokens, _stage1_query_tokens(tmp_path / "stage1", single_process))
    trainer.run()


def _stage1_query_tokens(path, ctx):
    from megavlm.training.checkpoint import load_model

    cfg = with_overrides(flavor_config("blip2", "debug"), ["head=qformer"])
    model = build_model(cfg, ParallelConfig(), ctx, process_groups())
    load_model(model, path)
    return model.qformer.query_tokens


def test_converter_round_trips_a_retrieval_checkpoint(tmp_path):
    import subprocess
    import sys

    cfg = with_overrides(flavor_config("blip2", "debug"), ["head=qformer"])
    _hf(cfg, transformers.Blip2ForImageTextRetrieval).save_pretrained(tmp_path / "hf")
    tool = ROOT / "tools" / "convert_checkpoint.py"
    for args in (["hf-to-megavlm", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")],
                 ["megavlm-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]):
        proc = subprocess.run([sys.executable, str(tool), *args, "--verify"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]
