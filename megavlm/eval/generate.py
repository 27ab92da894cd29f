"""Teacher-forced token accuracy and greedy generation over any TP/PP layout.

Both run megatron-core's schedule in forward-only mode, so the same code evaluates a model split
over pipeline stages; the vocab-parallel argmax is all-reduced over the TP group and the last
stage's results are shared with the other stages.
"""
from __future__ import annotations

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


def _run_forward(model_chunks: list, batches: list[dict], loss_fn, seq_length: int) -> list[dict]:
    schedule = get_forward_backward_func()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(**model_inputs(batch)), lambda output: loss_fn(output, batch)

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

    return reduce_losses(_run_forward(model_chunks, batches, loss_fn, seq_length)).losses


def _share_from_last_stage(obj):
    group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=group)
    return box[0]


def greedy_generate(model_chunks: list, batch: dict, prompt_lengths: list[int], head, eos_id: int,
                    max_new_tokens: int, exclude: int | None = None) -> list[list[int]]:
    """Greedy continuation of right-padded prompts (one micro-batch). Recomputes the whole
    sequence per token (no KV cache): meant for evaluation-sized answers."""
    ids = batch["input_ids"].clone()
    seq_length = ids.shape[1]
    positions = torch.tensor(prompt_lengths, device=ids.device) - 1
    generated: list[list[int]] = [[] for _ in prompt_lengths]
    done = [False] * len(prompt_lengths)

    def loss_fn(output, _batch):
        rows = torch.arange(output.shape[0], device=output.device)
        last = head.logits(output[rows, positions])
        next_ids = vocab_parallel_argmax(last, head.vocab_size, head.tp_group, exclude)
        return output.new_zeros(()), torch.zeros((), dtype=torch.int), {"next": next_ids}

    for _ in range(max_new_tokens):
        if all(done) or int(positions.max()) + 1 >= seq_length:
            break
        step_batch = dict(batch, input_ids=ids)
        out = _run_forward(model_chunks, [step_batch], loss_fn, seq_length)
        next_ids = _share_from_last_stage(out[0]["next"].tolist() if out else None)
        for row, token in enumerate(next_ids):
            if done[row]:
                continue
            if token == eos_id:
                done[row] = True
                continue
            generated[row].append(token)
            ids[row, positions[row] + 1] = token
        positions = positions + 1
    return generated
