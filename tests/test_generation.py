"""Generation: the KV-cache path gives the tokens of full recomputation (TP=1 here, TP=2 and PP=2
in one torchrun launch), right-padded prompts of different lengths do not affect each other,
sampling is reproducible from a seed, and EOS / stop strings / max_new_tokens end answers."""
from __future__ import annotations

import json

import pytest
import torch

from megavlm.config.model import ParallelConfig
from megavlm.eval.generate import SamplingConfig, filter_logits, generate
from megavlm.models.common.layer_specs import lm_head
from megavlm.models.registry import flavor_config
from megavlm.parallel.init import process_groups
from megavlm.training.build import build_model
from tests.conftest import ROOT, run_torchrun

GREEDY = {"max_new_tokens": 10}
SAMPLED = {"max_new_tokens": 10, "temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 7}


class IdTokenizer:
    """Decodes ids to their numbers, so stop strings can name tokens."""
    eos_id, pad_id = 2, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def setup(single_process):
    cfg = flavor_config("llava", "debug")
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), single_process, process_groups()).eval()
    g = torch.Generator().manual_seed(0)
    image = [cfg.image_token_id] * cfg.image_tokens
    # images at different places, prompts of 4 different lengths, one without an image
    prompts = [[1] + image + torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 11, 6)]
    prompts.append([1] + torch.randint(3, 300, (5,), generator=g).tolist() + image + [7, 9])
    prompts.append([1, 5, 8, 13])
    per_sample = [1, 1, 1, 1, 0]
    images = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return cfg, model, lm_head(cfg, None), prompts, images, per_sample


def _run(setup, sampling: dict, cache: bool, rows=None, eos=(-1,), **kw):
    cfg, model, head, prompts, images, per_sample = setup
    rows = list(range(len(prompts))) if rows is None else rows
    first = [sum(per_sample[:r]) for r in rows]
    pixels = torch.cat([images[f:f + per_sample[r]] for f, r in zip(first, rows)])
    return generate([model], [prompts[r] for r in rows], pixels, [per_sample[r] for r in rows], head, IdTokenizer(),
                    SamplingConfig(**sampling, use_cache=cache, **kw), eos_ids=set(eos), banned=[cfg.image_token_id],
                    seeds=rows)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_kv_cache_matches_full_recomputation(setup, sampling):
    cached = [g.tokens for g in _run(setup, sampling, cache=True)]
    uncached = [g.tokens for g in _run(setup, sampling, cache=False)]
    assert cached == uncached
    assert all(len(t) == 10 for t in cached)
    assert len({tuple(t) for t in cached}) == len(cached)


def test_batched_rows_equal_each_prompt_alone(setup):
    batched = [g.tokens for g in _run(setup, GREEDY, cache=True)]
    for row in range(len(batched)):
        assert [g.tokens for g in _run(setup, GREEDY, cache=True, rows=[row])] == [batched[row]]


def test_seeded_sampling_is_reproducible_and_seed_dependent(setup):
    a = [g.tokens for g in _run(setup, SAMPLED, cache=True)]
    b = [g.tokens for g in _run(setup, SAMPLED, cache=True)]
    c = [g.tokens for g in _run(setup, dict(SAMPLED, seed=8), cache=True)]
    assert a == b and a != c
    alone = [g.tokens for g in _run(setup, SAMPLED, cache=True, rows=[2])]   # a prompt's seed travels with it
    assert alone == [a[2]]


def test_eos_stop_strings_and_max_new_tokens(setup):
    reference = _run(setup, GREEDY, cache=True)
    row = reference[1].tokens
    eos = _run(setup, GREEDY, cache=True, eos=(row[3],))[1]
    assert eos.tokens == row[:3] and eos.finish_reason == "eos"
    stop = _run(setup, GREEDY, cache=True, stop=(f" {row[4]} ",))[1]
    assert stop.finish_reason == "stop" and stop.text == " ".join(map(str, row[:4]))
    short = _run(setup, dict(GREEDY, max_new_tokens=2), cache=True)
    assert [g.tokens for g in short] == [g.tokens[:2] for g in reference]
    assert all(g.finish_reason == "length" for g in short)
    cfg = setup[0]
    assert all(cfg.image_token_id not in g.tokens for g in reference)


def test_filter_logits_worked_example():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda x: torch.isfinite(x[0]).tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    # nucleus: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is still needed; 0.85 >= 0.8 stops there
    assert keep(filter_logits(logits, top_p=0.8)) == [True, True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.3)) == [True, False, False, False, False]
    assert keep(filter_logits(logits, top_k=4, top_p=0.75)) == [True, True, True, False, False]


def test_bad_sampling_settings_are_errors():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)


@pytest.mark.multiproc
def test_tp2_and_pp2_generate_the_tp1_tokens(setup, tmp_path):
    from megavlm.training.checkpoint import save_model

    cfg, model, head, prompts, images, per_sample = setup
    save_model(model, cfg, tmp_path / "ckpt")
    torch.save(images, tmp_path / "images.pt")
    request = {"prompts": prompts, "images_per_sample": per_sample, "images": str(tmp_path / "images.pt"),
               "modes": {"greedy": GREEDY, "sampled": SAMPLED}}
    (tmp_path / "request.json").write_text(json.dumps(request))
    run_torchrun(ROOT / "tests" / "workers" / "generate_layouts.py", 2,
                 ["--ckpt", str(tmp_path / "ckpt"), "--request", str(tmp_path / "request.json"),
                  "--out", str(tmp_path / "out.json")])
    results = json.loads((tmp_path / "out.json").read_text())
    expected = {"greedy": [g.tokens for g in _run(setup, GREEDY, cache=True)],
                "sampled": [g.tokens for g in _run(setup, SAMPLED, cache=True)]}
    for layout, found in results.items():
        for mode, tokens in expected.items():
            assert found[f"{mode}_cached"] == tokens, (layout, mode)
            assert found[f"{mode}_uncached"] == tokens, (layout, mode)
