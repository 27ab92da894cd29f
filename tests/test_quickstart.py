"""The quick start's recipes end to end: they learn to use the image, and a stage starts from a
checkpoint written (under torchrun, TP=2) at another TP size."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megavlm.config.recipe import load_recipe
from megavlm.training.trainer import Trainer
from tests.conftest import QUICKSTART, _free_port, data_overrides


def _train(stage: int, workdir, data_dir, *extra: str, captions: bool = True, nproc: int = 2):
    recipe = QUICKSTART / f"llava_debug_stage{stage}.yaml"
    overrides = data_overrides(data_dir, captions) + [f"checkpoint.dir={workdir}/stage{stage}", *extra]
    if stage > 1:
        overrides.append(f"stage.init_from={workdir}/stage{stage - 1}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", "-m", "megavlm.train", str(recipe), *overrides]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return json.loads((workdir / f"stage{stage}" / "final_metrics.json").read_text())["metrics"]


@pytest.mark.slow
def test_quickstart_command_shows_every_stage_using_the_image(single_process, quickstart_run):
    """README's quick-start command: every stage's held-out metric beats the same model on a blank
    image, in its output and in final_metrics.json, and stage 3 ends with the embedded benchmarks
    (POPE and VQAv2 above the blank image); then stage 3 with LoRA (frozen LLM, adapters +
    connector) from the same stage-2 checkpoint, at TP=1 in this process, beats it too."""
    out, tmp_path = quickstart_run.stdout, quickstart_run.workdir
    print(out[-3000:])
    metrics = {stage: quickstart_run.metrics(stage) for stage in (1, 2, 3)}
    margins = {(1, "caption_token_accuracy"): 0.02, (2, "caption_token_accuracy"): 0.1,
               (3, "caption_token_accuracy"): 0.05, (3, "vqa_exact_match"): 0.15,
               (3, "bench/pope/f1"): 0.1, (3, "bench/pope/accuracy"): 0.1, (3, "bench/vqav2/accuracy"): 0.15}
    for (stage, name), margin in margins.items():
        value, blank = metrics[stage][name], metrics[stage][f"{name}_blank"]
        assert value > blank + margin, (stage, name, value, blank)
        if not name.startswith("bench/"):
            assert f"{name:<28} {value:.4f}   (blank image: {blank:.4f})" in out, (stage, name)
    assert "pope" in out and "blank image" in out and "4 stages finished" in out

    data = tmp_path / "data" / "embedded"
    lora = load_recipe(QUICKSTART / "llava_debug_stage3_lora.yaml", data_overrides(data, captions=False) + [
        "parallel.tensor_parallel=1", "train.micro_batch_size=32", "eval.max_samples=128", "train.eval_samples=48",
        f"checkpoint.dir={tmp_path}/stage3-lora", "train.max_steps=300",
        f"stage.init_from={tmp_path}/outputs/quickstart/stage2", f"eval.vqa={data}/conversations_test.json"])
    result = Trainer(lora).run()
    print("stage 3 LoRA:", result)
    assert result["vqa_exact_match"] > result["vqa_exact_match_blank"] + 0.1


@pytest.mark.multiproc
def test_stage2_starts_from_a_stage1_checkpoint_saved_at_tp2(single_process, small_embedded, tmp_path):
    stage1 = _train(1, tmp_path, small_embedded, "train.max_steps=3", "eval.max_samples=8", "train.eval_samples=16",
                    "train.micro_batch_size=8")
    recipe = load_recipe(QUICKSTART / "llava_debug_stage2.yaml", data_overrides(small_embedded) + [
        "parallel.tensor_parallel=1", f"stage.init_from={tmp_path}/stage1", f"checkpoint.dir={tmp_path}/stage2",
        "train.eval_samples=16", "train.micro_batch_size=8"])
    trainer = Trainer(recipe)  # TP=1 here, TP=2 when saved
    resumed = trainer._validate()
    assert resumed["val/loss"] == pytest.approx(stage1["val/loss"], rel=1e-5)
