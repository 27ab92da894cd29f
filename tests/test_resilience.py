"""Long runs that survive: faults injected one by one, and what the run did.

Text the tokenizer cannot spell vs a template mismatch; all-bad (empty) steps; a NaN gradient;
SIGUSR1 mid-run then --resume; a truncated shard; keep_best by metrics of the checkpoint's own
step; and, under torchrun, a skip-budget stop and a killed worker under --max-restarts.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from megavlm.config.recipe import CheckpointConfig, load_recipe
from megavlm.data.examples import ExampleBuilder
from megavlm.data.images import PILBackend
from megavlm.data.loader import load_examples
from megavlm.data.records import open_source
from megavlm.data.templates import ConversationEncoder, TemplateMismatch, UnrepresentableText, get_template
from megavlm.data.tokenizer import load_tokenizer
from megavlm.models.registry import flavor_config
from megavlm.training import checkpoint as ckpt_mod
from megavlm.training.resilience import StopRequest
from tests.conftest import QUICKSTART, ROOT, _free_port, data_overrides

CFG = flavor_config("llava", "debug")
TOKENS = CFG.vision.tokens_per_image
HARD_TEXT = ["3 red circles, 12 in all", "un café près de la fenêtre", "東京の赤い四角", "½ a ﬁsh"]


def _captions(folder: Path, image: Path, texts: list[str], missing: int = 0) -> Path:
    """A captions file: ``missing`` samples whose image does not exist, then one per text."""
    lines = [{"id": f"gone{i}", "image": str(folder / f"gone{i}.jpg"), "caption": "red"} for i in range(missing)]
    lines += [{"id": f"s{i}", "image": str(image), "caption": t} for i, t in enumerate(texts)]
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def no_fallback_tokenizer(tmp_path_factory):
    """A sentencepiece model without byte fallback whose corpus has no digits, accents or CJK."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("nofallback")
    (out / "corpus.txt").write_text("two red circles on a white background\na blue square to the left\n" * 20)
    spm.SentencePieceTrainer.train(input=str(out / "corpus.txt"), model_prefix=str(out / "tok"), vocab_size=40,
                                   model_type="bpe", user_defined_symbols=["<image>"], character_coverage=1.0,
                                   hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return load_tokenizer(out / "tok.model")


# ---- 1. no good sample lost --------------------------------------------------------------------
def test_embedded_tokenizer_delivers_digits_accents_and_cjk(small_embedded, tmp_path):
    tok = load_tokenizer(small_embedded / "tokenizer.model")
    image = next((small_embedded / "images" / "train").iterdir())
    source = open_source(_captions(tmp_path, image, HARD_TEXT), "captions")
    builder = ExampleBuilder(ConversationEncoder(tok, get_template("plain"), TOKENS, tok.image_token_id), 96)
    examples, skipped = load_examples(source, builder, PILBackend(56), list(range(len(source))), 0)
    assert skipped == [] and [ex.notes for ex in examples] == [[]] * len(HARD_TEXT)
    for ex, text in zip(examples, HARD_TEXT):
        supervised = [t for t in ex.labels if t >= 0][:-1]  # the caption, then eos
        assert tok.decode(supervised) == tok.normalize(text)
    assert tok.unknown_characters("".join(HARD_TEXT)) == []


def test_unrepresentable_text_is_its_own_reason_not_a_mismatch(no_fallback_tokenizer):
    tok = no_fallback_tokenizer
    pairs = [("<image>\n", "3 red café")]
    notes = []
    trained = ConversationEncoder(tok, get_template("plain"), 2, tok.image_token_id, "train")
    ids, _ = trained.encode(pairs, 1, "s3", notes=notes)
    assert tok.sp.unk_id() in ids  # trains with the unknown piece
    assert [r for r, _ in notes] == ["unrepresentable_text"]
    assert "sample s3" in notes[0][1] and "'3' (U+0033)" in notes[0][1] and "'é' (U+00E9)" in notes[0][1]
    skipping = ConversationEncoder(tok, get_template("plain"), 2, tok.image_token_id, "skip")
    with pytest.raises(UnrepresentableText, match=r"sample s3: .*cannot represent '3'.*skipped"):
        skipping.encode(pairs, 1, "s3")

    class Garbling:  # spells every character, but its decode adds text: a real mismatch
        bos_ids, eos_id, path = tok.bos_ids, tok.eos_id, "garbling.model"
        encode, normalize, unknown_characters = tok.encode, tok.normalize, lambda self, text: []

        def decode(self, ids):
            return tok.decode(ids) + " ASSISTANT"

    mismatched = ConversationEncoder(Garbling(), get_template("plain"), 2, tok.image_token_id)
    with pytest.raises(TemplateMismatch, match=r"sample s4: supervised tokens decode to 'red ASSISTANT'"):
        mismatched.encode([("<image>\n", "red")], 1, "s4")


def test_template_mismatch_stops_at_the_first_sample(no_fallback_tokenizer, small_embedded, tmp_path):
    tok = no_fallback_tokenizer
    image = next((small_embedded / "images" / "train").iterdir())
    source = open_source(_captions(tmp_path, image, ["red", "two red"]), "captions")

    class Garbling(type(tok)):
        def decode(self, ids):
            return super().decode(ids) + "!"

    bad = Garbling(tok.path)
    builder = ExampleBuilder(ConversationEncoder(bad, get_template("plain"), 2, bad.image_token_id), 64)
    with pytest.raises(TemplateMismatch, match="sample s0"):
        load_examples(source, builder, PILBackend(56), [0, 1], 0)


# ---- 2, 4, 5, 6 in one process: empty steps, NaN gradient, SIGUSR1 + resume, truncated shard -----
def _recipe(ckpt: Path, data_dir: Path, train_file: Path, *extra: str):
    base = ["parallel.tensor_parallel=1", f"checkpoint.dir={ckpt}", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.eval_samples=8", "eval.max_samples=8", "train.log_interval=1000",
            "train.max_steps=6", "stage.trainable=[connector,llm]", "optimizer.warmup_steps=1", "data.shuffle=false",
            "checkpoint.save_interval=2", "checkpoint.keep_last=3", "eval.captions=null"]
    return load_recipe(QUICKSTART / "llava_debug_stage1.yaml",
                       base + data_overrides(data_dir) + [f"data.train={train_file}", *extra])


def _records(ckpt: Path) -> dict[int, dict]:
    records: dict[int, dict] = {}
    for line in (ckpt / "tensorboard" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["step"], {}).update(record)  # a replayed step keeps its last values
    return records


NAN_STEP, SIGNAL_STEP = 4, 3


class Faults:
    """A NaN gradient at NAN_STEP and (optionally) SIGUSR1 to this process during SIGNAL_STEP,
    injected through a gradient hook on one connector weight."""

    def __init__(self, trainer, send_signal: bool):
        self.trainer, self.send_signal = trainer, send_signal
        param = next(p for n, p in trainer.model.named_parameters() if "connector" in n and p.dim() == 2)
        param.register_hook(self)

    def __call__(self, grad):
        step = self.trainer.step + 1  # the step being computed
        if self.send_signal and step == SIGNAL_STEP:
            os.kill(os.getpid(), signal.SIGUSR1)
        return grad * float("nan") if step == NAN_STEP else grad


@pytest.fixture(scope="module")
def fault_runs(single_process, small_embedded, tmp_path_factory):
    from megavlm.training.trainer import Trainer

    tmp = tmp_path_factory.mktemp("faults")
    image = next((small_embedded / "images" / "train").iterdir())
    texts = [HARD_TEXT[i % 4] if i % 3 == 0 else "two red circles on a white background" for i in range(40)]
    train_file = _captions(tmp, image, texts, missing=8)  # step 1: every sample's image is missing
    straight = _recipe(tmp / "a", small_embedded, train_file)
    trainer = Trainer(straight)
    Faults(trainer, send_signal=False)
    trainer.run()
    interrupted = _recipe(tmp / "b", small_embedded, train_file)
    first = Trainer(interrupted)
    Faults(first, send_signal=True)
    first.run()
    stopped_at = first.step
    second = Trainer(interrupted, resume=True)
    Faults(second, send_signal=False)
    second.run()
    return {"tmp": tmp, "straight": straight, "a": _records(tmp / "a"), "b": _records(tmp / "b"),
            "stopped_at": stopped_at, "skips": trainer.skips, "train_file": train_file, "data": small_embedded}


def _same(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y))


def test_empty_step_is_skipped_and_counted(fault_runs):
    a = fault_runs["a"]
    assert "train/loss" not in a[1] and a[1]["train/empty_steps"] == 1.0
    assert a[1]["skipped/missing_image"] == 8.0
    assert a[6]["train/empty_steps"] == 1.0 and math.isfinite(a[2]["train/loss"])
    assert fault_runs["skips"].counts == {"missing_image": 8}  # hard text trains: no unrepresentable_text


def test_nan_gradient_skips_the_update(fault_runs):
    a = fault_runs["a"]
    assert a[NAN_STEP]["train/bad_steps"] == 1.0 and math.isnan(a[NAN_STEP]["train/grad_norm"])
    assert all(math.isfinite(a[s]["train/loss"]) for s in (NAN_STEP + 1, 6))  # weights were not poisoned
    assert a[NAN_STEP - 1]["train/bad_steps"] == 0.0


def test_sigusr1_saves_and_resume_gives_bitwise_the_same_losses(fault_runs):
    assert fault_runs["stopped_at"] == SIGNAL_STEP
    a, b = fault_runs["a"], fault_runs["b"]
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in range(2, 7):
        assert _same(a[step]["train/loss"], b[step]["train/loss"]), (step, a[step], b[step])
    assert (fault_runs["tmp"] / "b" / f"step_{SIGNAL_STEP:08d}" / ckpt_mod.TRAINER_STATE_FILE).is_file()


def test_truncated_shard_is_named_and_resume_falls_back(fault_runs, capsys):
    from megavlm.training.trainer import Trainer

    recipe = fault_runs["straight"]
    manager = ckpt_mod.CheckpointManager(recipe.checkpoint, CFG)
    latest = manager.latest()
    shard = max((latest / "model").glob("*.distcp"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ckpt_mod.CheckpointError, match=rf"{shard}.* has 100 bytes.*truncated"):
        ckpt_mod.load_model(Trainer(recipe).model, latest)
    resumed = Trainer(recipe, resume=True)
    assert resumed.step == 4 and "falling back to the previous one" in capsys.readouterr().out
    resumed.run()  # trains 5 and 6 again from step 4
    a = _records(Path(recipe.checkpoint.dir))
    assert all(_same(a[s]["train/loss"], fault_runs["b"][s]["train/loss"]) for s in (5, 6))


def test_keep_best_uses_metrics_of_the_checkpoints_own_step_and_keeps_an_intact_one(tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path), keep_last=1, keep_best=1, best_metric="val/loss", best_mode="min")
    manager = ckpt_mod.CheckpointManager(cfg, CFG)
    states = [(1, 5.0, 1), (2, 1.0, 1), (3, 4.0, 3)]  # step 2 carries step 1's (stale) score
    for step, loss, measured_at in states:
        path = tmp_path / f"step_{step:08d}"
        (path / "model").mkdir(parents=True)
        (path / "model" / "metadata.json").write_text("{}")
        ckpt_mod.write_manifest(path)
        (path / ckpt_mod.TRAINER_STATE_FILE).write_text(json.dumps({"metrics": {"val/loss": loss},
                                                                    "metrics_step": measured_at}))
        manager._retain()
    assert [s for s, _ in manager.completed()] == [3]  # step 2's 1.0 was measured at step 1
    newest = tmp_path / "step_00000004"
    (newest / "model").mkdir(parents=True)
    (newest / "model" / "metadata.json").write_text("{}")
    (newest / "model" / "shard.distcp").write_text("x" * 10)
    ckpt_mod.write_manifest(newest)
    (newest / "model" / "shard.distcp").write_text("x")  # truncated after the save
    (newest / ckpt_mod.TRAINER_STATE_FILE).write_text(json.dumps({}))
    manager._retain()
    assert [s for s, _ in manager.completed()] == [3, 4]  # step 3 is the only intact one: kept


def test_stop_request_agrees_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(exit_duration_minutes=None)
    assert stop.poll() is None
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.poll() == "received SIGUSR1"
    stop.close()
    assert signal.getsignal(signal.SIGUSR1) == before
    timed = StopRequest(exit_duration_minutes=1e-6)
    time.sleep(0.01)
    assert timed.poll() == "train.exit_duration_minutes reached"
    timed.close()


# ---- 3 and 7 under torchrun: a skip-budget stop; a killed worker under --max-restarts ------------
FAULTY = ROOT / "tests" / "workers" / "faulty_train.py"


def _torchrun(args: list[str], *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           *extra, str(FAULTY), str(QUICKSTART / "llava_debug_stage1.yaml"), *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files: no pipe a stray child holds open
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True, timeout=timeout)
        out.seek(0)
        err.seek(0)
        proc.stdout, proc.stderr = out.read(), err.read()
    return proc


def test_under_torchrun_skip_budget_stops_cleanly_and_a_killed_worker_resumes(small_embedded, tmp_path):
    image = next((small_embedded / "images" / "train").iterdir())
    common = ["parallel.tensor_parallel=1", "train.global_batch_size=8", "train.micro_batch_size=2",
              "train.log_interval=1000", "train.max_steps=5", "stage.trainable=[connector]", "optimizer.warmup_steps=1",
              "checkpoint.save_interval=2", "eval.captions=null", "data.validation=null", "data.shuffle=false",
              "data.embedded=null", f"data.train={small_embedded}/captions_train.jsonl",
              f"data.tokenizer={small_embedded}/tokenizer.model", "logging.progress=false", "stage.init_from=null"]
    bad = _captions(tmp_path, image, ["red"] * 40, missing=8)
    started = time.monotonic()
    stop = _torchrun([*common, f"data.train={bad}", "data.min_skip_budget=2", f"checkpoint.dir={tmp_path / 'c'}"])
    output = stop.stdout + stop.stderr
    assert stop.returncode != 0 and time.monotonic() - started < 120
    assert output.count("error: 8 of 8 samples were skipped") == 1, output[-3000:]
    assert "over the budget of 2" in output and "exitcode  : 2" in output
    assert f'File "{ROOT / "megavlm"}' not in output, output[-3000:]  # no worker traceback

    reference = _torchrun([*common, f"checkpoint.dir={tmp_path / 'ref'}"])
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-3000:]
    killed = _torchrun([*common, f"checkpoint.dir={tmp_path / 'kill'}", "--kill-rank1-at-step=3"], "--max-restarts=1")
    assert killed.returncode == 0, (killed.stdout + killed.stderr)[-3000:]
    assert "torchrun restart 1: resuming" in killed.stdout and "resumed from" in killed.stdout
    ref, kill = _records(tmp_path / "ref"), _records(tmp_path / "kill")
    assert sorted(ref) == sorted(kill) == list(range(1, 6))
    assert all(_same(ref[s]["train/loss"], kill[s]["train/loss"]) for s in ref), (ref, kill)
    assert ref[2]["train/bad_steps"] == kill[2]["train/bad_steps"] == 1.0  # NaN on rank 1 only: both skipped
