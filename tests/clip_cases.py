"""CLIP / SigLIP layouts checked against HF ``CLIPModel`` / ``SiglipModel`` (tiny random models built
from config, no download), shared by the one-process tests (test_clip.py) and the TP=2 worker
(workers/clip_step.py). Sizes, head counts and vocabularies are not round on purpose."""
from __future__ import annotations

import torch

from megavlm.config.schema import with_overrides
from megavlm.data.synthetic import synthetic_pairs
from megavlm.models.registry import flavor_config, get_family

FAMILY = "clip"
# name -> (flavor, overrides); every one of them also runs at TP=2
VARIANTS = {
    "clip": ("debug", ["vision.hidden_size=72", "vision.num_heads=6", "vision.ffn_hidden_size=136",
                       "language.vocab_size=509", "language.hidden_size=48", "language.num_heads=6",
                       "language.num_kv_heads=6",
                       "language.ffn_hidden_size=100", "language.max_seq_len=20", "contrastive.embed_dim=40",
                       "contrastive.eot_token_id=508"]),
    "siglip": ("debug-siglip", ["vision.image_size=42", "vision.hidden_size=60",
                                "vision.num_heads=6", "language.vocab_size=509", "language.hidden_size=52",
                                "language.num_heads=4", "language.max_seq_len=16", "contrastive.embed_dim=60"]),
    # SigLIP's ViT and attention pooling with 5 heads padded to 6 by zero dummy heads
    "siglip-5-heads-padded": ("debug-siglip", ["vision.hidden_size=80", "vision.num_heads=5", "vision.padded_heads=6",
                                               "contrastive.embed_dim=80", "language.vocab_size=509"]),
}
# TP=1 only: head counts TP=2 does not divide
ODD_HEAD_VARIANTS = {
    "clip-5-heads": ("debug", ["vision.hidden_size=80", "vision.num_heads=5", "language.hidden_size=60",
                               "language.num_heads=5", "language.num_kv_heads=5", "language.vocab_size=509",
                               "contrastive.eot_token_id=508"]),
}


def variant_config(name: str):
    flavor, overrides = {**VARIANTS, **ODD_HEAD_VARIANTS}[name]
    return with_overrides(flavor_config(FAMILY, flavor), overrides)


def hf_model(cfg, hf_dict: dict | None = None):
    """An HF model of ``cfg``'s class from megavlm's config (or an exported config.json), random."""
    import transformers

    hf_dict = hf_dict or get_family(FAMILY).config_to_hf(cfg)
    cls = getattr(transformers, hf_dict["architectures"][0])
    return cls(transformers.AutoConfig.for_model(**hf_dict)).eval()


def hf_reference(cfg, seed: int = 0):
    """Every tensor of at most one dimension perturbed (HF starts norms at 1, biases at 0, the
    logit bias at 0), so a dropped or misplaced tensor changes the logits."""
    torch.manual_seed(seed)
    model = hf_model(cfg)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() <= 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def pairs(cfg, seed: int = 5) -> dict:
    return synthetic_pairs(cfg, 3, seed=seed)


def hf_logits(cfg, model, batch: dict) -> torch.Tensor:
    """logits_per_image; HF's CLIP reads the end-of-text token (given the mask), SigLIP whole rows."""
    masked = {"attention_mask": batch["text_mask"]} if cfg.contrastive.text_pooling != "last" else {}
    with torch.no_grad():
        return model(input_ids=batch["text_ids"], pixel_values=batch["images"], **masked).logits_per_image.float()


def megavlm_logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        image = model.embed_images(batch["images"])
        text = model.embed_texts(batch["text_ids"], batch["text_mask"])
        return model.objective.logits(image, text).float()


def exported_hf_model(cfg, exported: dict):
    config, state = get_family(FAMILY).complete_for_hf(cfg, exported)
    model = hf_model(cfg, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"exported HF state: missing {missing[:6]}, unexpected {unexpected[:6]}")
    return model
