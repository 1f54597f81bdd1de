"""Hooks of the training loop: checkpoints, metrics (JSON lines and TensorBoard) and a progress bar.

Hooks run on every rank, in the order given to the `Trainer`, because some of what they do is
collective (gathering RNG states, averaging losses); only rank 0 writes files or prints.
A hook that uses the global random generators must fork them (`torch.random.fork_rng`), or resumed
runs stop matching uninterrupted ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from pipelines.errors import ConfigError
from stxd_train.engine.checkpoint import (
    LAST_CHECKPOINT,
    atomic_write,
    keep_copy,
    save_checkpoint,
    save_run_config,
    step_checkpoint_name,
    write_errors,
)
from stxd_train.engine.distributed import is_main_process, reduce_dict

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from stxd_train.engine.trainer import Trainer


class HookBase:
    """Base of the loop's hooks; `self.trainer` is set when the hook is given to a `Trainer`.

    In `before_step` `trainer.step` is the number of steps done; in `after_step` it counts the step
    that just ran (1 after the first step), and `trainer.losses`, `trainer.loss`, `trainer.lr`, ...
    describe it.
    """

    trainer: Trainer

    def before_train(self) -> None:
        """Called once, after a resumed state is loaded and before the first step."""

    def before_step(self) -> None:
        """Called before each step, once its batch has been fetched."""

    def after_step(self) -> None:
        """Called after each optimizer and scheduler step."""

    def after_train(self) -> None:
        """Called once at the end, also when training stops with an exception."""


class CheckpointHook(HookBase):
    """Saves `checkpoints/last.pt` every `every` steps and at the end; with `keep_steps`, also `step_XXXXXX.pt`."""

    def __init__(self, *, every: int, keep_steps: bool = False) -> None:
        if every < 1:
            raise ConfigError(f"CheckpointHook every={every}; expected a number of steps >= 1")
        self.every = every
        self.keep_steps = keep_steps
        self._last_saved = -1

    def before_train(self) -> None:
        self._last_saved = self.trainer.start_step

    def after_step(self) -> None:
        if self.trainer.step % self.every == 0:
            self.save()

    def after_train(self) -> None:
        # Only a finished run gets a final save: after an exception the state may be mid-step.
        if self.trainer.step >= self.trainer.max_steps and self.trainer.step != self._last_saved:
            self.save()

    def save(self) -> Path:
        """Write the trainer's state now (collective: call it on every rank); returns `last.pt`."""
        state = self.trainer.state_dict()
        folder = self.trainer.checkpoint_dir
        last = folder / LAST_CHECKPOINT
        if is_main_process():
            save_checkpoint(last, state)
            if self.keep_steps:
                keep_copy(last, folder / step_checkpoint_name(self.trainer.step))
        self._last_saved = self.trainer.step
        return last


class MetricsHook(HookBase):
    """Every `every` steps, appends a line to `metrics.jsonl` and writes TensorBoard scalars under `tb/`.

    A line is `{"step", "epoch", "lr", "loss", "terms": {name: value}, "grad_norm", "step_time",
    "data_time"}`, losses averaged over ranks. On resume, lines after the checkpoint's step (from the
    interrupted run) are dropped and TensorBoard purges its events after that step.

    Give it to the `Trainer` before the `CheckpointHook`: a process killed between the two hooks of a step then
    has the line of that step even if the checkpoint was written, so a resumed log has no gap (the other way
    round, the checkpoint's own step would be missing from `metrics.jsonl` for good).
    """

    def __init__(self, *, every: int = 1, tensorboard: bool = True) -> None:
        if every < 1:
            raise ConfigError(f"MetricsHook every={every}; expected a number of steps >= 1")
        self.every = every
        self.tensorboard = tensorboard
        self._file: Any = None
        self._writer: SummaryWriter | None = None

    @property
    def path(self) -> Path:
        return self.trainer.out_dir / "metrics.jsonl"

    def before_train(self) -> None:
        if not is_main_process():
            return
        start = self.trainer.start_step
        kept = _lines_up_to(self.path, start) if start > 0 else []
        atomic_write(self.path, lambda f: f.writelines(line.encode() for line in kept))
        self._file = open(self.path, "a", buffering=1)  # closed in after_train
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.trainer.out_dir / "tb"), purge_step=start + 1 if start else None)

    def after_step(self) -> None:
        t = self.trainer
        if t.step % self.every and t.step != t.max_steps:
            return
        values = reduce_dict({"loss": t.loss, **{f"terms/{k}": v for k, v in t.losses.items()}})
        if not is_main_process():
            return
        record: dict[str, Any] = {
            "step": t.step, "epoch": t.epoch, "lr": t.lr, "loss": values["loss"],
            "terms": {k: values[f"terms/{k}"] for k in t.losses},
            "grad_norm": None if t.grad_norm is None else float(t.grad_norm),
            "step_time": t.step_time, "data_time": t.data_time,
        }
        with write_errors(self.path):
            self._file.write(json.dumps(record) + "\n")
        if self._writer is not None:
            self._writer.add_scalar("loss/total", values["loss"], t.step)
            for name, value in record["terms"].items():
                self._writer.add_scalar(f"loss/{name}", value, t.step)
            self._writer.add_scalar("lr", t.lr, t.step)
            self._writer.add_scalar("time/step", t.step_time, t.step)
            self._writer.add_scalar("time/data", t.data_time, t.step)
            if record["grad_norm"] is not None:
                self._writer.add_scalar("grad_norm", record["grad_norm"], t.step)

    def after_train(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of a metrics file whose step is at most `step` (unreadable lines are dropped)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return kept


class ProgressHook(HookBase):
    """A tqdm bar over the steps (rank 0), with the loss and its terms in the postfix every `every` steps."""

    def __init__(self, *, every: int = 1) -> None:
        if every < 1:
            raise ConfigError(f"ProgressHook every={every}; expected a number of steps >= 1")
        self.every = every
        self._bar: tqdm | None = None

    def before_train(self) -> None:
        t = self.trainer
        self._bar = tqdm(total=t.max_steps, initial=t.start_step, desc="train", unit="step", dynamic_ncols=True,
                         disable=not is_main_process())

    def after_step(self) -> None:
        if self._bar is None:
            return
        t = self.trainer
        if t.step % self.every == 0 and not self._bar.disable:
            postfix = {"loss": f"{float(t.loss):.4g}", **{k: f"{float(v):.4g}" for k, v in t.losses.items()}}
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def after_train(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


#: One line per training session of a run (a fresh start or a resume): the step it started from and the commit of
#: the code that trained it (`pipelines.evaluation.source_revision`).
SOURCES_FILE = "sources.jsonl"


class RunConfigHook(HookBase):
    """Writes the resolved run config to `out_dir/config.yaml` when training starts, and appends the step it starts
    from and the code's commit to `out_dir/sources.jsonl`.

    As a hook it runs after the trainer has checked the folder (a fresh run never overwrites the
    config of an existing one) and after a resume has loaded its checkpoint.
    """

    def __init__(self, *, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    def before_train(self) -> None:
        if is_main_process():
            from pipelines.evaluation import source_revision

            out = self.trainer.out_dir
            save_run_config(out, self.config)
            with open(out / SOURCES_FILE, "a") as f:
                f.write(json.dumps({"start_step": self.trainer.step, **source_revision()}) + "\n")


def read_sources(run: Path) -> list[dict[str, Any]]:
    """The training sessions that `RunConfigHook` recorded in `run` (empty for a run trained before it did)."""
    path = run / SOURCES_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
