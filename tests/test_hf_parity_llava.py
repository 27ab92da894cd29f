"""HF LlavaForConditionalGeneration <-> megavlm through the state-dict adapter (TP=1; TP=2 and
PP in test_parallel_layouts.py)."""
import pytest
import torch

from megavlm.config.model import ParallelConfig
from megavlm.config.schema import with_overrides
from megavlm.data.synthetic import synthetic_batches
from megavlm.models.llava.state_dict_adapter import LlavaStateDictAdapter, config_from_hf, config_to_hf
from megavlm.models.registry import flavor_config
from megavlm.parallel.init import process_groups
from megavlm.training.build import build_model, load_local_state
from tests.conftest import tiny_hf_llava

VARIANTS = {
    "debug": [],
    "tied-gqa1-cls": ["language.tie_embeddings=true", "language.num_kv_heads=1", "vision.keep_class_token=true",
                      "vision.feature_layer=-1"],
    "linear-mha": ["language.num_kv_heads=4", "vision.activation=gelu", "vision.feature_layer=1"],
}


def _converted(single_process, cfg, hf):
    model = build_model(cfg, ParallelConfig(), single_process, process_groups()).eval()
    load_local_state(model, LlavaStateDictAdapter(cfg).hf_to_megavlm(hf.state_dict()))
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf(single_process, variant):
    cfg = with_overrides(flavor_config("llava", "debug"), VARIANTS[variant])
    hf = tiny_hf_llava(cfg, seed=3)
    assert config_from_hf(hf.config.to_dict(), flavor="debug") == cfg
    model = _converted(single_process, cfg, hf)
    seq = 24 + 2 * cfg.vision.tokens_per_image
    batch = synthetic_batches(cfg, 3, seq, micro_batch_size=3, seed=7, image_pattern=(2, 1, 0))[0]
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], pixel_values=batch["images"]).logits
        out = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"])
    assert (out - ref).abs().max().item() < 1e-4


def test_export_is_identical_and_names_what_is_dropped(single_process):
    cfg = flavor_config("llava", "debug")
    hf = tiny_hf_llava(cfg, seed=4)
    model = _converted(single_process, cfg, hf)
    adapter = LlavaStateDictAdapter(cfg)
    exported = adapter.megavlm_to_hf({(0, 0): model.state_dict()})
    original = hf.state_dict()
    assert all(torch.equal(t, original[k]) for k, t in exported.items())
    dropped = set(original) - set(exported)
    # LLaVA reads layer -2: the ViT's last layer and final norm are never used, so never built.
    last = cfg.vision.num_layers - 1
    assert dropped == {k for k in original if f"encoder.layers.{last}." in k or "post_layernorm" in k}
    assert sorted(dropped) == adapter.unused_hf_keys(original)


def test_legacy_transformers4_names_are_accepted(single_process):
    cfg = flavor_config("llava", "debug")
    hf = tiny_hf_llava(cfg, seed=5)
    legacy = {}
    for key, value in hf.state_dict().items():
        key = key.replace("model.language_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
        key = key.replace("model.vision_tower.", "vision_tower.vision_model.").replace("model.multi_modal_projector.", "multi_modal_projector.")
        legacy[key] = value
    adapter = LlavaStateDictAdapter(cfg)
    assert all(torch.equal(adapter.hf_to_full(legacy)[k], v) for k, v in adapter.hf_to_full(hf.state_dict()).items())


def test_missing_hf_tensor_is_named():
    cfg = flavor_config("llava", "debug")
    state = dict(tiny_hf_llava(cfg).state_dict())
    del state["model.language_model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="layers.1.mlp.up_proj.weight"):
        LlavaStateDictAdapter(cfg).hf_to_megavlm(state)


def test_config_to_hf_round_trip():
    cfg = flavor_config("llava", "llava-1.5-7b")
    assert config_from_hf(config_to_hf(cfg), flavor="llava-1.5-7b") == cfg
