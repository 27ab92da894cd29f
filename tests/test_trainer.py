"""The staged trainer in one process: recipes, freezing, optimizer groups, resume, checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megavlm.config.recipe import load_recipe
from megavlm.config.schema import ConfigError
from megavlm.models.common.tags import component_of
from megavlm.training import checkpoint as ckpt_mod
from megavlm.training.trainer import Trainer
from tests.conftest import QUICKSTART, ROOT, data_overrides

STAGE1 = QUICKSTART / "llava_debug_stage1.yaml"


def _recipe(tmp_path: Path, data_dir: Path, *extra: str, path: Path = STAGE1):
    base = ["parallel.tensor_parallel=1", f"checkpoint.dir={tmp_path / 'ckpt'}", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.eval_samples=8", "eval.max_samples=8", "train.log_interval=1000"]
    return load_recipe(path, base + data_overrides(data_dir) + list(extra))


def _losses(ckpt_dir: Path) -> dict[int, float]:
    lines = (ckpt_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


# ---- recipes -------------------------------------------------------------------------------
def test_every_example_recipe_validates():
    recipes = sorted((ROOT / "examples").rglob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        load_recipe(path)


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=1", r"unknown key 'optimizer.lrr' in .*llava_debug_stage1.yaml.*did you mean 'lr'"),
    ("train.micro_batch_size=five", r"'train.micro_batch_size'.*expected an integer"),
    ("stage.trainable=[vision,projector]", r"'stage.trainable'.*unknown component.*projector"),
    ("model.language.hiden_size=8", r"unknown key 'model.language.hiden_size'.*did you mean 'hidden_size'"),
    ("model.flavor=huge", r"'model.flavor'.*unknown llava flavor 'huge'"),
    ("train.global_batch_size=10", r"'train.global_batch_size'.*not a multiple of micro_batch_size"),
])
def test_recipe_errors_name_the_key_and_file(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(STAGE1, [override])


def test_recipe_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {family: llava, flavor: debug}\nstage: {trainabel: [llm]}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'stage.trainabel' in .*bad.yaml"):
        load_recipe(bad)


# ---- stages ------------------------------------------------------------------------------------
def test_freezing_and_optimizer_groups(single_process, small_embedded, tmp_path):
    recipe = _recipe(tmp_path, small_embedded, "train.max_steps=3", "checkpoint.dir=",
                     "stage.trainable=[connector,llm]", "stage.lr={connector: 0.01}", "optimizer.lr=0.001",
                     "optimizer.weight_decay=0.1", "optimizer.warmup_steps=0")
    trainer = Trainer(recipe)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    for name, param in trainer.model.named_parameters():
        component = component_of(param)
        if component == "vision":
            assert not param.requires_grad and torch.equal(param, before[name]), name
            assert not hasattr(param, "main_grad"), f"{name}: frozen parameters get no gradient buffer"
        else:
            assert param.requires_grad and not torch.equal(param, before[name]), name
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    groups = trainer.optimizer.param_groups
    connector = [g for g in groups if g["params"] and component_of(g["params"][0]) == "connector"]
    llm = [g for g in groups if g["params"] and component_of(g["params"][0]) == "llm"]
    assert {g["max_lr"] for g in connector} == {0.01} and {g["max_lr"] for g in llm} == {0.001}
    for group in groups:  # no decay on biases and norms
        one_dim = all(p.dim() == 1 for p in group["params"])
        assert group["weight_decay"] == (0.0 if one_dim else 0.1)
    assert not trainer.model.vision.training and trainer.model.connector.training


# ---- checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distributed-adam"])
def test_resume_is_bitwise_identical(single_process, small_embedded, tmp_path, distributed):
    common = ["train.max_steps=6", "stage.trainable=[connector,llm]", f"optimizer.distributed={str(distributed).lower()}",
              "optimizer.warmup_steps=1"]
    straight = _recipe(tmp_path / "a", small_embedded, *common)
    Trainer(straight).run()
    first = _recipe(tmp_path / "b", small_embedded, *common, "train.exit_at_step=3")
    Trainer(first).run()
    assert [s for s, _ in ckpt_mod.CheckpointManager(first.checkpoint, first.model).completed()] == [3]
    Trainer(first, resume=True).run()
    a, b = _losses(tmp_path / "a" / "ckpt"), _losses(tmp_path / "b" / "ckpt")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s] == b[s] for s in a), (a, b)  # bitwise


def test_recompute_gives_the_same_losses(single_process, small_embedded, tmp_path):
    common = ["train.max_steps=3", "stage.trainable=[connector,llm]", "eval.captions=null"]
    Trainer(_recipe(tmp_path / "a", small_embedded, *common)).run()
    Trainer(_recipe(tmp_path / "b", small_embedded, *common, "train.recompute=true")).run()
    assert _losses(tmp_path / "a" / "ckpt") == _losses(tmp_path / "b" / "ckpt")


def test_bf16_trains_with_fp32_master_weights(single_process, small_embedded, tmp_path):
    common = ["train.max_steps=3", "stage.trainable=[connector,llm]", "eval.captions=null"]
    Trainer(_recipe(tmp_path / "a", small_embedded, *common)).run()
    trainer = Trainer(_recipe(tmp_path / "b", small_embedded, *common, "train.dtype=bf16"))
    trainer.run()
    assert next(trainer.model.language_model.parameters()).dtype == torch.bfloat16
    inner = trainer.optimizer.chained_optimizers[0]
    assert type(inner).__name__ == "Float16OptimizerWithFloat16Params"
    assert all(p.dtype == torch.float32 for g in inner.optimizer.param_groups for p in g["params"])
    fp32, bf16 = _losses(tmp_path / "a" / "ckpt"), _losses(tmp_path / "b" / "ckpt")
    assert all(abs(fp32[s] - bf16[s]) < 0.05 for s in fp32), (fp32, bf16)


def test_kernels_selected_by_recipe_train_and_evaluate_like_torch(single_process, small_embedded, tmp_path):
    common = ["train.max_steps=2", "stage.trainable=[connector,llm]", "eval.max_samples=8"]
    torch_metrics = Trainer(_recipe(tmp_path / "a", small_embedded, *common)).run()
    fused = ["model.kernels.fused_linear_cross_entropy=true", "model.kernels.connector=triton",
             "model.kernels.loss_chunk_tokens=64"]
    kernel_metrics = Trainer(_recipe(tmp_path / "b", small_embedded, *common, *fused)).run()
    a, b = _losses(tmp_path / "a" / "ckpt"), _losses(tmp_path / "b" / "ckpt")
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    assert kernel_metrics == pytest.approx(torch_metrics, abs=1e-4)


def test_packing_and_a_mixture_train(single_process, small_embedded, tmp_path):
    sources = (f"data.sources=[{{path: {small_embedded}/captions_train.jsonl, format: captions, weight: 0.7}}, "
               f"{{path: {small_embedded}/captions_val.jsonl, format: captions, weight: 0.3}}]")
    trainer = Trainer(_recipe(tmp_path, small_embedded, "train.max_steps=3", "data.train=", sources, "data.packing=true",
                              "train.seq_length=96", "data.augment.enabled=true", "stage.trainable=[connector,llm]", "eval.captions=null"))
    trainer.run()
    losses = _losses(tmp_path / "ckpt")
    assert len(losses) == 3 and all(v == v for v in losses.values())  # finite
    batches, _ = trainer.loader.next_step()
    assert all(b["input_ids"].shape == (1, 96) and b["packed_seq_params"].qkv_format == "thd" for b in batches)
    assert len(batches) <= 4  # 8 samples of ~30 tokens share rows of 96


def test_keep_last_and_keep_best(tmp_path):
    from megavlm.config.recipe import CheckpointConfig
    from megavlm.models.registry import flavor_config

    cfg = CheckpointConfig(dir=str(tmp_path), keep_last=2, keep_best=1, best_metric="val/loss", best_mode="min")
    manager = ckpt_mod.CheckpointManager(cfg, flavor_config("llava", "debug"))
    for step, loss in [(1, 5.0), (2, 1.0), (3, 4.0), (4, 3.0), (5, 6.0)]:
        path = tmp_path / f"step_{step:08d}"
        path.mkdir()
        (path / ckpt_mod.TRAINER_STATE_FILE).write_text(json.dumps({"metrics": {"val/loss": loss}}))
        manager._retain()
    assert [s for s, _ in manager.completed()] == [2, 4, 5]  # best (step 2) + last two


def test_interrupted_save_leaves_previous_checkpoint_loadable(single_process, small_embedded, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, small_embedded, "train.max_steps=4", "train.exit_at_step=2")
    trainer = Trainer(recipe)
    trainer.run()
    good = trainer.ckpt.latest()
    reference = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save

    def dying_save(state, directory, *args, **kwargs):
        real_save(state, directory, *args, **kwargs)  # shards are written...
        raise KeyboardInterrupt("killed during save")  # ...but the process dies before completing

    monkeypatch.setattr(dist_checkpointing, "save", dying_save)
    trainer.step += 1
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    assert trainer.ckpt.latest() == good
    assert list(Path(recipe.checkpoint.dir).glob(".tmp-step_*"))  # the partial save is visibly incomplete
    resumed = Trainer(recipe, resume=True)
    assert resumed.step == 2
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, reference[name]), name
    resumed.save()
    assert not list(Path(recipe.checkpoint.dir).glob(".tmp-step_*"))  # cleaned by the next save


def test_missing_data_file_is_named(single_process, small_embedded, tmp_path):
    recipe = _recipe(tmp_path, small_embedded, f"data.train={tmp_path}/nope.jsonl")
    with pytest.raises(ConfigError, match=r"'data.train'.*nope.jsonl does not exist"):
        Trainer(recipe)


def test_image_token_mismatch_with_tokenizer_is_named(single_process, small_embedded, tmp_path):
    recipe = _recipe(tmp_path, small_embedded, "model.image_token_id=7")
    with pytest.raises(ConfigError, match=r"'model.image_token_id': 7, but the tokenizer .* maps <image> to 3"):
        Trainer(recipe)
