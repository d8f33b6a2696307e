"""Rich progress for training: a bar with loss, reward accuracy, tokens/s and ETA.

Works in a terminal and in notebooks (rich renders to Jupyter too).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback


class RichProgressCallback(TrainerCallback):
    def __init__(self, console: Console, total_steps: int) -> None:
        self.console, self.total = console, total_steps
        self.progress: Progress | None = None
        self.task: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps or self.total,
                                           completed=state.global_step, stats="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "loss" in logs:
            stats = (f"loss {logs['loss']:.4f}  acc {logs.get('rewards/accuracy', 0):.2f}  "
                     f"margin {logs.get('rewards/margin', 0):+.4f}  "
                     f"{logs.get('tokens_per_second', 0):,.0f} tok/s")
            self.progress.update(self.task, stats=stats)
            self.progress.console.log(f"step {state.global_step}: {stats}  "
                                      f"lr {logs.get('learning_rate', 0):.2e}  "
                                      f"grad norm {logs.get('grad_norm', 0):.3f}")
        elif any(k.startswith("eval_") for k in logs):
            self.progress.console.log(
                f"eval @ step {state.global_step}: loss {logs.get('eval_loss', 0):.4f}  "
                f"acc {logs.get('eval_rewards/accuracy', 0):.2f}  "
                f"margin {logs.get('eval_rewards/margin', 0):+.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
