"""Fuyu and PaliGemma cases shared by tests/test_fuyu_paligemma.py and its TP/PP worker
(tests/workers/fuyu_paligemma_layouts.py): configs, tiny random HF references built from config
(no download), and batches: synthetic ones (samples with 2, 1 and 0 images; Fuyu's of different
patch grids) and, for Fuyu, real images through the data pipeline whose sizes are not multiples
of the patch size, two sizes in one batch."""
from __future__ import annotations

import io

import numpy as np
import torch

from megavlm.config.schema import with_overrides
from megavlm.data.synthetic import image_positions, synthetic_batches, synthetic_sample
from megavlm.losses.lm_loss import IGNORE_INDEX
from megavlm.models.registry import flavor_config, get_family
from tests import hf_variants

# name -> (family, overrides); the debug flavors have GQA, heads wider than hidden/heads (PaliGemma),
# 6 heads of 12 channels with partial RoPE (Fuyu), a vocabulary of 771
CASES = {
    "fuyu": ("fuyu", []),
    "paligemma": ("paligemma", []),
    "paligemma-mqa": ("paligemma", ["language.num_kv_heads=1"]),   # Gemma-2B's one KV head (TP=1 only)
}
TP2_CASES = ("fuyu", "paligemma")
IMAGE_SIZES = ((70, 45), (150, 100))   # (width, height): 16 px patches, fit into 96 x 80


def case_config(name: str):
    family, overrides = CASES[name]
    return with_overrides(flavor_config(family, "debug"), overrides)


def hf_reference(cfg, seed: int = 3):
    return hf_variants.hf_reference(cfg, seed)


def synthetic_batch(cfg, seed: int = 7) -> dict:
    seq = 20 + image_positions(cfg, 2)
    return synthetic_batches(cfg, 3, seq + seq % 2, micro_batch_size=3, seed=seed, image_pattern=(2, 1, 0))[0]


def _png(width: int, height: int, rng) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def fuyu_image_batch(cfg, sizes=IMAGE_SIZES, seed: int = 0) -> dict:
    """One sample per image size: 4 prompt tokens, the image's grid (newline after each row),
    6 answer tokens; rows right-padded. Patches from the data pipeline (scale, pad, patchify)."""
    from megavlm.data.augment import ImageAug
    from megavlm.data.build import image_backend
    from megavlm.data.patches import PatchGridPlanner, grid_token_ids

    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    planner, backend = PatchGridPlanner(cfg.patches), image_backend(cfg)
    rows, patches = [], []
    for i, (width, height) in enumerate(sizes):
        data = _png(width, height, rng)
        aug, grid = planner.plan(data, ImageAug(), f"s{i}", "test image")
        patches.append(backend.decode([(data, aug, f"s{i}", "test image")])[0])
        text = torch.randint(4, 700, (10,), generator=gen).tolist()
        rows.append(text[:4] + grid_token_ids(grid, cfg.image_token_id, cfg.patches.newline_token_id) + text[4:])
    seq = max(map(len, rows))
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    labels = torch.full((len(rows), seq), IGNORE_INDEX, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        labels[r, len(row) - 7: len(row) - 1] = ids[r, len(row) - 6: len(row)]
    return {"input_ids": ids, "labels": labels, "images": torch.cat(patches),
            "images_per_sample": torch.tensor([p.shape[0] for p in patches])}


def batches_for(name: str) -> dict:
    """{batch name: batch} every parity check runs."""
    cfg = case_config(name)
    out = {"synthetic": synthetic_batch(cfg)}
    if cfg.patches is not None:
        out["images"] = fuyu_image_batch(cfg)
    return out


def model_inputs(batch: dict) -> dict:
    keys = ("images", "images_per_sample", "prefix_lengths", "packed_seq_params", "position_ids")
    return {k: batch[k] for k in keys if k in batch}


def hf_logits(cfg, hf_model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=batch["input_ids"], **get_family(cfg.family).hf_inputs(cfg, batch)).logits.float()


# ---- generation: prompts of different lengths ------------------------------------------------------
class IdTokenizer:
    eos_id, pad_id = 2, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def generation_case(cfg, seed: int = 0):
    """Prompts of different lengths, each with one image (a different grid for each Fuyu one)."""
    from megavlm.data.synthetic import _image_inputs, _placeholders

    g = torch.Generator().manual_seed(seed)
    prompts, images = [], []
    for i, n in enumerate((3, 7, 7, 5)):
        layout = _placeholders(cfg, i)
        prompts.append([1] + layout + torch.randint(5, 300, (n,), generator=g).tolist())
        images.append(_image_inputs(cfg, [layout], g))
    return prompts, torch.cat(images), [im.shape[0] for im in images]


def generate_case(model, cfg, cache: bool, rows=None):
    from megavlm.eval.generate import SamplingConfig, generate
    from megavlm.models.common.layer_specs import lm_head

    prompts, images, per_sample = generation_case(cfg)
    rows = rows if rows is not None else list(range(len(prompts)))
    starts = np.cumsum([0] + per_sample).tolist()
    pixels = torch.cat([images[starts[r]:starts[r + 1]] for r in rows])
    out = generate([model], [prompts[r] for r in rows], pixels, [per_sample[r] for r in rows], lm_head(cfg, None),
                   IdTokenizer(), SamplingConfig(max_new_tokens=5, use_cache=cache), eos_ids={-1},
                   banned=cfg.placeholder_ids, seeds=rows)
    return [g.tokens for g in out]



# ---- training-step batches for the pipeline check --------------------------------------------
PP_SEQ = 64


def pp_batches(cfg, packed: bool) -> list[dict]:
    """Four samples as micro-batches of one row each (padded), or packed two to a row with each
    sample's prefix kept (prefix-LM models)."""
    if not packed:
        return synthetic_batches(cfg, 4, PP_SEQ, micro_batch_size=1, seed=11, image_pattern=(1, 2, 0, 1), fill=0.7)
    from megavlm.data.collate import pack_row
    from megavlm.data.examples import Example

    gen = torch.Generator().manual_seed(11)
    examples = []
    for i, images in enumerate((1, 1, 1, 0)):
        s = synthetic_sample(cfg, PP_SEQ, images, gen, length=PP_SEQ // 2 - 2 + i % 2)
        n = s["length"]
        examples.append(Example(f"s{i}", s["input_ids"][:n].tolist(), s["labels"][:n].tolist(), [],
                                pixels=[s["images"]]))
    size = (cfg.patches.patch_dim,) if cfg.patches is not None else cfg.vision.image_size
    return [pack_row(examples[i: i + 2], PP_SEQ, 0, size, cfg.prefix_lm) for i in (0, 2)]
