"""Per-step micro-batches for the trainer: records -> examples -> decoded images -> collation,
with skipped-sample accounting and the next step prepared in the background.

A sample that cannot be used (malformed record, missing/corrupt/degenerate image, more
``<image>`` tags than images, over-length, too many images) is skipped and counted by reason
(``SkipCounter``: logged, saved with checkpoints); the run stops with an error naming the last bad
sample only when the skip budget is exceeded. One bad sample never crashes an epoch. A template
mismatch is not a bad sample but a bad recipe: it stops the run at the first sample. Text the
tokenizer cannot spell is counted as ``unrepresentable_text``, and trains unless
``data.unrepresentable_text: skip``.
"""
from __future__ import annotations

import collections
import concurrent.futures
import copy
import logging
import threading
from dataclasses import dataclass

from megavlm.data.collate import packed_batches, padded_batches, text_batches
from megavlm.data.templates import BadSample, TemplateMismatch

log = logging.getLogger(__name__)

# Every reason a sample is skipped (or, for unrepresentable_text, flagged); "other" for reasons a
# custom source may raise.
SKIP_REASONS = ("missing_image", "corrupt_image", "bad_image_shape", "malformed_record", "image_tag_mismatch",
                "too_many_images", "over_length", "unrepresentable_text", "other")


class SkipBudgetExceeded(RuntimeError):
    pass


class SkipCounter:
    """Samples skipped so far, by reason. ``kept_reasons``: reasons counted and reported but not
    skipped (so outside the budget), e.g. unrepresentable_text trained with unknown pieces."""

    def __init__(self, max_fraction: float = 0.01, min_budget: int = 10, kept_reasons=()):
        self.counts: collections.Counter = collections.Counter()
        self.seen = 0
        self.max_fraction, self.min_budget, self.kept_reasons = max_fraction, min_budget, set(kept_reasons)

    @property
    def skipped(self) -> int:
        return sum(n for r, n in self.counts.items() if r not in self.kept_reasons)

    def update(self, seen: int, reason_counts: dict[str, int], last_message: str = "") -> None:
        """Add one step's skips (already summed over data-parallel ranks); raise over budget."""
        self.seen += seen
        self.counts.update({r: n for r, n in reason_counts.items() if n})
        total = self.skipped
        budget = max(self.min_budget, self.max_fraction * self.seen)
        if any(n for r, n in reason_counts.items() if r not in self.kept_reasons) and total > budget:
            skipped = {r: n for r, n in self.counts.items() if r not in self.kept_reasons}
            raise SkipBudgetExceeded(
                f"{total} of {self.seen} samples were skipped ({skipped}), over the budget of {budget:.0f} "
                f"(data.max_skip_fraction={self.max_fraction}, data.min_skip_budget={self.min_budget})"
                + (f"; last: {last_message}" if last_message else ""))

    def summary(self) -> str:
        """One line for the end of the run."""
        if not self.counts:
            return f"skipped samples: none of {self.seen}"
        parts = ", ".join(f"{r} {n}" + (" (trained)" if r in self.kept_reasons else "")
                          for r, n in sorted(self.counts.items()))
        return f"skipped samples: {self.skipped} of {self.seen} ({parts})"

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.counts = collections.Counter(state.get("counts", {}))
        self.seen = int(state.get("seen", 0))


def load_examples(dataset, builder, backend, indices: list[int], epoch: int, pool=None) -> tuple[list, list]:
    """(examples with decoded ``pixels``, [(reason, message)] of skipped samples), in index order."""
    examples, skipped = [], []
    for index in indices:
        try:
            examples.append(builder.build(dataset[index], index, epoch))
        except TemplateMismatch:
            raise
        except BadSample as err:
            skipped.append((err.reason, str(err)))
    items = [(data, aug, ex.sample_id, source) for ex in examples for data, aug, source in ex.images]
    if pool is not None and backend.name == "pil" and len(items) > 1:
        decoded = [r for chunk in pool.map(lambda it: backend.decode([it]), items) for r in chunk]
    else:
        decoded = backend.decode(items)
    kept, cursor = [], 0
    for ex in examples:
        results = decoded[cursor: cursor + len(ex.images)]
        cursor += len(ex.images)
        bad = next((r for r in results if isinstance(r, BadSample)), None)
        if bad is not None:
            skipped.append((bad.reason, str(bad)))
            continue
        ex.pixels = results
        kept.append(ex)
    return kept, skipped


@dataclass
class LoaderConfig:
    seq_length: int
    micro_batch_size: int
    pad_id: int
    image_size: int | tuple      # the ViT's input side, or the shape of one raw patch input (data/collate.py)
    packing: bool = False
    workers: int = 0
    prefetch: bool = True
    collate: str = "lm"          # "lm": token ids + labels; "text": the Q-Former's image-text pairs
    prefix_lm: bool = False      # batches carry each sample's prefix length (prefix-LM attention)


class StepLoader:
    """``next_step()`` -> (micro-batches, skipped) for this rank's share of the next global batch.
    ``consumed_state`` is the sampler position after the last step handed out (for checkpoints),
    even while the following step is already being prepared."""

    def __init__(self, dataset, builder, sampler, backend, cfg: LoaderConfig):
        self.dataset, self.builder, self.sampler, self.backend, self.cfg = dataset, builder, sampler, backend, cfg
        self.pool = concurrent.futures.ThreadPoolExecutor(cfg.workers) if cfg.workers > 0 else None
        self.consumed_state = copy.deepcopy(sampler.state)
        self._pending = None
        self._lock = threading.Lock()

    def _produce(self):
        micro = self.sampler.next_step()
        epoch = self.sampler.state.epoch
        indices = [i for mb in micro for i in mb]
        examples, skipped = load_examples(self.dataset, self.builder, self.backend, indices, epoch, self.pool)
        skipped += [note for ex in examples for note in ex.notes]
        c = self.cfg
        if c.collate == "text":
            batches = text_batches(examples, c.micro_batch_size, len(micro), c.seq_length, c.pad_id, c.image_size)
        elif c.packing:
            batches = packed_batches(examples, c.seq_length, c.pad_id, c.image_size, c.prefix_lm)
        else:
            batches = padded_batches(examples, c.micro_batch_size, len(micro), c.seq_length, c.pad_id, c.image_size,
                                     c.prefix_lm)
        return batches, skipped, copy.deepcopy(self.sampler.state)

    def _start(self):
        if not self.cfg.prefetch:
            return None
        box: dict = {}

        def work():
            try:
                box["value"] = self._produce()
            except BaseException as err:  # surfaced in the main thread by next_step
                box["error"] = err

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return thread, box

    def next_step(self) -> tuple[list[dict], list[tuple[str, str]]]:
        """(micro-batches, [(reason, message)] of the samples skipped or flagged)."""
        if self._pending is None:
            value = self._produce()
        else:
            thread, box = self._pending
            thread.join()
            if "error" in box:
                raise box["error"]
            value = box["value"]
        batches, skipped, state = value
        self.consumed_state = state
        self._pending = self._start()
        return batches, skipped

    def reset(self, state) -> None:
        """Continue from a sampler position (resume); drops a step prepared in the background."""
        if self._pending is not None:
            self._pending[0].join()
            self._pending = None
        self.sampler.state = copy.deepcopy(state)
        self.consumed_state = copy.deepcopy(state)
