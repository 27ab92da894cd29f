"""HF layouts of the four families that real checkpoints have, as tiny random HF models built from
config (no download), and the two-way parity check against megavlm: shared by the one-process
tests (test_hf_variants.py) and the TP=2 worker (workers/hf_variants_tp.py)."""
from __future__ import annotations

import torch

from megavlm.config.schema import with_overrides
from megavlm.data.synthetic import synthetic_batches
from megavlm.models.registry import flavor_config, get_family

# name -> (family, flavor, overrides). Head counts and sizes are not round on purpose.
VARIANTS = {
    # InternViT-6B-style bias-free q/k/v, 6 heads, QK-norm, the final norm of use_mean_pooling: false,
    # untied Qwen2 with GQA
    "internvl-qkv-bias-free": ("internvl", "debug", ["vision.qkv_bias=false", "vision.hidden_size=72",
                                                     "vision.num_heads=6", "vision.post_norm=true",
                                                     "language.tie_embeddings=false"]),
    # RMSNorm ViT, no QK-norm, Llama decoder with one KV head
    "internvl-rmsnorm-llama": ("internvl", "debug", ["vision.qk_norm=false", "vision.normalization=RMSNorm",
                                                     "language.qkv_bias=false",
                                                     "language.num_kv_heads=1", "language.vocab_size=509"]),
    # CLIP (no LayerScale, no QK-norm) + a Qwen2 decoder, tied embeddings
    "llava-qwen2-tied": ("llava", "debug", ["language.qkv_bias=true", "language.tie_embeddings=true",
                                            "language.vocab_size=509"]),
    "llava-gqa1-cls": ("llava", "debug", ["language.num_kv_heads=1", "vision.keep_class_token=true",
                                          "vision.feature_layer=-1"]),
    # BLIP-2 with OPT (learned positions) and a bias-free EVA ViT; BLIP-2 with a Llama decoder
    "blip2-opt-qkv-bias-free": ("blip2", "debug", ["vision.qkv_bias=false"]),
    "blip2-llama": ("blip2", "debug-llama", []),
    "flamingo-vector-gates": ("flamingo", "debug", ["flamingo.gate_type=vector", "flamingo.hf_additional_vocab=2"]),
    # IDEFICS without the Perceiver resampler: text attends to every ViT token
    "flamingo-no-resampler": ("flamingo", "debug", ["flamingo.use_resampler=false", "flamingo.max_media=3"]),
    # ViTs with head counts TP=2 does not divide, kept whole on every TP rank
    "internvl-5-heads-whole-vit": ("internvl", "debug", ["vision.hidden_size=60", "vision.num_heads=5",
                                                         "vision.tensor_parallel=1"]),
    "llava-5-heads-whole-vit": ("llava", "debug", ["vision.hidden_size=80", "vision.num_heads=5",
                                                   "vision.tensor_parallel=1"]),
    # InternViT's 5 heads padded to 6 with a zero dummy head (QK-norm over the real heads only)
    "internvl-5-heads-padded": ("internvl", "debug", ["vision.hidden_size=60", "vision.num_heads=5",
                                                      "vision.padded_heads=6"]),
    # a CLIP ViT, BLIP-2's ViT and Q-Former and a Perceiver resampler whose heads TP=2 does not
    # divide, padded with zero dummy heads (stripped again on export)
    "llava-5-heads-padded-vit": ("llava", "debug", ["vision.hidden_size=80", "vision.num_heads=5",
                                                    "vision.padded_heads=6"]),
    "blip2-5-heads-padded": ("blip2", "debug", ["vision.hidden_size=80", "vision.num_heads=5", "vision.padded_heads=6",
                                                "qformer.hidden_size=80", "qformer.num_heads=5",
                                                "qformer.padded_heads=6"]),
    "flamingo-3-heads-padded-resampler": ("flamingo", "debug", ["flamingo.resampler_heads=3",
                                                                "flamingo.resampler_padded_heads=4"]),
    # a Q-Former and a Perceiver resampler whose heads TP=2 does not divide, kept whole
    "blip2-5-heads-whole-qformer": ("blip2", "debug", ["qformer.hidden_size=80", "qformer.num_heads=5",
                                                       "connector.tensor_parallel=1"]),
    "flamingo-3-heads-whole-resampler": ("flamingo", "debug", ["flamingo.resampler_heads=3",
                                                               "connector.tensor_parallel=1"]),
}
# also trained at TP=2: the gradients of the parts kept whole are checked against one process's
WHOLE_MODULES = {"internvl-5-heads-whole-vit": ("vision.",), "blip2-5-heads-whole-qformer": ("qformer.",),
                 "flamingo-3-heads-whole-resampler": ("resampler.",)}

# TP=1 only: head counts TP=2 does not divide
ODD_HEAD_VARIANTS = {
    "internvl-5-heads": ("internvl", "debug", ["vision.hidden_size=60", "vision.num_heads=5"]),
}


def variant_config(name: str):
    family, flavor, overrides = {**VARIANTS, **ODD_HEAD_VARIANTS}[name]
    return with_overrides(flavor_config(family, flavor), overrides)


def hf_class(cfg):
    import transformers

    return getattr(transformers, get_family(cfg.family).hf_class)


def hf_config(cfg, hf_dict: dict | None = None):
    """The transformers config object for megavlm's config (or for an exported config.json)."""
    import transformers

    hf_dict = dict(hf_dict or get_family(cfg.family).config_to_hf(cfg))
    if cfg.family == "flamingo":
        # IDEFICS' gates start at 0 (the image would not matter): open them
        return transformers.IdeficsConfig(**dict(hf_dict, alpha_initializer="ones"))
    return transformers.AutoConfig.for_model(**hf_dict)


def hf_reference(cfg, seed: int = 0):
    """A random HF model of the family; every 1-D tensor perturbed (HF starts norms at 1 and
    biases at 0), so a tensor dropped or misplaced by the converter changes the logits."""
    torch.manual_seed(seed)
    model = hf_class(cfg)(hf_config(cfg)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def batch(cfg, seed: int = 7) -> dict:
    seq = 20 + 2 * cfg.image_tokens
    return synthetic_batches(cfg, 3, seq, micro_batch_size=3, seed=seed, image_pattern=(2, 1, 0))[0]


def hf_logits(cfg, hf_model, b: dict) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=b["input_ids"], **get_family(cfg.family).hf_inputs(cfg, b)).logits.float()


def exported_hf_model(cfg, exported: dict, reference: dict):
    """The HF model megavlm's export builds (config + state through ``complete_for_hf``)."""
    config, state = get_family(cfg.family).complete_for_hf(cfg, exported, reference)
    model = hf_class(cfg)(hf_config(cfg, config)).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "language_model.lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise KeyError(f"exported HF state: missing {sorted(set(missing) - tied)[:6]}, unexpected {unexpected[:6]}")
    return model


def export_mismatches(exported: dict, reference: dict) -> list[str]:
    """Exported tensors that differ from the HF checkpoint they came from (OPT's two offset
    position rows, which no position reads, excluded)."""
    bad = []
    for key, tensor in exported.items():
        ref = reference[key]
        if key.endswith("embed_positions.weight"):
            tensor, ref = tensor[2:], ref[2:]
        if not torch.equal(tensor, ref):
            bad.append(key)
    return bad


# ---- PEFT export: one variant per family ------------------------------------------------------
PEFT_VARIANTS = ["llava-qwen2-tied", "internvl-qkv-bias-free", "blip2-opt-qkv-bias-free", "flamingo-vector-gates"]


def add_lora(model, cfg, quantize: bool, tp_rank: int = 0):
    """LoRA (or QLoRA) on every target the family's HF decoder has, B random so the adapters
    matter; a factor TP splits gets this rank's own values, a replicated one the same on all."""
    from megavlm.config.recipe import LoRAConfig, StageConfig
    from megavlm.peft.lora import lora_modules
    from megavlm.training.stages import apply_stage

    targets = list(get_family(cfg.family).adapter_cls(cfg).hf_lora_modules)
    lora = LoRAConfig(rank=4, alpha=8, targets=targets, quantize_base="nf4" if quantize else "none")
    apply_stage(model, StageConfig(trainable=["lora"], lora=lora))
    for i, module in enumerate(lora_modules(model)):
        for j, adapter in enumerate(module.lora.values()):
            sharded = adapter.parallel == "out"
            g = torch.Generator().manual_seed(1000 * i + 10 * j + (tp_rank if sharded else 0))
            adapter.lora_B.data.copy_(0.3 * torch.randn(adapter.lora_B.shape, generator=g))
    return lora


def peft_logits(cfg, lora, shards: dict, adapter, root, b: dict) -> torch.Tensor:
    """Export through megavlm.peft.export, then PeftModel.from_pretrained(<HF class>.from_pretrained(hf_base), peft)."""
    from peft import PeftModel

    from megavlm.peft.export import export_for_hf

    peft_dir, base_dir = export_for_hf(shards, cfg, adapter, lora, root)
    base = hf_class(cfg).from_pretrained(str(base_dir), local_files_only=True).eval()
    return hf_logits(cfg, PeftModel.from_pretrained(base, str(peft_dir)).eval(), b)
