"""Zero-shot evaluation of a contrastive (CLIP / SigLIP) model on held-out image-caption pairs:
image->text and text->image retrieval R@1/5/10 and the mean CLIP similarity (cosine of the two
embeddings) of matched pairs vs shuffled pairs, and the objective's loss on the held-out set.

The embedded captions are templated, so several images can share a caption: a retrieved item is
right when its caption is the query's (a benchmark's image, for retrieval benchmarks), and chance
is reported for that same criterion. Shuffled pairs are all pairs whose captions differ (an
image with a random other caption, accidental matches left out).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from megavlm.eval.retrieval import eval_text_batches, recall_at, same_group
from megavlm.training.stages import set_train_mode


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


@torch.no_grad()
def embed_pairs(ctx, source, limit: int, skipped: list | None = None):
    """(image embeddings [n, E], text embeddings [n, E], captions, sample ids) of the first
    ``limit`` usable records of ``source``."""
    model = _unwrap(ctx.model_chunks[0])
    set_train_mode(model, False)
    batches, captions, sample_ids = eval_text_batches(ctx, source, limit, skipped)
    if not batches:
        return torch.zeros(0, 0), torch.zeros(0, 0), [], []
    images = torch.cat([model.embed_images(b["images"]) for b in batches])
    texts = torch.cat([model.embed_texts(b["text_ids"], b["text_mask"]) for b in batches])
    return images, texts, captions, sample_ids


def chance_recall(correct: torch.Tensor, k: int) -> float:
    """Expected R@k of a random ranking: 1 - P(none of k random picks is right), per query."""
    n = correct.shape[1]
    right = correct.sum(1).tolist()
    misses = [math.prod((n - m - j) / (n - j) for j in range(min(k, n))) if n - m >= k else 0.0 for m in right]
    return 1.0 - sum(misses) / len(misses)


def retrieval_scores(image: torch.Tensor, text: torch.Tensor, groups: list) -> dict[str, float]:
    """R@1/5/10 both directions over cosine similarities, and their chance levels."""
    sims = image.float() @ text.float().t()
    correct = same_group(groups, sims.device)
    metrics = {"retrieval_samples": float(len(groups))}
    for k in (1, 5, 10):
        metrics[f"i2t_r{k}"] = recall_at(sims, correct, k)
        metrics[f"t2i_r{k}"] = recall_at(sims.t(), correct, k)
        metrics[f"retrieval_chance_r{k}"] = chance_recall(correct, k)
    return metrics


def similarity_scores(image: torch.Tensor, text: torch.Tensor, groups: list) -> dict[str, float]:
    """Mean cosine similarity of the matched pairs and of the shuffled (mismatched) pairs."""
    sims = image.float() @ text.float().t()
    mismatched = ~same_group(groups, sims.device)
    shuffled = sims[mismatched].mean().item() if mismatched.any() else float("nan")
    return {"similarity_matched": sims.diagonal().mean().item(), "similarity_shuffled": shuffled}


def contrastive_metrics(ctx, source, limit: int, group_of: dict | None = None,
                        skipped: list | None = None) -> dict[str, float]:
    """Retrieval and matched/shuffled similarity on the first ``limit`` pairs of ``source``;
    ``group_of``: sample id -> what a right item shares with the query (default: the caption)."""
    image, text, captions, sample_ids = embed_pairs(ctx, source, limit, skipped)
    if not captions:
        return {"retrieval_samples": 0.0}
    groups = [group_of[i] for i in sample_ids] if group_of else captions
    return {**retrieval_scores(image, text, groups), **similarity_scores(image, text, groups)}


@torch.no_grad()
def contrastive_validation(ctx, source, limit: int, batch_size: int) -> dict[str, float]:
    """val/loss (the objective over chunks of ``batch_size`` held-out pairs, the training batch's
    number of negatives), and retrieval and similarity on the same pairs, each as val/<name>."""
    model = _unwrap(ctx.model_chunks[0])
    image, text, captions, _ = embed_pairs(ctx, source, limit)
    if not captions:
        return {"val/loss": float("nan")}
    total = 0.0
    for start in range(0, len(captions), batch_size):
        part = slice(start, start + batch_size)
        output = model.objective(image[part], text[part])       # one process: no gather
        total += float(next(iter(output.values()))[0])
    metrics = {"loss": total / len(captions), **retrieval_scores(image, text, captions),
               **similarity_scores(image, text, captions)}
    return {f"val/{name}": value for name, value in metrics.items()}


def contrastive_metrics_for_samples(ctx, samples: list) -> tuple[dict[str, float], dict[str, int]]:
    """A retrieval benchmark's (image, caption) samples (eval/benchmarks/retrieval.py) scored by a
    contrastive model; returns its metrics and the samples skipped by reason."""
    from megavlm.data.records import ImageRef, Record

    records = [Record(s.sample_id, [ImageRef(str(s.image), data=s.image) if isinstance(s.image, bytes)
                                    else ImageRef(str(s.image), path=Path(s.image))], turns=[("", s.question)])
               for s in samples]
    skipped: list = []
    metrics = contrastive_metrics(ctx, records, len(records), {s.sample_id: s.meta["group"] for s in samples}, skipped)
    counts: dict[str, int] = {}
    for reason, _ in skipped:
        counts[reason] = counts.get(reason, 0) + 1
    return metrics, counts
