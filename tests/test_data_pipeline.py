"""The data pipeline: formats, shards, masking per template, packing, augmentation, mixtures,
resumable order, DALI vs PIL, and every kind of bad input."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megavlm.data.augment import ImageAug, augment_record, swap_left_right
from megavlm.data.build import encoder_for
from megavlm.data.collate import pack_row, pad_micro_batch, padded_batches, padding_fraction
from megavlm.data.examples import ExampleBuilder
from megavlm.data.images import DALIBackend, PILBackend, clip_reference, pil_preprocess, to_rgb
from megavlm.data.loader import LoaderConfig, SkipBudgetExceeded, SkipCounter, StepLoader, load_examples
from megavlm.data.mixture import MixtureDataset, curriculum_order
from megavlm.data.records import open_source
from megavlm.data.sampler import GlobalBatchSampler
from megavlm.data.shards import write_shards
from megavlm.data.templates import TEMPLATES, ConversationEncoder, TemplateMismatch, get_template
from megavlm.data.tokenizer import load_tokenizer
from megavlm.losses.lm_loss import IGNORE_INDEX
from megavlm.models.registry import flavor_config

CFG = flavor_config("llava", "debug")
TOKENS = CFG.vision.tokens_per_image


@pytest.fixture(scope="module")
def tok(small_embedded):
    return load_tokenizer(small_embedded / "tokenizer.model")


def _jpeg(path: Path, size=(64, 48), color=(200, 30, 30), mode="RGB", fmt="JPEG") -> Path:
    Image.new(mode, size, color if mode != "L" else 120).save(path, format=fmt)
    return path


# ---- templates and masking ---------------------------------------------------------------------
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_multi_turn_labels_cover_exactly_the_assistant_turns(tok, template):
    enc = ConversationEncoder(tok, get_template(template), 4, tok.image_token_id)
    turns = [("<image>\nHow many red circles are there?", "two"), ("What color is the background?", "white"),
             ("What shape is on the right?", "a blue square")]
    ids, supervised = enc.encode(turns, 1, "t")
    assert ids.count(tok.image_token_id) == 4
    spans, current = [], []
    for i, s in zip(ids, supervised):
        if s:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    end = [tok.eos_id] if get_template(template).end == "<eos>" else tok.encode(get_template(template).end)
    assert [tok.decode(s[: len(s) - len(end)]) for s in spans] == ["two", "white", "a blue square"]
    assert all(s[len(s) - len(end):] == end for s in spans)


def test_template_mismatch_names_the_sample(tok):
    class Lossy:  # changes the text without reporting unknown characters: a real template/tokenizer mismatch
        bos_id, bos_ids, eos_id, path = tok.bos_id, tok.bos_ids, tok.eos_id, "lossy.model"

        def encode(self, text):
            return tok.encode(text.replace("zebra", "??"))

        def decode(self, ids):
            return tok.decode(ids)

    enc = ConversationEncoder(Lossy(), get_template("vicuna_v1"), 4, tok.image_token_id)
    with pytest.raises(TemplateMismatch, match=r"sample s7: supervised tokens decode to .* expected .*'a zebra'"):
        enc.encode([("<image>\nWhat animal?", "a zebra")], 1, "s7")


# ---- formats -----------------------------------------------------------------------------------
def test_interleaved_documents_keep_reading_order(tmp_path, tok):
    _jpeg(tmp_path / "a.jpg")
    _jpeg(tmp_path / "b.jpg", color=(0, 0, 255))
    doc = {"id": "doc1", "content": [{"text": "a red square"}, {"image": "a.jpg"}, {"text": "then"},
                                     {"image": "b.jpg"}, {"text": "a blue one"}]}
    (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n")
    source = open_source(tmp_path / "docs.jsonl", "interleaved")
    builder = ExampleBuilder(ConversationEncoder(tok, get_template("plain"), 1, tok.image_token_id), 64)
    ex = builder.build(source[0], 0, 0)
    image_positions = [i for i, t in enumerate(ex.input_ids) if t == tok.image_token_id]
    assert len(image_positions) == 2 and len(ex.images) == 2
    text_between = tok.decode(ex.input_ids[image_positions[0] + 1: image_positions[1]])
    assert text_between == "then"
    supervised_targets = [l for l in ex.labels if l != IGNORE_INDEX]
    assert tok.image_token_id not in supervised_targets  # images are never targets
    assert tok.decode([t for t in supervised_targets if t != tok.eos_id]) == "a red square then a blue one"


def test_shards_round_trip_with_random_access(small_embedded, tmp_path):
    report = write_shards(small_embedded / "conversations_val.json", "conversations", tmp_path / "shards",
                          samples_per_shard=16)
    assert report.samples == 48 and len(report.shards) == 3 and not report.skipped
    shards = open_source(tmp_path / "shards" / "index.json", "shards")
    plain = open_source(small_embedded / "conversations_val.json", "conversations")
    for i in (0, 17, 47):
        a, b = shards[i], plain[i]
        assert a.sample_id == b.sample_id and a.turns == b.turns
        assert a.images[0].read(a.sample_id) == b.images[0].read(b.sample_id)


def test_prepare_dataset_counts_missing_images(tmp_path):
    _jpeg(tmp_path / "ok.jpg")
    lines = [{"image": "ok.jpg", "caption": "fine"}, {"image": "gone.jpg", "caption": "lost"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    report = write_shards(tmp_path / "c.jsonl", "captions", tmp_path / "out")
    assert report.samples == 1 and report.skipped == {"missing_image": 1, "malformed_record": 1}


# ---- bad input ---------------------------------------------------------------------------------
@pytest.fixture()
def bad_inputs(tmp_path):
    good = _jpeg(tmp_path / "good.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 20)
    _jpeg(tmp_path / "sliver.jpg", size=(400, 4))
    long_caption = " ".join(["red"] * 200)
    records = [
        ({"id": "ok", "image": good.name, "caption": "a red square"}, None),
        ({"id": "missing", "image": "nope.jpg", "caption": "red"}, "missing_image"),
        ({"id": "empty", "image": "empty.jpg", "caption": "red"}, "corrupt_image"),
        ({"id": "truncated", "image": "truncated.jpg", "caption": "red"}, "corrupt_image"),
        ({"id": "garbage", "image": "garbage.jpg", "caption": "red"}, "corrupt_image"),
        ({"id": "sliver", "image": "sliver.jpg", "caption": "red"}, "bad_image_shape"),
        ({"id": "types", "image": good.name, "caption": 42}, "malformed_record"),
        ({"id": "toolong", "image": good.name, "caption": long_caption}, "over_length"),
    ]
    lines = [json.dumps(r) for r, _ in records] + ["{not json"]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    convs = [{"id": "tags", "image": good.name, "conversations": [
        {"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "two"}]}]
    (tmp_path / "convs.json").write_text(json.dumps(convs))
    return tmp_path, [reason for _, reason in records] + ["malformed_record"]


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_every_bad_input_is_skipped_and_counted_by_reason(bad_inputs, tok, backend):
    folder, reasons = bad_inputs
    source = open_source(folder / "captions.jsonl", "captions")
    builder = ExampleBuilder(ConversationEncoder(tok, get_template("plain"), TOKENS, tok.image_token_id), 64)
    decoder = PILBackend(56) if backend == "pil" else DALIBackend(56)
    examples, skipped = load_examples(source, builder, decoder, list(range(len(source))), 0)
    assert [ex.sample_id for ex in examples] == ["ok"]
    assert sorted(r for r, _ in skipped) == sorted(r for r in reasons if r)
    messages = dict((r, m) for r, m in skipped)
    assert "nope.jpg" in messages["missing_image"] and "sliver.jpg is 400x4" in messages["bad_image_shape"]
    conv_builder = ExampleBuilder(ConversationEncoder(tok, get_template("vicuna_v1"), TOKENS, tok.image_token_id), 256)
    _, skipped = load_examples(open_source(folder / "convs.json", "conversations"), conv_builder, decoder, [0], 0)
    assert skipped[0][0] == "image_tag_mismatch" and "2 <image> tag(s) in the text but 1 image(s)" in skipped[0][1]


def test_skip_budget_stops_with_the_last_bad_sample():
    counter = SkipCounter(max_fraction=0.05, min_budget=2)
    counter.update(32, {"corrupt_image": 2})
    with pytest.raises(SkipBudgetExceeded, match=r"5 of 64 samples were skipped.*last: sample x: broken"):
        counter.update(32, {"corrupt_image": 3}, "sample x: broken")
    restored = SkipCounter()
    restored.load_state_dict(counter.state_dict())
    assert restored.counts == counter.counts and restored.seen == 64


@pytest.mark.parametrize("mode, color", [("L", None), ("RGBA", (255, 0, 0, 128)), ("CMYK", (0, 255, 255, 0)),
                                         ("P", None)])
def test_image_modes_become_rgb(mode, color):
    image = Image.new(mode, (20, 10), color) if color else Image.new(mode, (20, 10))
    assert to_rgb(image).mode == "RGB"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if mode in ("RGBA", "P", "L") else "JPEG")
    assert pil_preprocess(buffer.getvalue(), 16, ImageAug()).shape == (3, 16, 16)


# ---- images: DALI vs PIL, augmentation ----------------------------------------------------------
def test_dali_matches_pil_within_the_stated_tolerance(small_embedded):
    files = sorted((small_embedded / "images" / "test").glob("*.jpg"))[:16]
    datas = [f.read_bytes() for f in files]
    for aug in (ImageAug(), ImageAug(crop=(0.85, 0.1, 0.3, 0.7), flip=True, brightness=1.08, contrast=0.93)):
        items = [(d, aug, "s", "f") for d in datas]
        pil = torch.stack(PILBackend(56).decode(items))
        dali = torch.stack(DALIBackend(56).decode(items))
        diff = (pil - dali).abs()
        assert diff.mean() < 0.005 and diff.max() < 0.25, (diff.mean(), diff.max())
    reference = torch.stack([clip_reference(Image.open(f), 56) for f in files])
    assert torch.equal(torch.stack(PILBackend(56).decode([(d, ImageAug(), "s", "f") for d in datas])), reference)


def test_dali_decodes_on_the_ranks_device_and_counts_its_pil_fallbacks(small_embedded, caplog):
    from megavlm.data.images import make_backend

    assert DALIBackend(56, device="gpu", device_id=3).device_id == 3   # each rank its own GPU
    assert DALIBackend(56, device="cpu", device_id=3).device_id is None
    files = sorted((small_embedded / "images" / "test").glob("*.jpg"))[:3]
    items = [(f.read_bytes(), ImageAug(), "s", "f") for f in files]
    items[1] = (items[1][0], ImageAug(tiles=(2, 1), thumbnail=True), "tiled", "f")
    backend = make_backend("dali", 56, device_id=0)
    with caplog.at_level("WARNING"):
        out = backend.decode(items)
    assert [tuple(t.shape) for t in out] == [(3, 56, 56), (3, 3, 56, 56), (3, 56, 56)]
    assert torch.equal(out[1], pil_preprocess(items[1][0], 56, items[1][1]))
    assert backend.fallbacks == {"tiled": 1, "patches": 0, "undecodable": 0}
    assert "pil_fallback_tiled" in caplog.text


def test_flip_swaps_left_and_right_and_is_deterministic(small_embedded):
    from megavlm.config.recipe import AugmentConfig

    source = open_source(small_embedded / "conversations_train.json", "conversations")
    pair = next(i for i in range(len(source)) if any("left" in a or "left" in u for u, a in source[i].turns))
    cfg = AugmentConfig(enabled=True, flip_prob=1.0)
    augs, transform = augment_record(source[pair], cfg, seed=0, epoch=0, index=pair)
    assert augs[0].flip and transform is swap_left_right
    assert swap_left_right("What is to the left of the square? Right.") == "What is to the right of the square? Left."
    assert augment_record(source[pair], cfg, 0, 0, pair) == (augs, transform)
    skip = AugmentConfig(enabled=True, flip_prob=1.0, flip_text="skip")
    assert not augment_record(source[pair], skip, 0, 0, pair)[0][0].flip
    assert augment_record(source[pair], cfg, 0, 1, pair)[0] != augs  # a new epoch, new crops
    crop = augs[0].box(112, 112)
    area = (crop[2] - crop[0]) * (crop[3] - crop[1]) / 112 ** 2
    assert 0.8 * 0.74 <= area <= 1.0 and 0 <= crop[0] and crop[2] <= 112


# ---- packing -------------------------------------------------------------------------------------
def test_packed_and_padded_losses_are_equal(single_process, small_embedded, tok):
    from megavlm.config.model import ParallelConfig
    from megavlm.losses.lm_loss import masked_lm_loss
    from megavlm.parallel.init import process_groups
    from megavlm.training.build import build_model

    model = build_model(CFG, ParallelConfig(), single_process, process_groups()).eval()
    source = open_source(small_embedded / "conversations_val.json", "conversations")
    builder = ExampleBuilder(encoder_for(CFG, tok, "vicuna_v1"), 96)
    examples, _ = load_examples(source, builder, PILBackend(56), list(range(6)), 0)
    padded = pad_micro_batch(examples, 6, 96, tok.pad_id, 56)
    with torch.no_grad():
        loss_padded = masked_lm_loss(model(padded["input_ids"], images=padded["images"],
                                           images_per_sample=padded["images_per_sample"]), padded["labels"], 512)
        total, tokens = torch.zeros(()), 0
        for row in (pack_row(examples[:2], 192, tok.pad_id, 56), pack_row(examples[2:], 400, tok.pad_id, 56)):
            logits = model(row["input_ids"], images=row["images"], images_per_sample=row["images_per_sample"],
                           position_ids=row["position_ids"], packed_seq_params=row["packed_seq_params"])
            s, n = masked_lm_loss(logits, row["labels"], 512)
            total, tokens = total + s, tokens + n
    assert tokens == loss_padded[1]
    torch.testing.assert_close(total, loss_padded[0], rtol=1e-5, atol=1e-4)


def test_packing_cuts_padding_on_a_llava_like_distribution():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from benchmark_dataloader import llava_like_lengths

    lengths = llava_like_lengths(5000)
    assert padding_fraction(lengths, 2048, 8, packed=False) > 0.5
    assert padding_fraction(lengths, 2048, 8, packed=True) < 0.05


# ---- sampling: resume, DP sharding, mixtures, curriculum ------------------------------------------
def test_resume_mid_epoch_neither_repeats_nor_skips(small_embedded, tok):
    source = open_source(small_embedded / "captions_val.jsonl", "captions")  # 48 samples
    builder = ExampleBuilder(encoder_for(CFG, tok, "plain"), 48)
    cfg = LoaderConfig(48, 4, tok.pad_id, 56, prefetch=True)

    def loader(state=None):
        sampler = GlobalBatchSampler(len(source), 8, 4, 0, 1, seed=3, state=state)
        return StepLoader(source, builder, sampler, PILBackend(56), cfg)

    first = loader()
    seen = [sid for _ in range(2) for b in first.next_step()[0] for sid in b["sample_ids"]]
    state = first.consumed_state  # the checkpointed position (a third step is already prefetched)
    second = loader(state)
    seen += [sid for _ in range(4) for b in second.next_step()[0] for sid in b["sample_ids"]]
    assert len(seen) == 48 and len(set(seen)) == 48  # one epoch, every sample exactly once


def test_dp_ranks_get_disjoint_slices_of_each_global_batch():
    ranks = [GlobalBatchSampler(64, 16, 2, r, 4, seed=1) for r in range(4)]
    for _ in range(4):
        step = [sum(s.next_step(), []) for s in ranks]
        flat = [i for part in step for i in part]
        assert len(flat) == 16 and len(set(flat)) == 16


def test_mixture_proportions_and_curriculum(small_embedded):
    captions = open_source(small_embedded / "captions_train.jsonl", "captions")
    convs = open_source(small_embedded / "conversations_train.json", "conversations")
    vals = open_source(small_embedded / "captions_val.jsonl", "captions")
    mixture = MixtureDataset([captions, convs, vals], [0.4, 0.4, 0.2], size=5000)
    sampler = GlobalBatchSampler(len(mixture), 50, 50, 0, 1, seed=0)
    drawn = [i for _ in range(40) for i in sampler.next_step()[0]]
    assert np.allclose(mixture.proportions(drawn), [0.4, 0.4, 0.2], atol=0.03)
    assert np.allclose(mixture.proportions(range(100)), [0.4, 0.4, 0.2], atol=0.011)  # every prefix
    assert mixture[2].sample_id.startswith("val_")


def test_curriculum_orders_by_difficulty(tmp_path):
    _jpeg(tmp_path / "i.jpg")
    rows = [{"id": f"s{i}", "image": "i.jpg", "caption": "x", "difficulty": d} for i, d in enumerate([3, 1, 2, 1])]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = open_source(tmp_path / "c.jsonl", "captions", difficulty_key="difficulty")
    order = curriculum_order(source)
    assert order == [1, 3, 2, 0]
    sampler = GlobalBatchSampler(4, 2, 2, 0, 1, order=order)
    assert sampler.next_step() == [[1, 3]] and sampler.next_step() == [[2, 0]]


def test_added_tokens_extend_a_pretrained_tokenizer(tmp_path):
    """A tokenizer without the VLM's markers (like Vicuna's): they are appended after its pieces."""
    import sentencepiece as spm

    from megavlm.data.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a red circle on a white background", "two blue squares", "the cat sat"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", minloglevel=2, hard_vocab_limit=False)
    path = tmp_path / "sp.model"
    with pytest.raises(ValueError, match="data.added_tokens"):
        load_tokenizer(path)
    tok = load_tokenizer(path, ["<|endofchunk|>", "<image>"])
    base = tok.sp.get_piece_size()
    assert (tok.token_id("<|endofchunk|>"), tok.image_token_id, tok.vocab_size) == (base, base + 1, base + 2)
    ids = tok.encode("a red circle<|endofchunk|>two blue squares")
    assert base in ids and tok.decode(ids) == "a red circle<|endofchunk|>two blue squares"
    assert tok.encode_marker("<|endofchunk|>") == [base]
    with pytest.raises(ValueError, match="already pieces"):
        load_tokenizer(path, ["<image>", "▁a"])


def test_hf_tokenizer_json_with_chatml_and_no_bos(tmp_path):
    """A byte-level BPE tokenizer.json (Qwen2-style: no bos, <|im_end|> ends a turn) with <image>
    added after its vocabulary: supervised spans decode back to the assistant text."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megavlm.data.templates import ConversationEncoder, get_template
    from megavlm.data.tokenizer import HFTokenizer, load_tokenizer

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator(["a red circle left of a blue square", "What color is the circle? red",
                            "You are a helpful assistant."] * 20,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    tok = load_tokenizer(tmp_path, added_tokens=["<image>"])
    assert isinstance(tok, HFTokenizer) and tok.bos_ids == [] and tok.eos_id == tok.token_id("<|im_end|>")
    assert tok.image_token_id == tok.vocab_size - 1
    text = "Is the circle left of the square? yes, it is."
    assert tok.decode(tok.encode(text)) == text
    encoder = ConversationEncoder(tok, get_template("chatml"), tokens_per_image=3, image_token_id=tok.image_token_id)
    ids, supervised = encoder.encode([("<image>\nWhat color is the circle?", "red"), ("And the square?", "blue")], 1, "s0")
    assert ids.count(tok.image_token_id) == 3 and ids[0] == tok.token_id("<|im_start|>")
    answers = tok.decode([i for i, s in zip(ids, supervised) if s])
    assert answers == "red<|im_end|>blue<|im_end|>"


def test_drop_images_keeps_the_text_and_supervises_the_same_caption(small_embedded, tok):
    """data.drop_images (the quick start's text-only LLM warm-up): no image and no image token reaches
    the model; the caption tokens and their labels are those of the with-image example."""
    source = open_source(small_embedded / "captions_val.jsonl", "captions")
    with_image = ExampleBuilder(encoder_for(CFG, tok, "plain"), 48).build(source[0], 0, 0)
    text_only = ExampleBuilder(encoder_for(CFG, tok, "plain"), 48, drop_images=True).build(source[0], 0, 0)
    assert text_only.images == [] and tok.image_token_id not in text_only.input_ids
    assert with_image.images and with_image.input_ids.count(tok.image_token_id) == TOKENS
    supervised = lambda ex: [t for t in ex.labels if t != IGNORE_INDEX]  # noqa: E731
    assert supervised(text_only) == supervised(with_image) and supervised(text_only)
