"""tools/plan.py: counted model state against real ranks, published LLaVA-1.5 times, layouts that
do not fit, the printed plan and --validate."""
from __future__ import annotations

import dataclasses
import json

import pytest

from megavlm.config.recipe import load_recipe
from megavlm.training.plan import Planner, Workload, find_gpu
from megavlm.training.plan_report import parse_gpu_counts, validate
from tests.conftest import ROOT, run_torchrun

pytestmark = pytest.mark.usefixtures("own_world")

RECIPES = ROOT / "examples" / "recipes"
DEBUG_STAGE2 = RECIPES / "quickstart" / "llava_debug_stage2.yaml"
WORKER = ROOT / "tests" / "workers" / "state_bytes.py"
LAYOUTS = ["2x1", "2x1-dist", "1x2", "1x2-dist", "2x2"]   # TPxPP on 4 processes: DP 2, 2, 2, 2, 1
LOCAL = ["model.transformer_impl=local", "data.packing=true"]

# LLaVA-1.5 as published (the project's README: 8x A100, DeepSpeed, one epoch each): pre-training
# on the 558K LAION/CC/SBU captions takes ~3.5 h (7B) and ~5.5 h (13B) on 80GB A100s; visual
# instruction tuning on the 665K mixture ~10 h (7B, 40GB A100s) and ~20 h (13B, 80GB A100s).
# Inputs stated here, not measured: a pre-training sample is the 576 image tokens + a one-line BLIP
# caption (~600 tokens); an instruction sample 576 image tokens (94% of samples have an image: 40K
# ShareGPT conversations are text only) + ~230 text tokens of multi-turn answers (~800 tokens).
PRETRAIN = dict(recipe="llava_1.5_7b_stage1.yaml", samples=558_128, tokens=600, images=1.0)
INSTRUCT = dict(recipe="llava_1.5_7b_stage3.yaml", samples=665_298, tokens=800, images=0.94)
PUBLISHED = [(PRETRAIN, "llava-1.5-7b", "a100-80gb", 3.5), (PRETRAIN, "llava-1.5-13b", "a100-80gb", 5.5),
             (INSTRUCT, "llava-1.5-7b", "a100-40gb", 10.0), (INSTRUCT, "llava-1.5-13b", "a100-80gb", 20.0)]


def planner(stage: dict, flavor: str, gpu: str, mfu: float = 0.4) -> Planner:
    recipe = load_recipe(RECIPES / stage["recipe"], LOCAL + [f"model.flavor={flavor}"])
    work = Workload(stage["samples"], stage["tokens"], stage["images"], recipe.train.seq_length, True)
    return Planner(recipe, find_gpu(gpu), work, mfu)


@pytest.fixture(scope="module")
def measured_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("state_bytes")
    run_torchrun(WORKER, 4, ["--recipe", str(DEBUG_STAGE2), "--layouts", ",".join(LAYOUTS), "--out", str(out)])
    return {layout: [json.loads((out / f"{layout}.rank{r}.json").read_text()) for r in range(4)] for layout in LAYOUTS}


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", LAYOUTS)
def test_counted_state_equals_what_every_rank_holds(measured_ranks, layout):
    """Parameters, gradient buffers and optimizer state counted on the meta device == the real
    ranks after a step, TP=1/2 x PP=1/2, with and without the distributed optimizer at DP=2.
    The distributed optimizer's last DP shard holds the buckets' padding, so DP rank 0 is the
    fullest: it matches exactly, the others hold at most as much."""
    from tests.workers.state_bytes import layout_recipe

    recipe = layout_recipe(str(DEBUG_STAGE2), layout)
    tp, pp = recipe.parallel.tensor_parallel, recipe.parallel.pipeline_parallel
    from megavlm.training.memory import layout_state_bytes

    for rank in measured_ranks[layout]:
        assert rank["stepped"]
        counted = layout_state_bytes(recipe, tp, pp, rank["dp_size"], rank["pp_rank"])
        real = (rank["params"], rank["grads"], rank["optimizer"])
        if rank["dp_rank"] == 0 or not recipe.optimizer.distributed:
            assert (counted.params, counted.grads, counted.optimizer) == real, rank
        else:
            assert real[:2] == (counted.params, counted.grads) and real[2] <= counted.optimizer, rank


@pytest.mark.parametrize("stage,flavor,gpu,hours", PUBLISHED, ids=["7b-pretrain", "13b-pretrain", "7b-instruct",
                                                                   "13b-instruct"])
def test_llava_15_plan_on_8_a100_is_within_1_5x_of_the_published_time(stage, flavor, gpu, hours):
    fitting, _ = planner(stage, flavor, gpu).plan(8)
    assert fitting, "no layout fits"
    predicted = fitting[0].hours
    assert hours / 1.5 <= predicted <= hours * 1.5, f"{predicted:.2f} h vs published {hours} h"


def test_a_layout_that_does_not_fit_names_the_term_that_overflows():
    """7B full fine-tuning on one 40GB GPU: bf16 weights (13 GiB) and fp32 gradients (25 GiB)
    alone pass the 36 GiB usable; with eight GPUs and the distributed optimizer it fits."""
    plan = planner(INSTRUCT, "llava-1.5-7b", "a100-40gb")
    fitting, failing = plan.plan(1)
    assert not fitting and len(failing) == 1
    row = failing[0]
    assert row.overflow == "gradients"
    assert row.memory.params + row.memory.grads > plan.gpu.usable_bytes > row.memory.params
    fitting, _ = plan.plan(8)
    assert all(r.layout.distributed_optimizer or r.layout.dp == 1 for r in fitting)


def test_activations_overflow_when_the_rows_are_too_long():
    """Stage 1 trains the connector alone (little state); 64K-token rows overflow in activations."""
    recipe = load_recipe(RECIPES / PRETRAIN["recipe"], LOCAL + ["train.seq_length=65536", "train.micro_batch_size=1",
                                                                "model.language.max_seq_len=65536"])
    plan = Planner(recipe, find_gpu("a100-40gb"), Workload(558_128, 60_000, 1.0, 65536, True), 0.4)
    _, failing = plan.plan(1)
    assert failing and failing[0].overflow == "activations"


def test_pipeline_and_recompute_trade_memory_for_time():
    plan = planner(INSTRUCT, "llava-1.5-7b", "h100-80gb")
    base = plan.evaluate(plan.candidates(8)[0])
    assert base.layout.tp == base.layout.pp == 1 and not base.layout.recompute
    recompute = plan.evaluate(dataclasses.replace(base.layout, recompute=True))
    assert recompute.memory.activations < base.memory.activations / 3
    assert recompute.time.step > base.time.step * 1.2


def test_gpu_counts_and_unknown_gpu():
    assert parse_gpu_counts("8..64") == [8, 16, 32, 64]
    assert parse_gpu_counts("8,24") == [8, 24]
    from megavlm.config.schema import ConfigError

    with pytest.raises(ConfigError, match="unknown GPU 'v100'.*h100-80gb"):
        find_gpu("v100")
    with pytest.raises(ConfigError, match="--gpus"):
        parse_gpu_counts("eight")


def test_cli_prints_the_plan_tables_and_a_summary(capsys):
    from tools.plan import main

    code = main([str(RECIPES / "llava_1.5_7b_stage1.yaml"), str(RECIPES / "llava_1.5_7b_stage3.yaml"),
                 "data.packing=true", "--gpu", "h100-80gb", "--gpus", "8,16", "--samples", "100000",
                 "--tokens-per-sample", "700", "--top", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "FLOPs per sample" in out and "Activations" in out and "Memory and time" in out
    assert "fastest at 8 GPUs: parallel.tensor_parallel=" in out
    assert "all stages" in out and "llava-stage3-instruct" in out


def test_cli_without_data_asks_for_the_sample_count(capsys):
    from tools.plan import main

    assert main([str(RECIPES / "llava_1.5_7b_stage1.yaml"), "--brief"]) == 2
    assert "blip_laion_cc_sbu_558k.json does not exist" in capsys.readouterr().err


def test_cli_measures_the_embedded_data(small_embedded, capsys):
    from tools.plan import main

    recipe = RECIPES / "quickstart" / "llava_debug_stage2.yaml"
    overrides = [f"data.train={small_embedded}/captions_train.jsonl", f"data.tokenizer={small_embedded}/tokenizer.model"]
    assert main([str(recipe), *overrides, "--gpus", "8", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)[0]
    work = plan["workload"]
    assert work["samples"] == 3 * 768 and 20 < work["tokens_per_sample"] < 48 and work["images_per_sample"] == 1.0
    assert plan["plans"]["8"][0]["fits"]


@pytest.mark.parametrize("recompute", [False, True])
def test_validate_counts_state_exactly_and_activations_within_15_percent(recompute):
    recipe = load_recipe(DEBUG_STAGE2, ["train.dtype=bf16", f"train.recompute={str(recompute).lower()}",
                                        "train.micro_batch_size=4", "train.seq_length=64"])
    rows = {name: (estimated, measured) for name, estimated, measured in validate(recipe)}
    for name in ("parameters", "gradient buffers", "optimizer state"):
        assert rows[name][0] == rows[name][1], name
    estimated, measured = rows["activations (saved tensors)"]
    assert estimated == pytest.approx(measured, rel=0.15)
