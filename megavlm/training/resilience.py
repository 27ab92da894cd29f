"""What lets a long run survive: stops that every rank agrees on, and one clear message.

* ``RunStop``: a stop the user must act on (a template mismatch, too many bad samples or bad
  steps, a broken checkpoint). Raised on every rank at the same step, so the CLI prints one
  message on rank 0 and every rank exits non-zero while torchrun is still able to end promptly.
* ``StopRequest``: SIGTERM / SIGUSR1 (Slurm's ``--signal=USR1@120`` before a time limit or a
  preemption) and ``train.exit_duration_minutes``. The handler only sets a flag; the trainer asks
  after each step, all ranks agree (a signal may reach one rank a step earlier than another), and
  the run saves a checkpoint and exits 0 so a requeued job resumes. A second SIGTERM ends the
  process at once.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def flags(values) -> torch.Tensor:
    """A small integer tensor for a collective: on the GPU under NCCL (which takes no CPU tensors)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    return torch.tensor(values, dtype=torch.long, device=device)


class RunStop(RuntimeError):
    """A stop for a reason the user must act on; the message names the cause and the file or sample."""


def agree_on_error(error: Exception | None, group=None) -> None:
    """Collective: when any rank of ``group`` hit ``error``, every rank raises ``RunStop`` with the
    first rank's message (the others would otherwise wait in the next collective until killed)."""
    flag = flags([0 if error is None else 1])
    if dist.is_initialized():
        dist.all_reduce(flag, group=group)
    if not int(flag):
        return
    messages = [str(error) if error is not None else ""]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, messages[0], group=group)
        messages = gathered
    raise RunStop(next(m for m in messages if m)) from error


class StopRequest:
    def __init__(self, exit_duration_minutes: float | None = None, signals=STOP_SIGNALS):
        self.deadline = time.monotonic() + 60 * exit_duration_minutes if exit_duration_minutes else None
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGTERM and signum == signal.SIGTERM:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = signum

    def poll(self) -> str | None:
        """Collective: why the run should stop after this step (the same answer on every rank), or None."""
        asked = flags([self.received or 0, int(self.deadline is not None and time.monotonic() > self.deadline)])
        if dist.is_initialized():
            dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        sig, out_of_time = (int(v) for v in asked.tolist())
        if sig:
            return f"received {signal.Signals(sig).name}"
        if out_of_time:
            return "train.exit_duration_minutes reached"
        return None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}
