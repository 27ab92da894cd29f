"""Rank-0 reporting: TensorBoard scalars, a JSONL metrics log, a rich progress bar (stage, step/total,
ETA, loss, tokens/s, skipped samples) and the end-of-stage summary. Other ranks print nothing."""
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
        self._t0, self.tokens = time.perf_counter(), 0.0
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
                                     TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                     transient=False)
            self.progress.start()
            self.task = self.progress.add_task(description, total=total_steps, completed=start_step, status="")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()

    def advance(self, step: int, scalars: dict[str, float], seconds: float) -> None:
        """One training step done: counts its tokens and moves the bar."""
        if not self.enabled:
            return
        self.tokens += scalars.get("train/tokens_per_s", 0.0) * seconds
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=progress_status(scalars))

    def summary(self, stage: str, steps: int, checkpoint, metrics: dict[str, float]) -> str:
        seconds = time.perf_counter() - self._t0
        where = f", checkpoint {checkpoint}" if checkpoint else ""
        head = (f"[{stage}] finished: {steps} steps in {_duration(seconds)}, {self.tokens:,.0f} tokens "
                f"({self.tokens / max(seconds, 1e-9):,.0f} tokens/s){where}")
        return head + ("\n" + format_metrics(stage, metrics) if metrics else "")

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
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


def progress_status(scalars: dict[str, float]) -> str:
    return (f"loss {scalars['train/loss']:.4f}  {scalars.get('train/tokens_per_s', 0.0):,.0f} tok/s  "
            f"skipped {scalars.get('train/skipped_samples', 0.0):.0f}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def format_metrics(stage: str, metrics: dict[str, float]) -> str:
    """Held-out metrics, each beside the same model's score on a blank image when there is one."""
    lines = [f"[{stage}] held-out metrics"]
    for name in sorted(k for k in metrics if not k.endswith("_blank") and not k.startswith("bench/")):
        blank = metrics.get(name + "_blank")
        lines.append(f"  {name:<28} {_value(metrics[name])}" + (f"   (blank image: {_value(blank)})" if blank is not None else ""))
    return "\n".join(lines)


def _value(value: float) -> str:
    return "no samples" if value != value else f"{value:.4f}"   # NaN: nothing was evaluated
