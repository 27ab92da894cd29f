"""InternVL: InternViT (QK-norm, LayerScale) + pixel-shuffle MLP + Qwen2, against HF
InternVLForConditionalGeneration built from config; the tile plan; the pixel shuffle against
HF's; tensor parallelism with the ViT trainable; the three stages learning on the embedded data."""
from __future__ import annotations

import pytest
import torch

from megavlm.config.model import ParallelConfig
from megavlm.config.schema import with_overrides
from megavlm.data.synthetic import synthetic_batches
from megavlm.models.internvl.state_dict_adapter import InternVLStateDictAdapter, config_from_hf, config_to_hf
from megavlm.models.registry import flavor_config
from megavlm.parallel.init import process_groups
from megavlm.training.build import build_model, load_local_state

VARIANTS = {
    "debug": [],                                      # QK-norm, LayerNorm, tied Qwen2
    "rmsnorm-untied-llama": ["vision.qk_norm=false", "vision.normalization=RMSNorm", "language.qkv_bias=false",
                             "language.tie_embeddings=false", "language.num_kv_heads=4", "vision.feature_layer=1"],
}


def tiny_hf_internvl(cfg, seed: int = 0):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(InternVLConfig.from_dict(config_to_hf(cfg))).eval()
    with torch.no_grad():  # HF starts norms at 1, biases and embeddings at 0: perturb them all
        for name, param in model.named_parameters():
            if param.dim() == 1 or "embeddings" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _converted(ctx, cfg, hf_state):
    model = build_model(cfg, ParallelConfig(), ctx, process_groups()).eval()
    load_local_state(model, InternVLStateDictAdapter(cfg).hf_to_megavlm(hf_state))
    return model


def _batch(cfg, seed=7):
    seq = 24 + 3 * cfg.image_tokens
    return synthetic_batches(cfg, 3, seq, micro_batch_size=3, seed=seed, image_pattern=(2, 1, 0))[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf_both_ways(single_process, variant):
    cfg = with_overrides(flavor_config("internvl", "debug"), VARIANTS[variant])
    hf = tiny_hf_internvl(cfg, seed=3)
    model = _converted(single_process, cfg, hf.state_dict())
    batch = _batch(cfg)
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], pixel_values=batch["images"]).logits
        out = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])
    diff = (out - ref).abs().max().item()
    print(f"{variant}: max |logits diff| {diff:.2e}")
    assert diff < 1e-4
    # megavlm -> HF: the exported model gives the same logits
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from megavlm.models.internvl.state_dict_adapter import complete_for_hf

    hf_config, hf_state = complete_for_hf(cfg, InternVLStateDictAdapter(cfg).megavlm_to_hf({(0, 0): model.state_dict()}),
                                          hf.state_dict())
    back = InternVLForConditionalGeneration(InternVLConfig.from_dict(hf_config)).eval()
    missing, unexpected = back.load_state_dict(hf_state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        again = back(input_ids=batch["input_ids"], pixel_values=batch["images"]).logits
    assert (again - ref).abs().max().item() < 1e-4


def test_config_round_trip():
    for flavor in ("debug", "internvl3-1b", "internvl3-8b"):
        cfg = flavor_config("internvl", flavor)
        assert config_from_hf(config_to_hf(cfg), flavor=flavor) == cfg


def test_pixel_shuffle_matches_hf():
    """Our reference pixel shuffle (the Triton kernel's reference) equals HF InternVL's."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    from megavlm.kernels.pixel_shuffle_norm import reference_pixel_shuffle

    x = torch.randn(3, 8, 8, 5)
    assert torch.equal(reference_pixel_shuffle(x), InternVLModel.pixel_shuffle(None, x, 0.5))


@pytest.mark.multiproc
def test_tp2_with_the_vit_trainable_matches_one_process(single_process, tmp_path):
    """TP=2 (with recompute) vs one process: the loss and every gradient, the ViT's included
    (QK-norm weights split by heads, LayerScale replicated); the TP=2 dist checkpoint loads at TP=1."""
    from safetensors.torch import save_file

    from megavlm.training.checkpoint import load_model
    from tests.conftest import ROOT, run_torchrun
    from tests.workers import internvl_step

    cfg = internvl_step.CFG
    hf = {k: v.clone().contiguous() for k, v in tiny_hf_internvl(cfg, seed=5).state_dict().items() if k != "lm_head.weight"}
    save_file(hf, tmp_path / "init.safetensors")
    run_torchrun(ROOT / "tests" / "workers" / "internvl_step.py", 2,
                 ["--init", str(tmp_path / "init.safetensors"), "--out", str(tmp_path)])
    internvl_step.run("ref", ParallelConfig(), hf, str(tmp_path))
    ref, tp2 = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "tp2.pt")
    assert ref["tokens"] > 0 and tp2["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    vit = [k for k in ref["grads"] if k.startswith("vision.")]
    assert any("q_layernorm" in k for k in vit) and any("layer_scale" in k for k in vit)
    assert set(tp2["grads"]) == set(ref["grads"])
    for name, grad in ref["grads"].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(tp2["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    model = build_model(cfg, ParallelConfig(), single_process, process_groups())
    load_model(model, tmp_path / "ckpt_tp2")
    exported = InternVLStateDictAdapter(cfg).megavlm_to_hf({(0, 0): model.state_dict()})
    assert all(torch.equal(exported[k], hf[k]) for k in exported)


# ---- dynamic resolution ---------------------------------------------------------------------------
# (width, height) -> (cols, rows) at 448 px tiles, max 12: InternVL's choice for a table of sizes.
TILE_TABLE = {
    (448, 448): (1, 1), (224, 224): (1, 1), (1344, 1344): (3, 3), (896, 896): (2, 2),
    (896, 448): (2, 1), (448, 896): (1, 2), (800, 600): (4, 3), (1920, 1080): (4, 2),
    (1000, 200): (5, 1), (200, 1000): (1, 5), (5000, 100): (12, 1), (640, 480): (4, 3),
    (1024, 768): (4, 3), (300, 200): (3, 2), (500, 490): (1, 1),
}


@pytest.mark.parametrize("size,grid", TILE_TABLE.items(), ids=lambda v: "x".join(map(str, v)))
def test_tile_plan_table_and_hf(size, grid):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    from megavlm.data.tiles import plan_tiles

    assert plan_tiles(*size, 448, 12) == grid
    assert plan_tiles(*size, 448, 12) == tuple(get_optimal_tiled_canvas(size[::-1], (448, 448), 1, 12))


def test_tiles_cover_the_image_in_order():
    """Tiles cut from a gradient image sit where the grid puts them; the thumbnail comes last."""
    import numpy as np
    from PIL import Image

    from megavlm.data.tiles import split_tiles

    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[..., 0] = np.linspace(0, 255, 300, dtype=np.uint8)[None, :]   # red grows left to right
    array[..., 1] = np.linspace(0, 255, 100, dtype=np.uint8)[:, None]   # green grows top to bottom
    tiles = split_tiles(Image.fromarray(array), 32, (3, 2), thumbnail=True)
    assert len(tiles) == 7 and all(t.size == (32, 32) for t in tiles)
    means = [np.asarray(t, dtype=np.float32).mean((0, 1)) for t in tiles[:6]]
    assert means[0][0] < means[1][0] < means[2][0] and means[3][0] < means[4][0] < means[5][0]
    assert all(means[c][1] < means[3 + c][1] for c in range(3))


def test_tiled_samples_carry_their_own_image_token_counts(tmp_path):
    """Two images of different aspect ratios: each <image> expands to views x tokens-per-tile,
    the batch holds one ViT input per view, and tokens and inputs agree for the model's scatter."""
    import io

    from PIL import Image

    from megavlm.data.build import encoder_for, tile_planner
    from megavlm.data.collate import pad_micro_batch
    from megavlm.data.embedded import generate
    from megavlm.data.examples import ExampleBuilder
    from megavlm.data.images import PILBackend
    from megavlm.data.loader import load_examples
    from megavlm.data.records import ImageRef, Record
    from megavlm.config.recipe import DataConfig
    from megavlm.data.tokenizer import load_tokenizer

    generate(tmp_path, seed=0, splits={"train": 8, "val": 8, "test": 8})
    cfg = flavor_config("internvl", "debug")
    tok = load_tokenizer(tmp_path / "tokenizer.model")

    def jpeg(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="JPEG")
        return buf.getvalue()

    records = [Record(f"s{i}", images=[ImageRef(source="mem", data=jpeg(*wh))], turns=[("<image>\nWhat color?", "red")])
               for i, wh in enumerate([(112, 56), (40, 40)])]
    planner = tile_planner(cfg, DataConfig(max_tiles=4))
    builder = ExampleBuilder(encoder_for(cfg, tok, "vicuna_v1"), 256, tiler=planner)
    examples, skipped = load_examples(records, builder, PILBackend(cfg.vision.image_size), [0, 1], 0)
    assert not skipped
    views = [2 + 1, 1]  # 2x1 grid + thumbnail; a small square stays one tile
    for ex, v in zip(examples, views):
        assert ex.input_ids.count(cfg.image_token_id) == v * cfg.image_tokens
    batch = pad_micro_batch(examples, 2, 256, tok.pad_id, cfg.vision.image_size)
    assert batch["images"].shape == (4, 3, 56, 56) and batch["images_per_sample"].tolist() == views


# ---- stages ----------------------------------------------------------------------------------------
RECIPES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "recipes" / "internvl"


def _stage_recipe(stage: str, data_dir, workdir, *extra):
    """Stage "lm" (the debug LLM stand-in), 1, 2 or 3, at TP=1 in this process, from the previous one."""
    from megavlm.config.recipe import load_recipe
    from tests.conftest import data_overrides

    previous = {"1": "lm", "2": "1", "3": "2"}
    overrides = data_overrides(data_dir, captions=stage != "3") + [
        "parallel.tensor_parallel=1", f"checkpoint.dir={workdir}/stage{stage}", "logging.progress=false",
        "eval.max_samples=64", "train.eval_samples=32"]
    if stage in previous:
        overrides.append(f"stage.init_from={workdir}/stage{previous[stage]}")
    if stage == "3":
        overrides.append(f"eval.vqa={data_dir}/conversations_test.json")
    return load_recipe(RECIPES / f"internvl_debug_{'lm' if stage == 'lm' else 'stage' + stage}.yaml",
                       overrides + list(extra))


def test_layer_wise_lr_decay_groups(single_process, small_embedded, tmp_path):
    """Stage 2's optimizer: one LR per ViT depth, lr_vision * decay^(L + 1 - depth); the
    connector at optimizer.lr; the frozen LLM in no group."""
    from megavlm.training.trainer import Trainer

    recipe = _stage_recipe("2", small_embedded, tmp_path, "stage.init_from=null", "stage.vision_layer_decay=0.5")
    trainer = Trainer(recipe)
    layers = recipe.model.vision.layers_to_build
    seen = {}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            depth = getattr(param, "megavlm_vit_depth", None)
            key = ("vision", depth) if getattr(param, "megavlm_component", None) == "vision" else param.megavlm_component
            seen.setdefault(key, set()).add(group["max_lr"])
    assert "llm" not in seen and seen["connector"] == {2e-3}
    depths = sorted(d for key, d in (k for k in seen if isinstance(k, tuple)))
    assert depths == list(range(layers + 1))  # embeddings, then each layer (no final norm in InternViT)
    for depth in depths:
        (lr,) = seen[("vision", depth)]
        assert lr == pytest.approx(1e-3 * 0.5 ** (layers + 1 - depth))


@pytest.mark.slow
def test_three_stages_learn_to_use_the_image(single_process, small_embedded, tmp_path):
    """The debug LLM stand-in, then MLP warm-up -> ViT incremental -> full SFT, shortened, at
    TP=1 in this process, on packed rows: held-out accuracy with the image clearly above
    blank-image. (Two tiles at most keep it short: the 112 px squares stay one 56 px tile; the
    recipes' 2x2 tiles + thumbnail run in examples/train_internvl.sh.)"""
    from megavlm.training.trainer import Trainer

    metrics = {}
    for stage, steps in (("lm", 150), ("1", 24), ("2", 48), ("3", 150)):
        recipe = _stage_recipe(stage, small_embedded, tmp_path, f"train.max_steps={steps}", "data.max_tiles=2")
        metrics[stage] = Trainer(recipe).run()
        print(f"stage {stage}:", metrics[stage])
    # the warm-up and the ViT stage keep (and add to) the use of the image with the LLM frozen
    for stage in ("1", "2"):
        assert metrics[stage]["caption_token_accuracy"] > metrics[stage]["caption_token_accuracy_blank"] + 0.05
    # 150 SFT steps move to the conversation format; the image still counts (VQA needs more steps
    # than this test affords: measured 0.29 vs 0.27 blank here, see the closing note)
    assert metrics["3"]["caption_token_accuracy"] > metrics["3"]["caption_token_accuracy_blank"]
    assert metrics["3"]["vqa_exact_match"] >= metrics["3"]["vqa_exact_match_blank"]


def test_converter_cli_round_trips_internvl(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    cfg = flavor_config("internvl", "debug")
    tiny_hf_internvl(cfg, seed=9).save_pretrained(tmp_path / "hf")
    tool = ROOT / "tools" / "convert_checkpoint.py"
    for args in (["hf-to-megavlm", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--verify"],
                 ["megavlm-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--verify"]):
        proc = subprocess.run([sys.executable, str(tool), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        assert "max |logits" in proc.stdout
