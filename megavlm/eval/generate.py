"""Teacher-forced token accuracy and generation over any TP/PP layout.

Both run megatron-core's schedule in forward-only mode, so the same code evaluates a model split
over pipeline stages. Generation keeps a KV cache in megatron-core's ``StaticInferenceContext``
(one per rank; each stage caches its own layers): one prefill over the shortest prompt, then one
position per step for the whole batch; a row still inside its (longer) prompt takes its next
prompt token instead of the sampled one, so right-padded prompts of different lengths need no
attention mask and give the tokens a full recomputation gives. The last stage picks the next
tokens and shares them with the other stages.

Prefix-LM models (``model.prefix_lm``) attend bidirectionally over the whole prompt: the
recomputing path gives each row its prompt length as its prefix; with the KV cache the prompts
run in groups of one length, each prefilled whole with bidirectional attention, after which every
generated token attends to everything before it (the cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megavlm.losses.lm_loss import IGNORE_INDEX
from megavlm.training.step import model_inputs, pipeline_seq_length, reduce_losses


def vocab_parallel_argmax(logits: torch.Tensor, vocab_size: int, tp_group=None,
                          exclude: int | None = None) -> torch.Tensor:
    """Argmax over the full vocabulary of logits [..., V/TP] sharded over ``tp_group``;
    ``exclude`` is a token id never chosen (the image placeholder when generating)."""
    local = logits.shape[-1]
    rank = dist.get_rank(tp_group) if tp_group is not None and dist.is_initialized() else 0
    valid = max(0, min(local, vocab_size - rank * local))
    values = logits[..., :valid].float()
    if exclude is not None and 0 <= exclude - rank * local < valid:
        values = values.clone()
        values[..., exclude - rank * local] = float("-inf")
    if valid:
        best, index = values.max(dim=-1)
    else:
        best = torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
        index = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    index = index + rank * local
    size = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    if size == 1:
        return index
    all_best = [torch.empty_like(best) for _ in range(size)]
    all_index = [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(all_best, best.contiguous(), group=tp_group)
    dist.all_gather(all_index, index.contiguous(), group=tp_group)
    stacked = torch.stack(all_best)  # ties go to the lowest rank (lowest id), like torch.argmax
    return torch.stack(all_index).gather(0, stacked.argmax(dim=0, keepdim=True)).squeeze(0)


def _run_forward(model_chunks: list, batches: list[dict], loss_fn, seq_length: int, **forward_kwargs) -> list[dict]:
    if not batches:
        return []
    schedule = get_forward_backward_func()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(**model_inputs(batch), **forward_kwargs), lambda output: loss_fn(output, batch)

    with torch.no_grad():
        return schedule(forward_step_func=forward_step, data_iterator=iter(batches), model=model_chunks,
                        num_microbatches=len(batches), seq_length=pipeline_seq_length(model_chunks, seq_length),
                        micro_batch_size=batches[0]["input_ids"].shape[0], forward_only=True)


def token_accuracy(model_chunks: list, batches: list[dict], head, seq_length: int) -> dict:
    """Per-token loss and argmax accuracy over supervised tokens (teacher forcing)."""

    def loss_fn(output, batch):
        labels = batch["labels"]
        total, tokens = head.loss(output, labels)
        mask = labels != IGNORE_INDEX
        predicted = vocab_parallel_argmax(head.logits(output), head.vocab_size, head.tp_group)
        correct = ((predicted == labels) & mask).sum()
        report = {"loss": torch.stack([total.float(), tokens.float()]),
                  "accuracy": torch.stack([correct.float(), tokens.float()])}
        return total, tokens.int(), report

    if not batches:
        return {"loss": float("nan"), "accuracy": float("nan")}
    return reduce_losses(_run_forward(model_chunks, batches, loss_fn, seq_length)).losses


# ---- generation ----------------------------------------------------------------------------
@dataclass
class SamplingConfig:
    """How the next token is chosen. ``temperature`` 0 is greedy; otherwise the logits are divided
    by it, cut to the ``top_k`` best (0: all) and to the smallest set holding ``top_p`` of the
    probability (1: all), and sampled with a generator seeded per prompt (``seed`` + the prompt's
    index in the evaluation), so results do not depend on batching or the parallel layout."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()       # text that ends an answer (cut off, not included)
    use_cache: bool = True           # False: recompute the whole sequence per token (reference path)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling settings: temperature {self.temperature} (>= 0), top_k {self.top_k} "
                             f"(>= 0), top_p {self.top_p} (in (0, 1])")


@dataclass
class Generation:
    tokens: list[int]        # generated ids (without the EOS)
    text: str                # decoded, cut at the first stop string
    finish_reason: str       # "eos", "stop" or "length"


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [b, V] with everything outside the top-k / nucleus set to -inf (always keeps the best)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p       # the mass before a token already exceeds top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def choose_next(logits: torch.Tensor, cfg: SamplingConfig, generators: list[torch.Generator],
                active: list[bool] | None = None) -> list[int]:
    """The next token of each row of full-vocabulary logits [b, V]. Only ``active`` rows draw
    from their generator (a row inside its prompt or finished does not), so a prompt's samples
    do not depend on the other prompts of its batch."""
    logits = logits.float()
    best = logits.argmax(-1).tolist()   # ties go to the lowest id
    if cfg.temperature == 0:
        return best
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1).cpu()
    active = active or [True] * len(best)
    return [int(torch.multinomial(p, 1, generator=g)) if on else b
            for p, g, on, b in zip(probs, generators, active, best)]


def _full_vocab(logits: torch.Tensor, vocab_size: int, tp_group, banned: list[int]) -> torch.Tensor:
    """[b, V/TP] (a TP shard) or [b, V_padded] (gathered by megatron-core) -> [b, vocab_size] fp32
    with ``banned`` ids at -inf. A shard is narrower than the vocabulary whenever TP > 1."""
    size = dist.get_world_size(tp_group) if tp_group is not None and dist.is_initialized() else 1
    if size > 1 and logits.shape[-1] < vocab_size:
        parts = [torch.empty_like(logits) for _ in range(size)]
        dist.all_gather(parts, logits.contiguous(), group=tp_group)
        logits = torch.cat(parts, -1)
    logits = logits[..., :vocab_size].float().clone()
    logits[..., [b for b in banned if 0 <= b < vocab_size]] = float("-inf")
    return logits


def _share_from_last_stage(obj):
    group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=group)
    return box[0]


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def supports_kv_cache(model_chunks: list) -> bool:
    """The KV cache needs a model that takes precomputed embeddings (families with image tokens;
    Flamingo's cross-attention recomputes) and no sequence parallelism (one position per step)."""
    from megavlm.models.common.vlm import VLMBase

    inner = _unwrap(model_chunks[0])
    return len(model_chunks) == 1 and isinstance(inner, VLMBase) and not inner.config.sequence_parallel


class _Batch:
    """Token buffer and per-row state of one generation batch (identical on every rank)."""

    def __init__(self, prompts: list[list[int]], total: int, pad_id: int, device):
        self.lengths = [len(p) for p in prompts]
        self.tokens = torch.full((len(prompts), total), pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            self.tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.device = device
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.reasons: list[str | None] = [None] * len(prompts)
        self.texts: list[str] = [""] * len(prompts)

    def accept(self, position: int, next_ids: list[int], eos_ids: set[int], stop: tuple[str, ...], decode) -> None:
        """``next_ids`` predicted for ``position`` + 1: rows past their prompt take them."""
        for row, token in enumerate(next_ids):
            if self.reasons[row] is not None or position + 1 < self.lengths[row]:
                continue
            if token in eos_ids:
                self.reasons[row] = "eos"
                continue
            self.generated[row].append(token)
            if position + 1 < self.tokens.shape[1]:
                self.tokens[row, position + 1] = token
            if stop and decode is not None:
                text = decode(self.generated[row])
                cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                if cut >= 0:
                    self.reasons[row], self.texts[row] = "stop", text[:cut]

    def active(self, position: int) -> list[bool]:
        """Rows whose token after ``position`` is generated (not prompt, not finished)."""
        return [r is None and position + 1 >= n for r, n in zip(self.reasons, self.lengths)]

    def finished(self, max_new_tokens: int) -> bool:
        for row, reason in enumerate(self.reasons):
            if reason is None and len(self.generated[row]) >= max_new_tokens:
                self.reasons[row] = "length"
        return all(r is not None for r in self.reasons)


def _step(model_chunks: list, batch_inputs: dict, length: int, rows: int, pick_logits, forward_kwargs: dict):
    """One forward of ``length`` positions through all stages; the last stage's ``pick_logits``."""
    schedule = get_forward_backward_func()

    def forward_step(data_iterator, model):
        inputs = next(data_iterator)
        return model(**inputs, **forward_kwargs), lambda output: (
            output.new_zeros(()), torch.zeros((), dtype=torch.int), {"next": pick_logits(output)})

    with torch.no_grad():
        out = schedule(forward_step_func=forward_step, data_iterator=iter([batch_inputs]), model=model_chunks,
                       num_microbatches=1, seq_length=pipeline_seq_length(model_chunks, length),
                       micro_batch_size=rows, forward_only=True)
    return _share_from_last_stage(out[0]["next"] if out else None)


def generate(model_chunks: list, prompts: list[list[int]], images: torch.Tensor | None, images_per_sample,
             head, tokenizer, cfg: SamplingConfig, eos_ids: set[int] | None = None, banned: list[int] = (),
             seeds: list[int] | None = None) -> list[Generation]:
    """Continue each prompt (token ids, ``<image>`` placeholders included; ``images`` [n, 3, H, W]
    in prompt order, ``images_per_sample`` per prompt). ``banned`` ids are never produced (the
    image placeholder); ``eos_ids`` end an answer (default: the tokenizer's EOS)."""
    inner = _unwrap(model_chunks[0])
    device = next(inner.parameters()).device
    eos_ids = {tokenizer.eos_id} if eos_ids is None else set(eos_ids)
    limit = inner.model_config.language.max_seq_len
    total = min(max(len(p) for p in prompts) + cfg.max_new_tokens, limit)
    if max(len(p) for p in prompts) >= limit:
        raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room to generate within the "
                         f"model's max_seq_len {limit}")
    per_sample = torch.as_tensor(images_per_sample if images_per_sample is not None else [0] * len(prompts),
                                 dtype=torch.long)
    images = images if images is not None else torch.zeros(0, 3, 1, 1)
    seeds = list(seeds) if seeds else list(range(len(prompts)))
    run = _cached if cfg.use_cache and supports_kv_cache(model_chunks) else _uncached
    if run is _cached and inner.model_config.prefix_lm and len(set(map(len, prompts))) > 1:
        return _by_prompt_length(model_chunks, prompts, images, per_sample, head, tokenizer, cfg, eos_ids, banned,
                                 seeds)
    state = _Batch(prompts, total, tokenizer.pad_id, device)
    generators = [torch.Generator().manual_seed(cfg.seed + seed) for seed in seeds]
    run(model_chunks, state, images.to(device), per_sample.to(device), head, tokenizer, cfg, eos_ids, list(banned),
        generators)
    return [Generation(tokens, state.texts[i] if state.reasons[i] == "stop" else tokenizer.decode(tokens),
                       state.reasons[i] or "length") for i, tokens in enumerate(state.generated)]


def _by_prompt_length(model_chunks, prompts, images, per_sample, head, tokenizer, cfg, eos_ids, banned, seeds):
    """Prefix-LM with the KV cache: one generation per prompt length (each prefilled whole),
    answers back in prompt order. Every rank forms the same groups."""
    starts = torch.cat([per_sample.new_zeros(1), per_sample.cumsum(0)]).tolist()
    groups: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(row)
    answers: list = [None] * len(prompts)
    for rows in groups.values():
        group_images = [images[starts[r]:starts[r + 1]] for r in rows]
        out = generate(model_chunks, [prompts[r] for r in rows], torch.cat(group_images), per_sample[rows].tolist(),
                       head, tokenizer, cfg, eos_ids, banned, [seeds[r] for r in rows])
        for row, answer in zip(rows, out):
            answers[row] = answer
    return answers


def _prefix_inputs(inner, state: "_Batch") -> dict:
    """Recomputing path: a prefix-LM model's prefix is each row's prompt."""
    if not inner.model_config.prefix_lm:
        return {}
    return {"prefix_lengths": torch.tensor(state.lengths, dtype=torch.long, device=state.device)}


def _picker(head, cfg, generators, banned, active, rows_at=None):
    """Last stage: full-vocabulary logits of each row's current position -> next ids."""
    def pick(output):
        if rows_at is not None:
            output = output[torch.arange(output.shape[0], device=output.device), rows_at()]
        else:
            output = output[:, -1]
        logits = _full_vocab(head.logits(output), head.vocab_size, head.tp_group, banned)
        return choose_next(logits, cfg, generators, active())
    return pick


def _uncached(model_chunks, state: _Batch, images, per_sample, head, tokenizer, cfg, eos_ids, banned, generators):
    """The reference: every step runs the whole buffer (prompt + answer so far + padding)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    length = -(-state.tokens.shape[1] // tp) * tp     # sequence parallelism splits the sequence over TP
    position = min(state.lengths) - 1
    current = {"pos": None}
    pick = _picker(head, cfg, generators, banned, lambda: state.active(position), rows_at=lambda: current["pos"])
    prefix = _prefix_inputs(_unwrap(model_chunks[0]), state)
    while position + 1 < state.tokens.shape[1]:
        ids = torch.full((state.tokens.shape[0], length), tokenizer.pad_id, dtype=torch.long)
        ids[:, : state.tokens.shape[1]] = state.tokens
        current["pos"] = torch.full((ids.shape[0],), position, device=state.device)
        inputs = {"input_ids": ids.to(state.device), "images": images, "images_per_sample": per_sample, **prefix}
        next_ids = _step(model_chunks, inputs, length, ids.shape[0], pick, {})
        state.accept(position, next_ids, eos_ids, cfg.stop, tokenizer.decode)
        if state.finished(cfg.max_new_tokens):
            break
        position += 1


def _cached(model_chunks, state: _Batch, images, per_sample, head, tokenizer, cfg, eos_ids, banned, generators):
    """Prefill the shortest prompt's positions, then one position per step from the KV cache."""
    from megatron.core.inference.contexts import StaticInferenceContext

    inner = _unwrap(model_chunks[0])
    rows, total = state.tokens.shape
    context = StaticInferenceContext(max_batch_size=rows, max_sequence_length=total)
    prompt_embeds = None
    if inner.pre_process:  # the prompts' embeddings, images in place, once
        longest = max(state.lengths)
        with torch.no_grad():
            prompt_embeds = inner.embed(state.tokens[:, :longest].to(state.device), images, per_sample)
    in_prompt = torch.arange(total)[:, None] < torch.tensor(state.lengths)[None, :]      # [s, b]
    start, end = 0, min(state.lengths)
    pick = _picker(head, cfg, generators, banned, lambda: state.active(end - 1))
    while True:
        inputs, forward_kwargs = {}, {"inference_context": context}
        if inner.pre_process:
            inputs["decoder_input"] = _step_embeddings(inner, state, prompt_embeds, in_prompt, start, end)
        if start == 0 and inner.model_config.prefix_lm:   # the prompts (all of one length): bidirectional
            forward_kwargs["attention_mask"] = torch.zeros(rows, 1, end, end, dtype=torch.bool, device=state.device)
        next_ids = _step(model_chunks, inputs, end - start, rows, pick, forward_kwargs)
        context.sequence_len_offset += end - start
        state.accept(end - 1, next_ids, eos_ids, cfg.stop, tokenizer.decode)
        if state.finished(cfg.max_new_tokens) or end >= total:
            break
        start, end = end, end + 1


def _step_embeddings(inner, state: _Batch, prompt_embeds, in_prompt, start: int, end: int) -> torch.Tensor:
    """[end - start, b, h]: the prompt's embeddings where a row is still in its prompt, the
    embedding of the token generated there otherwise."""
    positions = torch.arange(start, end, device=state.device).expand(state.tokens.shape[0], -1)
    with torch.no_grad():
        fresh = inner.language_model.embedding(input_ids=state.tokens[:, start:end].to(state.device),
                                               position_ids=positions)
    known = prompt_embeds[start:min(end, prompt_embeds.shape[0])]
    if known.shape[0] < end - start:
        known = torch.cat([known, fresh[known.shape[0]:]])
    return torch.where(in_prompt[start:end, :, None].to(state.device), known, fresh)
