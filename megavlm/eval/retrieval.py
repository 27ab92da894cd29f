"""BLIP-2 stage-1 evaluation: image<->text retrieval R@1/R@5 on a held-out split, by ITC
similarity and after ITM re-ranking of the ITC top-k, and the objectives' validation losses.

The embedded captions are templated, so several images can share a caption: a retrieved item
counts as correct when its caption is the query's caption, and chance is reported for that
same criterion (the share of items with the query's caption, averaged over queries).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from megavlm.data.collate import text_micro_batch
from megavlm.data.examples import TextExampleBuilder
from megavlm.data.images import PILBackend
from megavlm.data.loader import load_examples
from megavlm.losses.blip2 import query_mask
from megavlm.training.stages import set_train_mode
from megavlm.training.step import forward_backward


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def eval_text_batches(ctx, source, limit: int, skipped: list | None = None) -> tuple[list[dict], list[str], list[str]]:
    """Micro-batches of the first ``limit`` records, their captions and sample ids."""
    cfg = ctx.model_cfg
    builder = TextExampleBuilder(ctx.tokenizer, ctx.seq_length)
    examples, bad = load_examples(source, builder, PILBackend(cfg.vision.image_size),
                                  list(range(min(limit, len(source)))), 0)
    if skipped is not None:
        skipped.extend(bad)
    captions = [ctx.tokenizer.decode(ex.input_ids[len(ctx.tokenizer.bos_ids):-1]) for ex in examples]
    mbs = ctx.micro_batch_size
    batches = [text_micro_batch(examples[i:i + mbs], mbs, ctx.seq_length, ctx.tokenizer.pad_id, cfg.vision.image_size)
               for i in range(0, len(examples), mbs)]
    return ([{k: v.to(ctx.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches], captions,
            [ex.sample_id for ex in examples])


@torch.no_grad()
def _embed(model, batches):
    image_feats, image_embeds, text_feats, ids, masks = [], [], [], [], []
    for batch in batches:
        vit = model.image_features(batch["images"])
        queries = model.qformer(image=vit)
        text = model.qformer(text_ids=batch["text_ids"], mask=query_mask(0, batch["text_mask"]), use_queries=False)
        image_feats.append(F.normalize(model.heads["vision_projection"](queries), dim=-1))
        text_feats.append(F.normalize(model.heads["text_projection"](text[:, 0]), dim=-1))
        image_embeds.append(vit)
        ids.append(batch["text_ids"])
        masks.append(batch["text_mask"])
    return tuple(torch.cat(x) for x in (image_feats, image_embeds, text_feats, ids, masks))


@torch.no_grad()
def _itm_scores(model, image_embeds, ids, masks, pairs: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Match probability of each (image, text) pair in ``pairs`` [P, 2]."""
    q = model.model_config.qformer.num_query_tokens
    scores = []
    for start in range(0, pairs.shape[0], chunk):
        img, txt = pairs[start:start + chunk].unbind(1)
        hidden = model.qformer(image=image_embeds[img], text_ids=ids[txt], mask=query_mask(q, masks[txt]))
        scores.append(model.heads["itm"](hidden[:, :q]).mean(1).float().softmax(-1)[:, 1])
    return torch.cat(scores)


def same_group(groups: list, device=None) -> torch.Tensor:
    """[n, n] bool: items i and j share a group (the caption, or a benchmark's image)."""
    keys = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    label = torch.tensor([keys[g] for g in groups], device=device)
    return label[:, None] == label[None, :]


def recall_at(scores: torch.Tensor, correct: torch.Tensor, k: int) -> float:
    """Share of rows (queries) with a correct item among their ``k`` best-scored."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return correct.gather(1, top).any(1).float().mean().item()


def _rerank(model, sims, image_embeds, ids, masks, top_k: int, rows_are_images: bool) -> torch.Tensor:
    """ITM score + ITC similarity on each row's ITC top-k, -inf elsewhere."""
    k = min(top_k, sims.shape[1])
    top = sims.topk(k, dim=1).indices
    rows = torch.arange(sims.shape[0], device=sims.device).repeat_interleave(k)
    pairs = torch.stack([rows, top.reshape(-1)], 1) if rows_are_images else torch.stack([top.reshape(-1), rows], 1)
    itm = _itm_scores(model, image_embeds, ids, masks, pairs).view(-1, k)
    out = torch.full_like(sims, float("-inf"))
    return out.scatter(1, top, itm + sims.gather(1, top))


def retrieval_metrics(ctx, source, limit: int, top_k: int = 8, group_of: dict | None = None,
                      skipped: list | None = None) -> dict[str, float]:
    """``group_of``: sample id -> the key items must share to count as right (a benchmark's
    image, so any of its captions is a hit); default: the caption text."""
    model = _unwrap(ctx.model_chunks[0])
    set_train_mode(model, False)
    batches, captions, sample_ids = eval_text_batches(ctx, source, limit, skipped)
    if not captions:
        return {"retrieval_samples": 0.0}
    image_feats, image_embeds, text_feats, ids, masks = _embed(model, batches)
    sims = torch.einsum("iqe,te->itq", image_feats, text_feats).amax(-1).float()        # [images, texts]
    correct = same_group([group_of[i] for i in sample_ids] if group_of else captions, sims.device)
    i2t_itm = _rerank(model, sims, image_embeds, ids, masks, top_k, rows_are_images=True)
    t2i_itm = _rerank(model, sims.t().contiguous(), image_embeds, ids, masks, top_k, rows_are_images=False)
    metrics = {"retrieval_samples": float(len(captions)),
               "retrieval_chance_r1": correct.float().mean().item()}
    for k in (1, 5, 10):
        metrics[f"i2t_r{k}_itc"] = recall_at(sims, correct, k)
        metrics[f"t2i_r{k}_itc"] = recall_at(sims.t(), correct, k)
        metrics[f"i2t_r{k}_itm"] = recall_at(i2t_itm, correct, k)
        metrics[f"t2i_r{k}_itm"] = recall_at(t2i_itm, correct, k)
    return metrics


def qformer_validation_loss(ctx, source, loss_fn, limit: int) -> dict[str, float]:
    for chunk in ctx.model_chunks:
        set_train_mode(chunk, False)
    batches, _, _ = eval_text_batches(ctx, source, limit)
    batches = [b for b in batches if b["text_ids"].shape[0] == ctx.micro_batch_size]
    if not batches:   # nothing to evaluate: say so instead of running an empty schedule
        return {"val/loss": float("nan")}
    with torch.no_grad():
        result = forward_backward(ctx.model_chunks, batches, loss_fn, ctx.seq_length, ctx.micro_batch_size,
                                  forward_only=True)
    return {f"val/{name}": value for name, value in result.losses.items()}


def retrieval_metrics_for_samples(ctx, samples: list) -> tuple[dict[str, float], dict[str, int]]:
    """A retrieval benchmark's (image, caption) samples (eval/benchmarks/retrieval.py); returns
    its metrics and the samples skipped by reason."""
    from megavlm.data.records import ImageRef, Record

    records = [Record(s.sample_id, [ImageRef(str(s.image), data=s.image) if isinstance(s.image, bytes)
                                    else ImageRef(str(s.image), path=Path(s.image))], turns=[("", s.question)])
               for s in samples]
    skipped: list = []
    metrics = retrieval_metrics(ctx, records, len(records), group_of={s.sample_id: s.meta["group"] for s in samples},
                                skipped=skipped)
    counts: dict[str, int] = {}
    for reason, _ in skipped:
        counts[reason] = counts.get(reason, 0) + 1
    return metrics, counts
