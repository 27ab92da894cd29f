"""Lets megatron-core 0.16.1 run tensor/pipeline/data parallelism on a CPU-only torch over gloo.

megatron-core hard-codes CUDA in about 320 places. Applied only when CUDA is unavailable, this
module covers the ones a training step reaches:

* ``torch.cuda.current_device()`` returns the CPU device (memory buffers, p2p shapes, DDP buffers)
  and ``torch.cuda.synchronize()`` is a no-op (the p2p layer calls it after batched send/recv);
* the RNG tracker of ``tensor_parallel.random`` is backed by the CPU generator (init, dropout and
  activation recompute fork it);
* a ``TorchFunctionMode`` rewrites ``device="cuda"``, ``.cuda()``, ``.to("cuda")`` and
  ``pin_memory()`` to CPU, and makes ``Tensor.type()`` report ``torch.cuda.*`` so the optimizer's
  and grad clipping's type checks pass.

``tests/test_cpu_compat.py`` runs a TP=2 x PP=2 step, an optimizer step and a dist-checkpoint round
trip through this layer and fails loudly when a megatron-core upgrade breaks it.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_MODE = None


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placements made inside megatron-core to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(torch.device("cpu") if (i > 0 and _is_cuda(a)) else a for i, a in enumerate(args))
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Named RNG states over the CPU generator, with the interface of megatron's tracker."""

    def __init__(self, *args, **kwargs):
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # A tracker created before the patch (at import time) would be a CUDA one: recreate it.
    mrandom.initialize_rng_tracker(force_reset=True)


def apply_cpu_compat(force: bool = False) -> bool:
    """Apply the layer once per process; returns True when it is active. No-op with CUDA."""
    global _APPLIED, _MODE
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None  # p2p's batch_p2p_sync; nothing to wait for
    _patch_rng()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    _APPLIED = True
    return True


def cpu_compat_active() -> bool:
    return _APPLIED
