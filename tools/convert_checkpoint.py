#!/usr/bin/env python
"""Convert between HF checkpoints (local safetensors directories) and megavlm checkpoints.

  hf-to-megavlm  --hf DIR --out CKPT      HF LLaVA / BLIP-2 / IDEFICS / InternVL / CLIP / SigLIP -> megavlm
  megavlm-to-hf  --ckpt CKPT --out DIR    megavlm checkpoint -> HF directory (config.json + safetensors)

A megavlm checkpoint is layout-independent: training loads it at any TP/PP. ``--verify`` builds
both models, runs one random batch and prints max |logits difference| (exit code 1 above the
tolerance). Nothing is downloaded; the HF side is read from and written to local disk.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def _single_process():
    from megavlm.config.model import ParallelConfig
    from megavlm.parallel import init as pinit

    return pinit.initialize(ParallelConfig(), seed=0), pinit.process_groups()


def _build(model_cfg, dtype):
    from megavlm.config.model import ParallelConfig
    from megavlm.training.build import build_model

    ctx, pgs = _single_process()
    return build_model(model_cfg, ParallelConfig(), ctx, pgs, dtype=dtype).eval()


def hf_to_megavlm(args) -> Path:
    from megavlm.config.schema import with_overrides
    from megavlm.models.common.hf_io import read_hf_dir
    from megavlm.models.registry import family_for_hf
    from megavlm.training.checkpoint import save_model

    dtype = DTYPES[args.dtype]
    # tensors are read one at a time, each cast to the model's dtype as it is read (sharded
    # checkpoints through model.safetensors.index.json)
    hf_config, hf_state = read_hf_dir(args.hf, dtype)
    family = family_for_hf(hf_config)
    model_cfg = family.config_from_hf(hf_config, flavor=args.flavor or Path(args.hf).name)
    padding = model_cfg.head_padding_for(args.pad_heads_for_tp) if args.pad_heads_for_tp else []
    if args.vision_padded_heads:
        padding.append(f"vision.padded_heads={args.vision_padded_heads}")
    if padding:
        model_cfg = with_overrides(model_cfg, padding)
        print("zero dummy heads (stripped again by megavlm-to-hf): " + ", ".join(padding))
    model = _build(model_cfg, dtype)
    adapter = family.adapter_cls(model_cfg)
    missing, unexpected = model.load_state_dict(adapter.hf_to_megavlm(hf_state), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    fresh = [k for k in missing if k.startswith(adapter.not_in_hf)]
    if unexpected or len(fresh) != len(missing):
        raise KeyError(f"the HF checkpoint does not match the model: missing {sorted(set(missing) - set(fresh))[:8]}, "
                       f"unexpected {unexpected[:8]}")
    if fresh:
        print(f"{len(fresh)} megavlm tensors have no HF counterpart and keep their initialisation: {fresh}")
    unused = adapter.unused_hf_keys(hf_state)
    save_model(model, model_cfg, args.out)
    print(f"wrote megavlm checkpoint {args.out} ({family.name}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters); {len(unused)} HF tensors the model never uses were left out"
          + (f" (e.g. {unused[0]})" if unused else ""))
    return Path(args.out)


def megavlm_to_hf(args) -> Path:
    from megavlm.models.common.hf_io import read_hf_dir, write_hf_dir
    from megavlm.models.registry import get_family
    from megavlm.training.checkpoint import load_model, read_model_config

    model_cfg = read_model_config(args.ckpt)
    family = get_family(model_cfg.family)
    model = _build(model_cfg, DTYPES[args.dtype])
    load_model(model, args.ckpt)
    tensors = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    hf_state = family.adapter_cls(model_cfg).megavlm_to_hf({(0, 0): tensors})
    reference = read_hf_dir(args.hf_reference)[1] if args.hf_reference else None
    hf_config, hf_state = family.complete_for_hf(model_cfg, hf_state, reference)
    if hf_config.get("model_type") == "clip" and hf_config["text_config"].get("eos_token_id") == 2:
        print("warning: end-of-text token id 2: HF's CLIPTextModel reads eos_token_id 2 as its old rule (the highest "
              "token id ends the text), so the exported model pools another token than megavlm unless the "
              "end-of-text token has the highest id of every text", file=sys.stderr)
    hf_config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]
    write_hf_dir(args.out, hf_config, hf_state)
    print(f"wrote HF checkpoint {args.out} ({family.hf_class}, {len(hf_state)} tensors)")
    return Path(args.out)


def verify(hf_dir: Path, ckpt: Path, dtype: torch.dtype, seed: int = 0) -> float:
    """max |logits(HF) - logits(megavlm)| on a random batch with one and two images."""
    import transformers

    from megavlm.data.synthetic import image_positions, synthetic_batches
    from megavlm.models.registry import get_family
    from megavlm.training.checkpoint import load_model, read_model_config

    model_cfg = read_model_config(ckpt)
    model = _build(model_cfg, dtype)
    load_model(model, ckpt)
    if model_cfg.head == "qformer":
        return _verify_retrieval(hf_dir, model, dtype)
    if model_cfg.head == "contrastive":
        return _verify_contrastive(hf_dir, model, dtype)
    family = get_family(model_cfg.family)
    hf_cls = getattr(transformers, family.hf_class)
    hf = hf_cls.from_pretrained(str(hf_dir), dtype=dtype, local_files_only=True).eval()
    seq = 16 + image_positions(model_cfg, 2)
    batch = synthetic_batches(model_cfg, 2, seq, micro_batch_size=2, seed=seed, image_pattern=(1, 2))[0]
    prefix = {"prefix_lengths": batch["prefix_lengths"]} if "prefix_lengths" in batch else {}
    with torch.no_grad():
        images = {k: v.to(dtype) if v.is_floating_point() else v for k, v in family.hf_inputs(model_cfg, batch).items()}
        ref = hf(input_ids=batch["input_ids"], **images).logits.float()
        out = model(batch["input_ids"], images=batch["images"], images_per_sample=batch["images_per_sample"], **prefix)
    return (out[..., : ref.shape[-1]].float() - ref).abs().max().item()


def _verify_retrieval(hf_dir: Path, model, dtype: torch.dtype) -> float:
    """BLIP-2 stage-1 checkpoints: ITM logits against Blip2ForImageTextRetrieval."""
    import transformers

    from megavlm.losses.blip2 import query_mask

    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(str(hf_dir), dtype=dtype, local_files_only=True).eval()
    cfg = model.model_config
    g = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    images = torch.randn(2, 3, size, size, generator=g).to(dtype)
    ids = torch.randint(5, min(cfg.qformer.vocab_size, 1000), (2, 12), generator=g)
    mask = torch.ones_like(ids)
    q = cfg.qformer.num_query_tokens
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_image_text_matching_head=True)
        hidden = model.qformer(image=model.image_features(images), text_ids=ids, mask=query_mask(q, mask))
        ours = model.heads["itm"](hidden[:, :q]).mean(1)
    return (ours.float() - ref.logits_per_image.float()).abs().max().item()


def _verify_contrastive(hf_dir: Path, model, dtype: torch.dtype) -> float:
    """CLIP / SigLIP: the image-text logits (scaled similarities, + SigLIP's bias) of both models."""
    import transformers

    from megavlm.data.synthetic import synthetic_pairs
    from megavlm.models.clip.state_dict_adapter import hf_architecture

    cfg = model.model_config
    hf = getattr(transformers, hf_architecture(cfg)).from_pretrained(str(hf_dir), dtype=dtype,
                                                                     local_files_only=True).eval()
    pairs = synthetic_pairs(cfg, 3, dtype=dtype)
    images, ids, mask = pairs["images"], pairs["text_ids"], pairs["text_mask"]
    with torch.no_grad():
        ours = model.objective.logits(model.embed_images(images), model.embed_texts(ids, mask))
        # CLIP reads the end-of-text token's position; SigLIP reads whole rows padded to its length
        masked = {"attention_mask": mask} if cfg.contrastive.text_pooling != "last" else {}
        ref = hf(input_ids=ids, pixel_values=images, **masked).logits_per_image
    return (ours.float() - ref.float()).abs().max().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    to_m = sub.add_parser("hf-to-megavlm", help="HF directory -> megavlm checkpoint")
    to_m.add_argument("--hf", required=True, help="local HF checkpoint directory (config.json + *.safetensors)")
    to_m.add_argument("--out", required=True, help="megavlm checkpoint directory to write")
    to_m.add_argument("--flavor", default=None, help="name recorded in the config (default: the HF directory name)")
    to_m.add_argument("--vision-padded-heads", type=int, default=None,
                      help="add zero dummy ViT heads up to this count, so that the TP size divides them "
                           "(InternViT-6B: 25 -> 32); megavlm-to-hf strips them")
    to_m.add_argument("--pad-heads-for-tp", type=int, default=None, metavar="TP",
                      help="pad every ViT / Q-Former / Perceiver-resampler attention whose heads TP does not "
                           "divide with zero dummy heads to the next multiple of TP")
    to_h = sub.add_parser("megavlm-to-hf", help="megavlm checkpoint -> HF directory")
    to_h.add_argument("--ckpt", required=True, help="megavlm checkpoint directory")
    to_h.add_argument("--out", required=True, help="HF directory to write")
    to_h.add_argument("--hf-reference", default=None,
                      help="the original HF checkpoint: copies the ViT layers megavlm does not hold")
    for p in (to_m, to_h):
        p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
        p.add_argument("--verify", action="store_true", help="compare logits of both models on a random batch")
    args = parser.parse_args(argv)

    if args.direction == "hf-to-megavlm":
        hf_dir, ckpt = Path(args.hf), hf_to_megavlm(args)
    else:
        ckpt, hf_dir = Path(args.ckpt), megavlm_to_hf(args)
    if args.verify:
        dtype = DTYPES[args.dtype]
        diff = verify(hf_dir, ckpt, dtype)
        ok = diff <= TOLERANCE[dtype]
        print(f"verify: max |logits(HF) - logits(megavlm)| = {diff:.3e} ({args.dtype}, tolerance "
              f"{TOLERANCE[dtype]:.0e}): {'OK' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
