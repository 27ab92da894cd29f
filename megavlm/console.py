"""What the entry points print before any work: known-harmless dependency warnings filtered once,
one line naming the fallbacks in use, and rank-tagged warnings when several processes share a console.

Only warnings listed in ``KNOWN_HARMLESS`` are dropped, each matched by its message (and category),
so a new or real warning from any library, megatron-core included, still reaches the user.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings

# (category, message regex, only without CUDA, why it is harmless)
KNOWN_HARMLESS = [
    (UserWarning, r"(Transformer Engine and Apex are|Apex is|Transformer Engine is) not installed", False,
     "megatron-core's fallbacks; fallback_line() names them once"),
    (DeprecationWarning, r"The following imports from `dynamic_context.py` will be removed", False,
     "an import cycle inside megatron-core"),
    (DeprecationWarning, r"`torch.jit.script_method` is deprecated", False,
     "raised while megatron-core is imported"),
    (DeprecationWarning, r"Warning: tp_group is None, using default tp group", False,
     "megatron-core's own layers built from specs do not pass tp_group"),
    (DeprecationWarning, r"MLP requires ffn_hidden_size, but it was not provided", False,
     "the default it takes, config.ffn_hidden_size, is the one the specs mean"),
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope", False,
     "megatron-core's own TransformerConfig default; CUDA graphs are not used"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions", False,
     "megatron-core's dist-checkpoint loader calls torch's old name"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor", False,
     "megatron-core's dist checkpoints are built on ShardedTensor"),
    (UserWarning, r"When using async grad allreduce it is recommended to set the environment variable "
                  r"CUDA_DEVICE_MAX_CONNECTIONS", True, "a GPU stream setting; meaningless over gloo on CPUs"),
]
_installed = False


def launch_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def filter_known_warnings(cuda: bool | None = None) -> None:
    """Drop the warnings in KNOWN_HARMLESS (once per process; later calls do nothing)."""
    global _installed
    if _installed:
        return
    _installed = True
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    for category, message, cpu_only, _why in KNOWN_HARMLESS:
        if cpu_only and cuda:
            continue
        warnings.filterwarnings("ignore", message=message, category=category)
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if world > 1:
        _tag_warnings_with_rank(launch_rank())


def _tag_warnings_with_rank(rank: int) -> None:
    """With N processes on one console a warning's origin is otherwise lost."""
    plain = warnings.formatwarning

    def tagged(message, category, filename, lineno, line=None):
        return f"[rank{rank}] " + plain(message, category, filename, lineno, line)

    warnings.formatwarning = tagged


def fallback_line(cuda: bool | None = None) -> str:
    """One line: the device/backend and which optional accelerators are absent (and what runs instead)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    have = {name: importlib.util.find_spec(name) is not None for name in ("transformer_engine", "apex")}
    parts = ["GPU, nccl" if cuda else "CPU, gloo (no CUDA)"]
    if not have["transformer_engine"]:
        parts.append("no Transformer Engine: local layers (model.transformer_impl=local)")
    if not have["apex"]:
        parts.append("no Apex: torch norms and optimizers")
    return "megavlm: " + "; ".join(parts)


def setup_entry_point(print_fallbacks: bool = True) -> None:
    """Called once by each command a user types: warnings filtered, logging set per rank, and rank 0
    prints the fallback line."""
    import torch

    cuda = torch.cuda.is_available()
    filter_known_warnings(cuda)
    rank = launch_rank()
    logging.basicConfig(level=logging.WARNING if rank == 0 else logging.ERROR,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    if print_fallbacks and rank == 0:
        print(fallback_line(cuda), flush=True)
