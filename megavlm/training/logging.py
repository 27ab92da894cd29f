"""Rank-0 reporting: TensorBoard scalars, a JSONL metrics log and a rich progress line with ETA."""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, enabled: bool, log_dir: Path | None, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, description: str = "train"):
        self.enabled, self.total, self.start = enabled, total_steps, start_step
        self.writer = self.progress = self.task = None
        self.jsonl = None
        if not enabled:
            return
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(log_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(log_dir))
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[status]}"), transient=False)
            self.progress.start()
            self.task = self.progress.add_task(description, total=total_steps, completed=start_step, status="")
        self._t0 = time.perf_counter()

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()

    def advance(self, step: int, status: str) -> None:
        if self.enabled and self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
