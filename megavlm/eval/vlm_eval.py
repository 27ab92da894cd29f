"""Held-out metrics that show whether the model uses the image: caption token accuracy (teacher
forced) and VQA exact match (greedy), each next to the same model's score on a blank image."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megavlm.data.augment import ImageAug
from megavlm.data.build import encoder_for, image_backend, image_input_size, open_eval_source
from megavlm.data.collate import image_inputs, pad_micro_batch
from megavlm.data.examples import Example, ExampleBuilder
from megavlm.data.images import blank_like
from megavlm.data.loader import load_examples
from megavlm.data.templates import BadSample, shifted_labels
from megavlm.eval.generate import SamplingConfig, generate, token_accuracy
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
    end_of_chunk: str | None = None   # interleaved text: the marker after each chunk (data.end_of_chunk)
    tiler: object = None              # image layout planner: InternVL tiles or raw patch grids (data/build.py)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _with_blank_images(batch: dict, model_cfg) -> dict:
    return dict(batch, images=blank_like(batch["images"], model_cfg.image_mean, model_cfg.image_std))


def eval_micro_batches(ctx: EvalContext, source, template: str, limit: int) -> list[dict]:
    """Padded micro-batches of the first ``limit`` usable samples (PIL decoding, no augmentation);
    the last one is filled up with padding rows (no supervised tokens), so every sample counts."""
    cfg = ctx.model_cfg
    builder = ExampleBuilder(encoder_for(cfg, ctx.tokenizer, template), ctx.seq_length, end_of_chunk=ctx.end_of_chunk,
                             tiler=ctx.tiler)
    examples, _ = load_examples(source, builder, image_backend(cfg), list(range(min(limit, len(source)))), 0)
    return _padded(ctx, examples)


def _padded(ctx: EvalContext, examples: list) -> list[dict]:
    mbs = ctx.micro_batch_size
    return [_to_device(pad_micro_batch(examples[i:i + mbs], mbs, ctx.seq_length, ctx.tokenizer.pad_id,
                                       image_input_size(ctx.model_cfg), ctx.model_cfg.prefix_lm), ctx.device)
            for i in range(0, len(examples), mbs)]


def teacher_forced(ctx: EvalContext, source, template: str, limit: int, blank: bool) -> dict:
    batches = eval_micro_batches(ctx, source, template, limit)
    if blank:
        batches = [_with_blank_images(b, ctx.model_cfg) for b in batches]
    samples = sum(len(b["sample_ids"]) for b in batches)
    return dict(token_accuracy(ctx.model_chunks, batches, ctx.head, ctx.seq_length), samples=samples)


def _vqa_items(ctx: EvalContext, source, template: str, limit: int) -> list[dict]:
    """First question of each conversation: its prompt ids, the reference answer, decoded images."""
    cfg = ctx.model_cfg
    encoder = encoder_for(cfg, ctx.tokenizer, template)
    backend = image_backend(cfg)
    items = []
    for index in range(min(limit, len(source))):
        try:
            record = source[index]
            question, answer = record.turns[0]
            data = [(ref.read(record.sample_id), ImageAug(), ref.source) for ref in record.images]
            views = [1] * len(data)
            if ctx.tiler is not None:
                planned = [ctx.tiler.plan(d, aug, record.sample_id, src) for d, aug, src in data]
                data = [(d, aug, src) for (d, _, src), (aug, _) in zip(data, planned)]
                views = [v for _, v in planned]
            prompt = encoder.encode_prompt([], question, len(record.images), record.sample_id, views)
        except BadSample:
            continue
        pixels = backend.decode([(d, aug, record.sample_id, src) for d, aug, src in data])
        if len(prompt) + 8 > ctx.seq_length or any(isinstance(p, BadSample) for p in pixels):
            continue
        items.append({"prompt": prompt, "answer": answer, "images": [image_inputs(t) for t in pixels],
                      "data": [d for d, _, _ in data], "sample_id": record.sample_id})
    return items


def _normalize_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def _answers(ctx: EvalContext, items: list[dict], max_new_tokens: int, blank: bool) -> list[str]:
    """Greedy answers to each item's prompt (with its images, or blank ones)."""
    cfg = ctx.model_cfg
    mbs = ctx.micro_batch_size
    # never a placeholder (<image>, image-newline), nor the vocabulary rows past the tokenizer's
    # pieces (nothing decodes them)
    banned = [*cfg.placeholder_ids, *range(ctx.tokenizer.vocab_size, cfg.language.vocab_size)]
    answers = []
    for start in range(0, len(items), mbs):
        chunk = items[start: start + mbs]
        images = [img for item in chunk for img in item["images"]]
        pixel = torch.cat(images) if images else None
        if blank and images:
            pixel = blank_like(pixel, cfg.image_mean, cfg.image_std)
        per_sample = [sum(t.shape[0] for t in i["images"]) for i in chunk]
        outputs = generate(ctx.model_chunks, [i["prompt"] for i in chunk], pixel, per_sample, ctx.head, ctx.tokenizer,
                           SamplingConfig(max_new_tokens=max_new_tokens), banned=banned)
        answers += [out.text for out in outputs]
    return answers


def vqa_exact_match(ctx: EvalContext, source, template: str, limit: int, max_new_tokens: int, blank: bool) -> dict:
    items = _vqa_items(ctx, source, template, limit)
    answers = _answers(ctx, items, max_new_tokens, blank)
    correct = sum(_normalize_answer(a) == _normalize_answer(item["answer"]) for a, item in zip(answers, items))
    return {"exact_match": correct / len(items) if items else float("nan"), "samples": len(items)}


def clip_similarity(ctx: EvalContext, source, limit: int, max_new_tokens: int, scorer, blank_baseline: bool) -> dict:
    """The mean CLIP similarity of each image with the caption the model generates for it
    (``clip_similarity``), with the caption it generates for a blank image (``_blank``: the floor
    of a model that ignores the image) and with the reference caption (``_reference``)."""
    items = [i for i in _vqa_items(ctx, source, "plain", limit) if len(i["data"]) == 1]
    if not items:
        return {}
    pixels = scorer.decode_images([i["data"][0] for i in items], [i["sample_id"] for i in items])
    keep = [k for k, p in enumerate(pixels) if torch.is_tensor(p)]
    items, pixels = [items[k] for k in keep], torch.stack([pixels[k] for k in keep])
    metrics = {"clip_similarity_reference": scorer.similarity(pixels, [i["answer"] for i in items]).mean().item()}
    for suffix, blank in [("", False)] + ([("_blank", True)] if blank_baseline else []):
        metrics[f"clip_similarity{suffix}"] = scorer.similarity(pixels, _answers(ctx, items, max_new_tokens,
                                                                                 blank)).mean().item()
    return metrics


def _few_shot_examples(ctx: EvalContext, source, shots: int, limit: int) -> list[Example]:
    """Query i: ``shots`` other image-caption pairs of ``source`` (the next ones, cyclically),
    then image i and its caption, in the interleaved layout the model trained on:
    ``<bos> <image> caption <eoc> ... <image> caption <eoc>``; labels on the query caption only."""
    tok, encoder = ctx.tokenizer, encoder_for(ctx.model_cfg, ctx.tokenizer, "plain")
    end = tok.encode_marker(ctx.end_of_chunk) if ctx.end_of_chunk else []
    backend = image_backend(ctx.model_cfg)
    examples = []
    for index in range(min(limit, len(source))):
        picks = [(index + 1 + j) % len(source) for j in range(shots)] + [index]
        ids, images = list(tok.bos_ids), []
        supervised = [False] * len(ids)
        try:
            for n, pick in enumerate(picks):
                record = source[pick]
                ref, caption = record.images[0], record.turns[0][1]
                data, aug, view = ref.read(record.sample_id), ImageAug(), 1
                if ctx.tiler is not None:
                    aug, view = ctx.tiler.plan(data, aug, record.sample_id, ref.source)
                piece, image = tok.encode(caption) + end, encoder.image_ids(view)
                ids += image + piece
                supervised += [False] * len(image) + [n == shots] * len(piece)
                images.append((data, aug, record.sample_id, ref.source))
        except BadSample:
            continue
        pixels = backend.decode(images)
        if len(ids) > ctx.seq_length or any(isinstance(p, BadSample) for p in pixels):
            continue
        examples.append(Example(f"{source[index].sample_id}@{shots}shot", ids, shifted_labels(ids, supervised), [],
                                pixels=list(pixels)))
    return examples


def few_shot_captioning(ctx: EvalContext, source, shots: int, limit: int, blank: bool) -> dict:
    """Teacher-forced token accuracy on the query caption; ``blank``: the query image (only) blank."""
    examples = _few_shot_examples(ctx, source, shots, limit)
    if blank:
        cfg = ctx.model_cfg
        for ex in examples:
            ex.pixels[-1] = blank_like(ex.pixels[-1], cfg.image_mean, cfg.image_std)
    return dict(token_accuracy(ctx.model_chunks, _padded(ctx, examples), ctx.head, ctx.seq_length),
                samples=len(examples))


def evaluate_vlm(ctx: EvalContext, eval_cfg, template: str, clip_scorer=None) -> dict[str, float]:
    """The metrics the recipe asks for, with and without the image; ``clip_scorer``
    (eval/clip_score.py, from eval.clip_model): the CLIP similarity of generated captions."""
    for chunk in ctx.model_chunks:
        set_train_mode(chunk, False)
    metrics: dict[str, float] = {}
    variants = [("", False)] + ([("_blank", True)] if eval_cfg.blank_image_baseline else [])
    if eval_cfg.captions:
        captions = open_eval_source(eval_cfg.captions, "captions", None, "eval.captions")
        for suffix, blank in variants:
            metrics[f"caption_token_accuracy{suffix}"] = teacher_forced(ctx, captions, "plain", eval_cfg.max_samples,
                                                                        blank)["accuracy"]
    if eval_cfg.vqa:
        vqa = open_eval_source(eval_cfg.vqa, "conversations", None, "eval.vqa")
        for suffix, blank in variants:
            result = vqa_exact_match(ctx, vqa, template, eval_cfg.max_samples, eval_cfg.max_new_tokens, blank)
            metrics[f"vqa_exact_match{suffix}"] = result["exact_match"]
    if eval_cfg.few_shot_captions:
        captions = open_eval_source(eval_cfg.few_shot_captions, "captions", None, "eval.few_shot_captions")
        for shots in eval_cfg.few_shot:
            for suffix, blank in variants:
                result = few_shot_captioning(ctx, captions, shots, eval_cfg.max_samples, blank)
                metrics[f"caption_{shots}shot_token_accuracy{suffix}"] = result["accuracy"]
    if clip_scorer is not None and eval_cfg.captions:
        captions = open_eval_source(eval_cfg.captions, "captions", None, "eval.captions")
        metrics.update(clip_similarity(ctx, captions, eval_cfg.max_samples, eval_cfg.caption_max_new_tokens,
                                       clip_scorer, eval_cfg.blank_image_baseline))
    return metrics


def validation_loss(ctx: EvalContext, source, template: str, limit: int) -> dict[str, float]:
    for chunk in ctx.model_chunks:
        set_train_mode(chunk, False)
    result = teacher_forced(ctx, source, template, limit, blank=False)
    return {"val/loss": result["loss"], "val/token_accuracy": result["accuracy"]}
