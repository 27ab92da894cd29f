"""Shared fixtures: a one-process megatron-core world, torchrun launches, HF reference models."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


@pytest.fixture(scope="session")
def single_process():
    """torch.distributed + megatron-core groups for one process (TP=PP=DP=1, gloo)."""
    from megavlm.config.model import ParallelConfig
    from megavlm.parallel import init as pinit

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(key, None)
    ctx = pinit.initialize(ParallelConfig(), seed=0)
    yield ctx


@pytest.fixture
def own_world():
    """For a test that sets up process groups of its own (the planner's fake world, a benchmark
    harness): the shared one-process world is torn down before it and rebuilt after it."""
    from megavlm.config.model import ParallelConfig
    from megavlm.parallel import init as pinit

    pinit.destroy()
    yield
    pinit.destroy()
    pinit.initialize(ParallelConfig(), seed=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: Path, nproc: int, args: list[str], timeout: int = 600, cwd: Path = ROOT) -> str:
    """Launch ``script`` under torchrun with ``nproc`` gloo processes; fail with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", str(script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"torchrun {script.name} failed with exit code {proc.returncode}:\n{out}")
    return proc.stdout


def tiny_hf_llava(model_cfg, seed: int = 0):
    """An HF LlavaForConditionalGeneration with megavlm's config, random weights (no download)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from megavlm.models.llava.state_dict_adapter import config_to_hf

    torch.manual_seed(seed)
    hf_config = LlavaConfig.from_dict(config_to_hf(model_cfg))
    model = LlavaForConditionalGeneration(hf_config).eval()
    # HF initialises norms to 1 and biases to 0; perturb every 1-D tensor so the parity checks
    # would notice one that is dropped or misplaced.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


# ---- one 4-process run of the LLaVA debug step under several layouts (shared by the layout
# parity tests and the CPU-compat smoke test) ------------------------------------------------
PARALLEL_WORKER = ROOT / "tests" / "workers" / "parallel_step.py"
LAYOUT_SAMPLES, LAYOUT_SEQ = 4, 48


def reference_step(single_ctx, cfg, hf_state, samples: int = LAYOUT_SAMPLES, lora_init=None):
    """Single process: same weights, the whole global batch as 4 micro-batches, one optimizer step."""
    from megavlm.config.model import ParallelConfig
    from megavlm.data.synthetic import synthetic_batches
    from megavlm.models.registry import get_family
    from megavlm.parallel.init import process_groups
    from megavlm.training.build import build_model, load_local_state, wrap_ddp
    from megavlm.models.common.layer_specs import lm_head
    from megavlm.training.step import configure_schedule, lm_loss_fn
    from tests.workers.parallel_step import add_lora, make_optimizer, named_results, step_and_collect

    pgs = process_groups()
    adapter = get_family("llava").adapter_cls(cfg)
    model = build_model(cfg, ParallelConfig(), single_ctx, pgs)
    load_local_state(model, adapter.hf_to_megavlm(hf_state))
    if lora_init:
        add_lora(model, adapter, lora_init, single_ctx)
    ddp = wrap_ddp(model)
    configure_schedule([ddp])
    batches = synthetic_batches(cfg, samples, LAYOUT_SEQ, micro_batch_size=1, seed=0)
    loss_fn = lm_loss_fn(lm_head(cfg, pgs.tp, model.output_weight))
    out = step_and_collect(ddp, make_optimizer([ddp]), batches, loss_fn, LAYOUT_SEQ, single_ctx)
    return dict(named_results(adapter, out), batches=batches)


@pytest.fixture(scope="session")
def parallel_runs(single_process, tmp_path_factory):
    from safetensors.torch import save_file

    from megavlm.models.registry import flavor_config

    tmp = tmp_path_factory.mktemp("layouts")
    cfg = flavor_config("llava", "debug")
    hf = tiny_hf_llava(cfg, seed=0)
    hf_state = {k: v.clone() for k, v in hf.state_dict().items()}
    save_file(hf_state, tmp / "init.safetensors")
    run_torchrun(PARALLEL_WORKER, 4, ["--init", str(tmp / "init.safetensors"), "--layouts", "1x1,2x1,1x2,2x2",
                                      "--out", str(tmp), "--optimizer-step", "--checkpoint", str(tmp / "ckpt"),
                                      "--samples", str(LAYOUT_SAMPLES), "--seq-length", str(LAYOUT_SEQ)])
    results = {name: torch.load(tmp / f"{name}.pt") for name in ("tp1_pp1", "tp2_pp1", "tp1_pp2", "tp2_pp2")}
    return {"cfg": cfg, "hf": hf, "hf_state": hf_state, "results": results, "ckpt": tmp / "ckpt",
            "ref": reference_step(single_process, cfg, hf_state)}


# ---- the embedded dataset, small, and recipes pointing at it ---------------------------------
QUICKSTART = ROOT / "examples" / "recipes" / "quickstart"


@pytest.fixture(scope="session")
def small_embedded(tmp_path_factory) -> Path:
    from megavlm.data.embedded import generate

    out = tmp_path_factory.mktemp("embedded")
    generate(out, seed=0, splits={"train": 768, "val": 48, "test": 48})
    return out


@dataclass
class QuickstartRun:
    workdir: Path     # holds data/embedded and outputs/quickstart/stage{0,1,2,3}
    stdout: str

    def metrics(self, stage: int) -> dict:
        return json.loads((self.workdir / "outputs" / "quickstart" / f"stage{stage}" / "final_metrics.json")
                          .read_text())["metrics"]


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> QuickstartRun:
    """README's quick-start command as a user types it, once per session (2 processes, TP=2, the
    embedded data generated on first use): its checkpoints serve the quick-start and the
    evaluation tests."""
    workdir = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "WORKDIR": str(workdir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh")], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return QuickstartRun(workdir, proc.stdout)


def data_overrides(data_dir: Path, captions: bool = True) -> list[str]:
    kind = "captions" if captions else "conversations"
    ext = "jsonl" if captions else "json"
    return [f"data.embedded=null", f"data.train={data_dir}/{kind}_train.{ext}",
            f"data.validation={data_dir}/{kind}_val.{ext}", f"data.tokenizer={data_dir}/tokenizer.model",
            f"eval.captions={data_dir}/captions_test.jsonl", "logging.progress=false", "data.sources=[]",
            "eval.benchmarks=[]", "stage.init_from=null"]


@pytest.fixture(scope="session")
def trained_clip(single_process, small_embedded, tmp_path_factory):
    """The debug CLIP trained from scratch on the small embedded set, once per session (96
    steps): (its checkpoint directory, its held-out metrics)."""
    from megavlm.config.recipe import load_recipe
    from megavlm.training.trainer import Trainer

    out = tmp_path_factory.mktemp("clip")
    recipe = load_recipe(ROOT / "examples" / "recipes" / "clip" / "clip_debug_pretrain.yaml", data_overrides(
        small_embedded) + ["parallel.tensor_parallel=1", f"checkpoint.dir={out}", "train.epochs=8",
                           "train.log_interval=1000", "eval.max_samples=48", "train.eval_samples=48",
                           "checkpoint.keep_best=0", "checkpoint.save_every_epoch=false"])
    metrics = Trainer(recipe).run()
    return out, metrics
