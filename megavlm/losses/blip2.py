"""BLIP-2 stage-1 objectives on the Q-Former: ITC, ITM and ITG (after LAVIS's Blip2Qformer).

* ITC: query outputs vs the text's [CLS] output, similarity = max over the queries, learned
  temperature, label smoothing 0.1; negatives are the whole global batch: features are gathered
  over DP *with* gradients (each rank's loss reaches every rank's features).
* ITM: for every image a hard negative text and for every text a hard negative image, sampled
  from the ITC similarities over the global batch by ``torch.multinomial`` on the device (no
  per-sample host synchronisation); queries and text attend to each other, 2-way head on the
  mean of the query outputs.
* ITG: text generated from the queries under the BLIP-2 mask (queries see queries; text sees all
  queries and earlier text), BERT LM head tied to the Q-Former's word embeddings, vocab-parallel
  cross-entropy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megavlm.losses.gather import gather_no_grad, gather_with_grad, world as _world
from megavlm.losses.lm_loss import IGNORE_INDEX, vocab_parallel_cross_entropy

LABEL_SMOOTHING = 0.1


def query_mask(num_queries: int, text_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bidirectional over [queries; text] except text padding (True = masked), [b, 1, 1, s]."""
    if text_mask is None:
        return None
    b = text_mask.shape[0]
    keep = torch.cat([text_mask.new_ones(b, num_queries), text_mask], dim=1).bool()
    return ~keep[:, None, None, :]


def itg_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """[b, 1, Q+L, Q+L], True = masked: queries see only queries; text sees the queries and
    earlier (non-padding) text."""
    b, length = text_mask.shape
    s = num_queries + length
    allowed = torch.zeros(s, s, dtype=torch.bool, device=text_mask.device)
    allowed[:num_queries, :num_queries] = True
    allowed[num_queries:, :num_queries] = True
    allowed[num_queries:, num_queries:] = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()
    allowed = allowed[None, None].expand(b, 1, s, s).clone()
    allowed[:, 0, :, num_queries:] &= text_mask.bool()[:, None, :]
    return ~allowed


def itc(model, query_states: torch.Tensor, text_states: torch.Tensor):
    """(loss sum over local samples, sim_i2t, sim_t2i): sims [B, B_global] without grad."""
    heads = model.heads
    image_feats = F.normalize(heads["vision_projection"](query_states), dim=-1)     # [B, Q, E]
    text_feat = F.normalize(heads["text_projection"](text_states[:, 0]), dim=-1)    # [B, E]
    group = model.dp_group
    rank, _ = _world(group)
    image_all, text_all = gather_with_grad(image_feats, group), gather_with_grad(text_feat, group)
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, text_all).amax(-1) / model.temp
    sim_t2i = torch.einsum("be,nqe->bnq", text_feat, image_all).amax(-1) / model.temp
    b = image_feats.shape[0]
    targets = torch.arange(rank * b, rank * b + b, device=sim_i2t.device)
    loss = (F.cross_entropy(sim_i2t.float(), targets, label_smoothing=LABEL_SMOOTHING, reduction="sum")
            + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=LABEL_SMOOTHING, reduction="sum")) / 2
    return loss, sim_i2t.detach(), sim_t2i.detach()


def itm(model, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, sim_i2t, sim_t2i):
    """(loss sum over 3B pairs, 3B): positives, a hard negative text per image and a hard negative
    image per text, drawn over the global batch."""
    group = model.dp_group
    rank, _ = _world(group)
    b = text_ids.shape[0]
    image_all = gather_no_grad(image_embeds.detach(), group)
    ids_all, mask_all = gather_no_grad(text_ids, group), gather_no_grad(text_mask, group)
    with torch.no_grad():
        own = torch.arange(b, device=sim_i2t.device)
        weights_i2t = sim_i2t.float().softmax(1)
        weights_t2i = sim_t2i.float().softmax(1)
        weights_i2t[own, rank * b + own] = 0.0   # never the positive
        weights_t2i[own, rank * b + own] = 0.0
        neg_text = torch.multinomial(weights_i2t + 1e-12, 1).squeeze(1)
        neg_image = torch.multinomial(weights_t2i + 1e-12, 1).squeeze(1)
    ids = torch.cat([text_ids, text_ids, ids_all[neg_text]])
    masks = torch.cat([text_mask, text_mask, mask_all[neg_text]])
    images = torch.cat([image_embeds, image_all[neg_image], image_embeds])
    q = model.model_config.qformer.num_query_tokens
    hidden = model.qformer(image=images, text_ids=ids, mask=query_mask(q, masks))
    logits = model.heads["itm"](hidden[:, :q]).mean(1)
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(logits.device)
    return F.cross_entropy(logits.float(), labels, reduction="sum"), 3 * b


def itg(model, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, dec_id: int):
    """(loss sum over predicted text tokens, their count)."""
    q = model.model_config.qformer.num_query_tokens
    dec_ids = text_ids.clone()
    dec_ids[:, 0] = dec_id
    labels = torch.full_like(text_ids, IGNORE_INDEX)
    labels[:, :-1] = text_ids[:, 1:].masked_fill(~text_mask[:, 1:].bool(), IGNORE_INDEX)
    hidden = model.qformer(image=image_embeds, text_ids=dec_ids, mask=itg_mask(q, text_mask))
    logits = model.itg_logits(hidden[:, q:])
    keep = labels != IGNORE_INDEX
    losses = vocab_parallel_cross_entropy(logits, labels, model.model_config.qformer.vocab_size, model.tp_group)
    return (losses * keep).sum(), keep.sum()


def stage1_losses(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> dict:
    """{'itc' | 'itm' | 'itg': (loss sum, normaliser)} for one micro-batch."""
    image_embeds = model.image_features(images)
    query_states = model.qformer(image=image_embeds)
    text_states = model.qformer(text_ids=text_ids, mask=query_mask(0, text_mask), use_queries=False)
    itc_loss, sim_i2t, sim_t2i = itc(model, query_states, text_states)
    itm_loss, itm_count = itm(model, image_embeds, text_ids, text_mask, sim_i2t, sim_t2i)
    itg_loss, itg_count = itg(model, image_embeds, text_ids, text_mask, model.model_config.qformer.dec_token_id)
    b = text_ids.shape[0]
    return {"itc": (itc_loss, b), "itm": (itm_loss, itm_count), "itg": (itg_loss, itg_count)}
