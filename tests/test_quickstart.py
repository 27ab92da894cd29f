"""The quick start's recipes end to end: they learn to use the image, and a stage starts from a
checkpoint written (under torchrun, TP=2) at another TP size."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megavlm.config.recipe import load_recipe
from megavlm.training.trainer import Trainer
from tests.conftest import QUICKSTART, ROOT, _free_port, data_overrides


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


@pytest.fixture(scope="module")
def wide_test_split(tmp_path_factory):
    """The small data set with a 128-sample test split: with 32 VQA questions one machine's
    rounding was enough to move exact match by the margin asserted below."""
    from megavlm.data.embedded import generate

    out = tmp_path_factory.mktemp("embedded_wide_test")
    generate(out, seed=0, splits={"train": 768, "val": 48, "test": 128})
    return out


@pytest.mark.slow
def test_quickstart_learns_to_use_the_image(single_process, wide_test_split, tmp_path):
    """The quick start's recipes (the text-only LLM warm-up, then the three stages), shortened and at
    TP=1 in this process (the TP=2 launch path is covered below and by the layout tests): stages 2
    and 3 (and stage 3 with LoRA) must beat the same model on a blank image clearly."""
    small_embedded = wide_test_split
    short = ["parallel.tensor_parallel=1", "train.micro_batch_size=32", "eval.max_samples=128",
             "train.eval_samples=48", "logging.progress=false"]
    metrics = {}
    for stage, steps in ((0, 60), (1, 24), (2, 200), (3, 200)):
        extra = [f"checkpoint.dir={tmp_path}/stage{stage}", f"train.max_steps={steps}", *short]
        if stage > 0:
            extra.append(f"stage.init_from={tmp_path}/stage{stage - 1}")
        else:  # the text-only LLM warm-up has no held-out image metrics
            extra += ["data.validation=null", "eval.captions=null"]
        if stage == 3:
            extra.append(f"eval.vqa={small_embedded}/conversations_test.json")
        name = "llava_debug_stage0_lm" if stage == 0 else f"llava_debug_stage{stage}"
        recipe = load_recipe(QUICKSTART / f"{name}.yaml", data_overrides(small_embedded, captions=stage < 3) + extra)
        metrics[stage] = Trainer(recipe).run()
    # stage 3 again from the same stage-2 checkpoint, with LoRA (frozen LLM, adapters + connector)
    lora = load_recipe(QUICKSTART / "llava_debug_stage3_lora.yaml", data_overrides(small_embedded, captions=False) + [
        f"checkpoint.dir={tmp_path}/stage3-lora", "train.max_steps=300", f"stage.init_from={tmp_path}/stage2",
        f"eval.vqa={small_embedded}/conversations_test.json", *short])
    metrics["lora"] = Trainer(lora).run()
    print("stage 1:", metrics[1], "\nstage 2:", metrics[2], "\nstage 3:", metrics[3], "\nstage 3 LoRA:", metrics["lora"])
    # Stage 1 (the connector alone, on an LLM warmed up on text only) is not asserted: with the
    # byte-fallback tokenizer it ends level with the blank image here (0.648 vs 0.649).
    assert metrics[2]["caption_token_accuracy"] > metrics[2]["caption_token_accuracy_blank"] + 0.1
    assert metrics[3]["vqa_exact_match"] > metrics[3]["vqa_exact_match_blank"] + 0.15
    assert metrics["lora"]["vqa_exact_match"] > metrics["lora"]["vqa_exact_match_blank"] + 0.1


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
