"""Process-group set-up from torchrun or Slurm variables, over megatron-core's parallel_state."""
from __future__ import annotations

import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megavlm.config.model import ParallelConfig
from megavlm.parallel.cpu_compat import apply_cpu_compat


class ParallelLayoutError(ValueError):
    """TP/PP sizes that do not fit the world size or the model."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def _first_slurm_host(nodelist: str) -> str:
    """'gpu[003-005,010],cpu1' -> 'gpu003' (the first host of a Slurm node list)."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.match(r"^([^\[]+)\[([^\],-]+)", first)
    return match.group(1) + match.group(2) if match else first


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_launch_env(environ=None) -> LaunchEnv:
    """Rank layout from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm (SLURM_PROCID/...)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         addr, port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def check_layout(parallel: ParallelConfig, world_size: int) -> int:
    """Validate TP x PP against the world size; returns the data-parallel size."""
    model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
    if world_size % model_parallel:
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by tensor_parallel ({parallel.tensor_parallel}) x "
            f"pipeline_parallel ({parallel.pipeline_parallel}) = {model_parallel}; "
            f"launch a multiple of {model_parallel} processes or change parallel.*")
    if parallel.sequence_parallel and parallel.tensor_parallel == 1:
        raise ParallelLayoutError("parallel.sequence_parallel needs tensor_parallel > 1")
    return world_size // model_parallel


@dataclass(frozen=True)
class ParallelContext:
    """What the entry point learned about this process; passed down instead of global getters."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def set_seed(seed: int, pp_rank: int = 0) -> None:
    """Seeds every generator; megatron's tracker gives TP ranks distinct model-parallel streams."""
    from megatron.core import tensor_parallel

    seed = seed + 100 * pp_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _restart_store(launch, restart: int, timeout: timedelta):
    """The store of a job that torchrun --max-restarts restarted. torchrun keeps its store across
    attempts, so the ranks of a new attempt would read the failed attempt's connection addresses
    (and time out connecting to them) without a prefix of their own."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), launch.world_size,
                          is_master=not agent_store and launch.rank == 0, timeout=timeout)
    return dist.PrefixStore(f"megavlm/attempt_{restart}", store)


def initialize(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> ParallelContext:
    """Init torch.distributed (nccl on GPU, gloo on CPU) and megatron-core's model-parallel groups."""
    from megatron.core import parallel_state

    launch = read_launch_env()
    dp_size = check_layout(parallel, launch.world_size)
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        apply_cpu_compat()
    device = torch.device("cuda", launch.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if launch.source == "single":
            # a fresh port passed directly: an inherited MASTER_PORT may belong to a parent process
            init_method = f"tcp://{launch.master_addr}:{launch.master_port}"
        else:
            os.environ.setdefault("MASTER_ADDR", launch.master_addr)
            os.environ.setdefault("MASTER_PORT", str(launch.master_port))
            init_method = "env://"
        timeout = timedelta(minutes=timeout_minutes)
        backend = "nccl" if use_cuda else "gloo"
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if restart:
            dist.init_process_group(backend=backend, store=_restart_store(launch, restart, timeout), rank=launch.rank,
                                    world_size=launch.world_size, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, init_method=init_method, rank=launch.rank,
                                    world_size=launch.world_size, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        distributed_timeout_minutes=timeout_minutes,
    )
    ctx = ParallelContext(
        rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank, device=device,
        tp_size=parallel.tensor_parallel, pp_size=parallel.pipeline_parallel, dp_size=dp_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )
    set_seed(seed, ctx.pp_rank)
    return ctx


_SOLO_GROUPS: dict = {}


def solo_group():
    """A group holding only this process: the size-1 tensor-parallel group of a module that runs
    whole on every TP rank. Creating groups is collective, so every rank makes all of them once."""
    world = dist.group.WORLD
    if world not in _SOLO_GROUPS:
        groups = [dist.new_group([rank]) for rank in range(dist.get_world_size())]
        _SOLO_GROUPS.clear()
        _SOLO_GROUPS[world] = groups[dist.get_rank()]
    return _SOLO_GROUPS[world]


def process_groups():
    """megatron-core's ProcessGroupCollection for the initialised layout (entry points only), with
    ``solo``: this process alone (see ``solo_group``)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    pgs.solo = solo_group()
    return pgs


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        _SOLO_GROUPS.clear()
        dist.destroy_process_group()
