"""Held-out metrics that show whether the model uses the image: caption token accuracy (teacher
forced) and VQA exact match (greedy), each next to the same model's score on a blank image."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megavlm.data.datasets import CaptionDataset, load_image
from megavlm.data.image_transforms import blank_image
from megavlm.data.loader import FixedShapeCollate, SafeDataset
from megavlm.data.templates import BadSample, ConversationEncoder, get_template, normalize_turns
from megavlm.eval.generate import greedy_generate, token_accuracy
from megavlm.training.stages import set_train_mode


@dataclass
class EvalContext:
    model_chunks: list          # DDP-wrapped or plain chunks of this rank
    tokenizer: object
    model_cfg: object
    head: object                # losses/lm_loss.py head: loss and logits from the last stage's output
    seq_length: int
    micro_batch_size: int
    device: torch.device


def _blank(batch: dict, size: int) -> dict:
    n = batch["images"].shape[0]
    return dict(batch, images=blank_image(size).expand(n, -1, -1, -1).contiguous().to(batch["images"].device))


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _micro_batches(dataset, ctx: EvalContext, limit: int) -> list[dict]:
    collate = FixedShapeCollate(ctx.seq_length, ctx.tokenizer.pad_id, ctx.model_cfg.vision.image_size)
    safe = SafeDataset(dataset)
    n = min(limit, len(dataset)) // ctx.micro_batch_size * ctx.micro_batch_size
    return [_to_device(collate([safe[i] for i in range(s, s + ctx.micro_batch_size)]), ctx.device)
            for s in range(0, n, ctx.micro_batch_size)]


def teacher_forced(ctx: EvalContext, dataset, limit: int, blank: bool) -> dict:
    batches = _micro_batches(dataset, ctx, limit)
    if blank:
        batches = [_blank(b, ctx.model_cfg.vision.image_size) for b in batches]
    return token_accuracy(ctx.model_chunks, batches, ctx.head, ctx.seq_length)


def _vqa_items(path: Path, encoder: ConversationEncoder, cfg, seq_length: int, limit: int) -> list[dict]:
    records = json.loads(path.read_text())
    items = []
    for index, record in enumerate(records[:limit]):
        sample_id = str(record.get("id", index))
        try:
            question, answer = normalize_turns(record.get("conversations"), sample_id)[0]
            image = record.get("image")
            paths = [image] if isinstance(image, str) else list(image or [])
            prompt = encoder.encode_prompt([], question, len(paths), sample_id)
            if len(prompt) + 8 > seq_length:
                continue
            images = [load_image(path.parent / p, cfg.vision.image_size, sample_id) for p in paths]
        except BadSample:
            continue
        items.append({"prompt": prompt, "answer": answer, "images": images})
    return items


def _normalize_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def vqa_exact_match(ctx: EvalContext, path: Path, template: str, limit: int, max_new_tokens: int,
                    blank: bool) -> dict:
    cfg = ctx.model_cfg
    encoder = ConversationEncoder(ctx.tokenizer, get_template(template), cfg.vision.tokens_per_image, cfg.image_token_id)
    items = _vqa_items(path, encoder, cfg, ctx.seq_length, limit)
    size = cfg.vision.image_size
    correct = 0
    mbs = ctx.micro_batch_size
    for start in range(0, len(items) - len(items) % mbs, mbs):
        chunk = items[start: start + mbs]
        ids = torch.full((mbs, ctx.seq_length), ctx.tokenizer.pad_id, dtype=torch.long)
        for row, item in enumerate(chunk):
            ids[row, : len(item["prompt"])] = torch.tensor(item["prompt"])
        images = [img for item in chunk for img in item["images"]]
        pixel = torch.stack(images) if images else torch.zeros(0, 3, size, size)
        if blank and images:
            pixel = blank_image(size).expand(len(images), -1, -1, -1).contiguous()
        batch = _to_device({"input_ids": ids, "images": pixel,
                            "images_per_sample": torch.tensor([len(i["images"]) for i in chunk])}, ctx.device)
        outputs = greedy_generate(ctx.model_chunks, batch, [len(i["prompt"]) for i in chunk], ctx.head,
                                  ctx.tokenizer.eos_id, max_new_tokens, exclude=cfg.image_token_id)
        for item, out in zip(chunk, outputs):
            correct += _normalize_answer(ctx.tokenizer.decode(out)) == _normalize_answer(item["answer"])
    evaluated = len(items) - len(items) % mbs
    return {"exact_match": correct / max(evaluated, 1), "samples": evaluated}


def evaluate_vlm(ctx: EvalContext, eval_cfg, template: str) -> dict[str, float]:
    """The metrics the recipe asks for, with and without the image."""
    for chunk in ctx.model_chunks:
        set_train_mode(chunk, False)
    cfg = ctx.model_cfg
    metrics: dict[str, float] = {}
    variants = [("", False)] + ([("_blank", True)] if eval_cfg.blank_image_baseline else [])
    if eval_cfg.captions:
        plain = ConversationEncoder(ctx.tokenizer, get_template("plain"), cfg.vision.tokens_per_image, cfg.image_token_id)
        captions = CaptionDataset(eval_cfg.captions, plain, cfg.vision.image_size, ctx.seq_length)
        for suffix, blank in variants:
            result = teacher_forced(ctx, captions, eval_cfg.max_samples, blank)
            metrics[f"caption_token_accuracy{suffix}"] = result["accuracy"]
    if eval_cfg.vqa:
        for suffix, blank in variants:
            result = vqa_exact_match(ctx, Path(eval_cfg.vqa), template, eval_cfg.max_samples, eval_cfg.max_new_tokens,
                                     blank)
            metrics[f"vqa_exact_match{suffix}"] = result["exact_match"]
    return metrics


def validation_loss(ctx: EvalContext, dataset, limit: int) -> dict[str, float]:
    for chunk in ctx.model_chunks:
        set_train_mode(chunk, False)
    result = teacher_forced(ctx, dataset, limit, blank=False)
    return {"val/loss": result["loss"], "val/token_accuracy": result["accuracy"]}
