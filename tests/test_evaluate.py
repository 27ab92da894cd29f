"""Benchmarks end to end: the quick start's stage-3 checkpoint evaluated by tools/evaluate.py over
every embedded benchmark (2 processes: the samples split over DP ranks and gathered) scores above
the blank-image baseline on POPE F1 and VQA accuracy; in-process, the DP shares cover each
sample once, partial micro-batches and empty sets are handled, and a record with a missing image
is skipped and counted."""
from __future__ import annotations

import json
import shutil

import pytest

from megavlm.config.recipe import BenchmarkConfig
from tests.conftest import ROOT, run_torchrun

@pytest.fixture(scope="session")
def stage3_checkpoint(quickstart_run):
    """The quick start's stage 3 (trained under torchrun at TP=2 by README's command)."""
    return quickstart_run.workdir / "outputs" / "quickstart" / "stage3"


@pytest.fixture(scope="session")
def quickstart_data(quickstart_run):
    return quickstart_run.workdir / "data" / "embedded"


@pytest.fixture(scope="module")
def eval_ctx(single_process, stage3_checkpoint, quickstart_data):
    from megavlm.config.model import ParallelConfig
    from megavlm.eval.checkpoint_model import checkpoint_recipe, load_eval_model

    # saved at TP=2 with a tokenizer path relative to the quick start's folder; read here at TP=1
    recipe = checkpoint_recipe(stage3_checkpoint, [f"data.tokenizer={quickstart_data}/tokenizer.model"])
    ctx, _ = load_eval_model(stage3_checkpoint, recipe, ParallelConfig(), micro_batch_size=16)
    return ctx, recipe


@pytest.mark.multiproc
def test_evaluate_tool_over_the_embedded_benchmarks(quickstart_run, tmp_path):
    """README's evaluate command, from the quick start's folder."""
    out = run_torchrun(ROOT / "tools" / "evaluate.py", 2, [
        "--ckpt", "outputs/quickstart/stage3", "--embedded", "data/embedded", "--max-samples", "48",
        "--out", str(tmp_path), "--no-progress", "--micro-batch-size", "16"], cwd=quickstart_run.workdir)
    print(out)
    results = json.loads((tmp_path / "results.json").read_text())["benchmarks"]
    assert set(results) == {"vqav2", "coco_captions", "pope", "mmbench", "seedbench", "scienceqa", "refcoco"}
    pope, vqa = results["pope"], results["vqav2"]
    assert pope["image"]["samples"] == 3 * 48 and vqa["image"]["samples"] == 48      # every sample once
    assert set(pope["image"]["metrics"]) >= {"f1", "yes_ratio", "adversarial_f1", "popular_f1", "random_f1"}
    for name, result, metric in (("pope", pope, "f1"), ("pope", pope, "accuracy"), ("vqav2", vqa, "accuracy")):
        image, blank = result["image"]["metrics"][metric], result["blank"]["metrics"][metric]
        assert image > blank + 0.1, (name, metric, image, blank)
    assert "blank image" in out and "pope" in out and "acc@0.5" in out
    answers = (tmp_path / "answers_pope.jsonl").read_text().splitlines()
    assert len(answers) == 3 * 48 and len({json.loads(a)["sample_id"] for a in answers}) == 3 * 48
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_dp_shares_cover_every_sample_once(eval_ctx, quickstart_data):
    from megavlm.eval.benchmark_runner import answer_share, load_benchmarks

    ctx, recipe = eval_ctx
    (pope,) = load_benchmarks([BenchmarkConfig("pope", str(quickstart_data / "benchmarks" / "pope"), 6)])
    n = len(pope.samples)
    whole = answer_share(ctx, pope, list(range(n)), recipe.data.template, blank=False)
    parts = [answer_share(ctx, pope, list(range(r, n, 3)), recipe.data.template, blank=False) for r in range(3)]
    assert sorted(i for p in parts for i in p.answers) == list(range(n))
    assert {i: t for p in parts for i, t in p.answers.items()} == whole.answers   # batching does not matter


def test_missing_images_are_skipped_and_counted_and_empty_sets_report_no_samples(eval_ctx, quickstart_data, tmp_path):
    from megavlm.eval.benchmark_runner import format_table, load_benchmarks, run_benchmarks

    ctx, recipe = eval_ctx
    pope = tmp_path / "pope"
    shutil.copytree(quickstart_data / "benchmarks" / "pope", pope)
    first = json.loads((pope / "coco_pope_random.json").read_text().splitlines()[0])["image"]
    (pope / "images" / first).unlink()
    loaded = load_benchmarks([BenchmarkConfig("pope", str(pope), 3), BenchmarkConfig(
        "vqav2", str(quickstart_data / "benchmarks" / "vqav2"), 0)])
    results = run_benchmarks(ctx, loaded, recipe.data.template)
    missing = sum(1 for s in loaded[0].samples if s.image.endswith(first))
    assert missing >= 1
    assert results["pope"]["image"]["skipped"] == {"missing_image": missing}
    assert results["pope"]["image"]["samples"] == 9 - missing
    assert results["vqav2"]["image"]["samples"] == 0 and results["vqav2"]["image"]["metrics"] == {}
    table = format_table(results)
    assert "no samples" in table and f"missing_image {missing}" in table


def test_eval_sets_smaller_than_a_micro_batch_and_empty_sets(eval_ctx, quickstart_data):
    """eval.max_samples=8 with micro-batches of 16: the 8 are evaluated (padded, masked), not
    dropped; none at all reports "no samples" instead of failing."""
    from megavlm.data.build import open_eval_source
    from megavlm.eval.vlm_eval import teacher_forced, vqa_exact_match
    from megavlm.training.trainer import format_metrics

    ctx, recipe = eval_ctx
    assert ctx.micro_batch_size == 16
    convs = open_eval_source(str(quickstart_data / "conversations_test.json"), "conversations", None, "eval.vqa")
    few = teacher_forced(ctx, convs, recipe.data.template, 8, blank=False)
    assert few["samples"] == 8 and 0 <= few["accuracy"] <= 1
    padded = teacher_forced(ctx, convs, recipe.data.template, 16, blank=False)
    assert padded["samples"] == 16
    assert vqa_exact_match(ctx, convs, recipe.data.template, 5, 6, blank=False)["samples"] == 5
    none = teacher_forced(ctx, convs, recipe.data.template, 0, blank=False)
    assert none["samples"] == 0
    empty = vqa_exact_match(ctx, convs, recipe.data.template, 0, 6, blank=False)
    assert empty["samples"] == 0
    assert "no samples" in format_metrics("s", {"vqa_exact_match": empty["exact_match"],
                                                "vqa_exact_match_blank": empty["exact_match"]})


def test_retrieval_benchmark_on_an_itc_model(single_process, small_embedded):
    """Flickr30K-format retrieval through the BLIP-2 Q-Former: R@1/5/10 both ways, an image's five
    captions all count as hits (so chance is 5 in 5 x images)."""
    from megavlm.config.model import ParallelConfig
    from megavlm.config.schema import with_overrides
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.eval.benchmark_runner import load_benchmarks, run_benchmarks
    from megavlm.eval.vlm_eval import EvalContext
    from megavlm.models.registry import flavor_config
    from megavlm.parallel.init import process_groups
    from megavlm.training.build import build_model

    cfg = with_overrides(flavor_config("blip2", "debug"), ["head=qformer"])
    model = build_model(cfg, ParallelConfig(), single_process, process_groups())
    ctx = EvalContext([model], load_tokenizer(small_embedded / "tokenizer.model"), cfg, None, 32, 16,
                      single_process.device)
    loaded = load_benchmarks([BenchmarkConfig("flickr30k_retrieval",
                                              str(small_embedded / "benchmarks" / "flickr30k_retrieval"), 12)])
    result = run_benchmarks(ctx, loaded, "plain")["flickr30k_retrieval"]["image"]
    m = result["metrics"]
    assert result["samples"] == 60 and m["retrieval_chance_r1"] == pytest.approx(5 / 60)
    for way in ("i2t", "t2i"):
        assert 0 <= m[f"{way}_r1_itc"] <= m[f"{way}_r5_itc"] <= m[f"{way}_r10_itc"] <= 1


def test_generate_tool_answers_about_an_image(stage3_checkpoint, quickstart_data):
    import os
    import subprocess
    import sys

    image = sorted((quickstart_data / "images" / "test").glob("*.jpg"))[0]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--ckpt", str(stage3_checkpoint),
                           "--image", str(image), "--prompt", "What color is the background?", "--max-new-tokens", "6",
                           "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=quickstart_data.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() and "tokens in" in proc.stderr
    missing = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--ckpt", str(stage3_checkpoint),
                              "--image", "nope.jpg", "--prompt", "?"], capture_output=True, text=True, env=env,
                             cwd=quickstart_data.parents[1])
    assert missing.returncode == 2 and "--image nope.jpg does not exist" in missing.stderr
