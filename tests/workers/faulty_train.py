"""megavlm.train with injected faults (tests/test_resilience.py), run under torchrun:

* a NaN gradient on rank 1 only at step 2 (every rank must skip that update);
* ``--kill-rank1-at-step=N``: rank 1 SIGKILLs itself during step N of the first attempt, so that
  ``torchrun --max-restarts`` restarts the job (which must resume by itself).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys

NAN_STEP = 2


def main() -> int:
    argv = sys.argv[1:]
    kill_at = next((int(a.split("=")[1]) for a in argv if a.startswith("--kill-rank1-at-step=")), None)
    argv = [a for a in argv if not a.startswith("--kill-rank1-at-step=")]

    from megavlm import train
    from megavlm.training import trainer as trainer_module

    rank = int(os.environ["RANK"])
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    class FaultyTrainer(trainer_module.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            param = next(p for n, p in self.model.named_parameters() if "connector" in n and p.dim() == 2)
            param.register_hook(self._inject)

        def _inject(self, grad):
            step = self.step + 1
            if rank == 1 and kill_at == step and first_attempt:  # a node dies: this process and its children
                for child in multiprocessing.active_children():
                    child.kill()
                os.kill(os.getpid(), signal.SIGKILL)
            return grad * float("nan") if rank == 1 and step == NAN_STEP else grad

    trainer_module.Trainer = FaultyTrainer
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
