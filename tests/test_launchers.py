"""examples/launch.sh turns environment / Slurm variables into torchrun's node layout."""
import os
import subprocess

import pytest

from tests.conftest import ROOT

LAUNCH = ROOT / "examples" / "launch.sh"


def _launch(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "GPUS"))}
    env.update(env_extra, PYTHON="/bin/echo", PATH="/usr/bin:/bin")  # echo the command instead of running it
    proc = subprocess.run(["bash", str(LAUNCH), "recipe.yaml", "--resume", "train.max_steps=3"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_explicit_environment():
    cmd = _launch({"GPUS": "4", "NNODES": "3", "NODE_RANK": "2", "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert "--nnodes 3 --node_rank 2 --nproc_per_node 4 --master_addr head --master_port 1234" in cmd
    assert cmd.endswith("-m megavlm.train recipe.yaml --resume train.max_steps=3")


def test_slurm_variables():
    cmd = _launch({"GPUS": "8", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[003-004,010]",
                   "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr gpu003 --master_port 29500" in cmd


def test_single_node_defaults():
    cmd = _launch({})
    assert "--nnodes 1 --node_rank 0 --nproc_per_node 1 --master_addr localhost" in cmd


def test_throughput_benchmark_runs_ours_and_hf_side_by_side():
    """tools/benchmark_throughput.py at the debug shape: both implementations run the same step
    and report tokens/s and FLOPs (the GPU table comes from tools/gpu/bench_throughput.sh)."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark_throughput.py"), "--flavor", "debug",
                           "--batch", "2", "--seq", "128", "--steps", "1", "--warmup", "1", "--stages", "1", "2",
                           "--peers", "ours", "hf", "--fill", "0.75", "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout[proc.stdout.index("["):])
    assert {(r["peer"], r["stage"]) for r in rows} == {("ours", 1), ("hf", 1), ("ours", 2), ("hf", 2)}
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0
        # a quarter of every row is padding: tokens/s counts the real tokens only
        assert r["padding_fraction"] == 0.25
        assert r["tokens_per_s"] == r["real_tokens_per_s"] == pytest.approx(0.75 * r["row_tokens_per_s"])
    stage1, stage2 = (next(r for r in rows if r["peer"] == "ours" and r["stage"] == s) for s in (1, 2))
    assert stage2["tflops"] * stage2["step_s"] > stage1["tflops"] * stage1["step_s"]  # LLM weight grads cost FLOPs


def test_preemption_signal_reaches_the_workers_not_torchrun(tmp_path):
    """SIGUSR1 to launch.sh (Slurm's --signal=USR1@120): torchrun survives it, the workers get it
    and their clean exit is the script's exit status."""
    import signal
    import sys
    import time

    fake = tmp_path / "python"  # stands in for "python -m torch.distributed.run ...": one worker
    fake.write_text("#!/bin/bash\n"
                    f"{sys.executable} -c \"import signal, sys, time\n"
                    "signal.signal(signal.SIGUSR1, lambda *a: (print('worker saved a checkpoint', flush=True), sys.exit(0)))\n"
                    "print('worker ready', flush=True); time.sleep(60); sys.exit(1)\" &\n"
                    "wait $!\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "GPUS"))}
    env.update(PYTHON=str(fake), PATH="/usr/bin:/bin")
    proc = subprocess.Popen(["bash", str(LAUNCH), "recipe.yaml"], env=env, stdout=subprocess.PIPE, text=True)
    lines = []
    while not lines or lines[-1].strip() != "worker ready":
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGUSR1)
    start = time.monotonic()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "worker saved a checkpoint" in out
    assert time.monotonic() - start < 10


# ---- examples/*.sh: the same file is a bash script and a torchrun program ----------------------
EXAMPLES = ROOT / "examples"


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "GPUS", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_every_launcher_is_valid_bash_and_python():
    import ast

    for script in sorted(EXAMPLES.glob("*.sh")):
        if script.name == "launch.sh":  # the torchrun wrapper the others call; never given to torchrun
            continue
        text = script.read_text()
        ast.parse(text, filename=str(script))
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
        assert "run_example(__file__" in text, f"{script.name}: the Python half does not run the stages"


def test_sbatch_runs_srun_then_the_launcher_under_torchrun(tmp_path):
    """sbatch -> srun (one task per node) -> bash examples/X.sh -> launch.sh -> torchrun on X.sh itself."""
    fake_srun = tmp_path / "srun"
    fake_srun.write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    fake_srun.chmod(0o755)
    env = _clean_env(PATH=f"{tmp_path}:/usr/bin:/bin", PYTHON="/bin/echo", SLURM_NNODES="2", SLURM_NODEID="1",
                     SLURM_JOB_NODELIST="gpu[003-004]", SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_ID="42")
    proc = subprocess.run(["bash", str(EXAMPLES / "slurm" / "pretrain_blip2.sbatch"), "train.max_steps=3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.strip().splitlines()[-1]
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 2 --master_addr gpu003" in cmd
    assert cmd.endswith(f"{EXAMPLES}/pretrain_blip2.sh --resume train.max_steps=3")


def _stage_losses(workdir, stage: str) -> list[float]:
    import json

    lines = (workdir / "outputs" / "blip2" / stage / "tensorboard" / "metrics.jsonl").read_text().splitlines()
    return [row["train/loss"] for row in map(json.loads, lines) if "train/loss" in row]


@pytest.mark.multiproc
def test_blip2_pipeline_bash_and_torchrun_give_the_same_losses(small_embedded, tmp_path):
    """`bash examples/pretrain_blip2.sh` and `torchrun --nproc_per_node 2 examples/pretrain_blip2.sh`: the same
    stage-1 and stage-2 losses; and stage 2 run in the same processes after stage 1 equals stage 2 run
    alone with `-m megavlm.train` from stage 1's checkpoint (nothing leaks from one stage to the next)."""
    import sys

    from tests.conftest import _free_port, data_overrides

    overrides = data_overrides(small_embedded) + ["train.max_steps=2", "eval.max_samples=16", "train.eval_samples=16"]
    runs = {"bash": ["bash", str(EXAMPLES / "pretrain_blip2.sh")],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                         f"--master_port={_free_port()}", str(EXAMPLES / "pretrain_blip2.sh")]}
    for name, cmd in runs.items():
        env = _clean_env(WORKDIR=str(tmp_path / name), GPUS="2", MASTER_PORT=str(_free_port()), PYTHON=sys.executable)
        proc = subprocess.run([*cmd, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    alone = tmp_path / "bash"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={_free_port()}", "-m", "megavlm.train",
                           str(EXAMPLES / "recipes" / "blip2" / "blip2_debug_stage2.yaml"), *overrides,
                           "checkpoint.dir=outputs/blip2/stage2-alone"],
                          cwd=alone, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    stage1 = _stage_losses(tmp_path / "bash", "stage1")
    assert len(stage1) == 2 and stage1 == _stage_losses(tmp_path / "torchrun", "stage1")
    stage2 = _stage_losses(tmp_path / "bash", "stage2")
    assert len(stage2) == 2 and stage2 == _stage_losses(tmp_path / "torchrun", "stage2")
    assert stage2 == _stage_losses(alone, "stage2-alone")
