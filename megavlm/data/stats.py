"""What a training set holds, from its records alone (no images decoded): the sample count, and
the mean tokens and images per sample over an even spread of records, each encoded as the
trainer encodes it (chat template, image tokens). The planner prices a run with these."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megavlm.config.schema import ConfigError
from megavlm.data.templates import BadSample
from megavlm.data.tokenizer import IMAGE_TOKEN


@dataclass
class DataStats:
    samples: int                    # records per epoch (a mixture: its epoch size)
    mean_tokens: float | None       # None: no tokenizer to measure with
    mean_images: float | None
    measured: int = 0               # records encoded for the means
    bad: int = 0                    # of those, records the trainer would skip

    def describe(self, source: str) -> str:
        if self.mean_tokens is None:
            return f"{self.samples:,} samples ({source})"
        return (f"{self.samples:,} samples ({source}); {self.mean_tokens:.0f} tokens and {self.mean_images:.2f} "
                f"images per sample, the mean over {self.measured:,} records spread over the set"
                + (f" ({self.bad} would be skipped)" if self.bad else ""))


def _record_length(record, encoder, image_tokens: int, text_only: bool) -> int:
    """Tokens of one record as the trainer encodes it (one view per image: tiles are not planned
    without decoding the image). ``text_only``: BLIP-2's stage 1, [bos] caption [eos] for the Q-Former."""
    if text_only:
        return len(encoder.tok.bos_ids) + len(encoder.tok.encode(record.turns[0][1])) + 1
    if record.segments is None:
        ids, _ = encoder.encode(record.turns, len(record.images), record.sample_id)
        return len(ids)
    tok = encoder.tok
    text = sum(len(tok.encode(value)) for kind, value in record.segments if kind == "text")
    return len(tok.bos_ids) + text + image_tokens * len(record.images) + 1


def dataset_statistics(recipe, max_records: int = 2000) -> DataStats:
    """Counts ``recipe``'s training set; measures the means when its tokenizer exists. Raises
    ConfigError (naming the key and file) when the data cannot be opened."""
    from megavlm.data.build import encoder_for, training_dataset
    from megavlm.data.examples import without_images
    from megavlm.data.tokenizer import load_tokenizer

    data, model = recipe.data, recipe.model
    dataset = training_dataset(data)
    stats = DataStats(samples=len(dataset), mean_tokens=None, mean_images=None)
    if not data.tokenizer or not Path(data.tokenizer).exists():
        return stats
    tok = load_tokenizer(data.tokenizer, data.added_tokens, data.image_piece,
                         require_image_token=model.head != "contrastive")
    encoder = encoder_for(model, tok, data.template)
    stride = max(1, len(dataset) // max_records)
    tokens = images = 0
    for index in range(0, len(dataset), stride)[:max_records]:
        stats.measured += 1
        try:
            record = without_images(dataset[index]) if data.drop_images else dataset[index]
            length = _record_length(record, encoder, model.image_tokens, model.head == "qformer")
            tokens += min(length, recipe.train.seq_length)
            images += len(record.images)
        except BadSample:
            stats.bad += 1
    good = stats.measured - stats.bad
    if good == 0:
        raise ConfigError(f"bad value for 'data.train': none of the {stats.measured} records measured could be "
                          f"encoded (e.g. every {IMAGE_TOKEN} tag mismatched)")
    stats.mean_tokens, stats.mean_images = tokens / good, images / good
    return stats
