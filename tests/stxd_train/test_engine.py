"""The training engine on a tiny MLP and synthetic tensors: learning, logs, exact resume, atomic saves."""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipelines.errors import ConfigError
from stxd_train.engine import (
    CheckpointError,
    CheckpointHook,
    CheckpointWriteError,
    HookBase,
    MetricsHook,
    NonFiniteLossError,
    OptimConfig,
    ProgressHook,
    ResumableSampler,
    Trainer,
    TrainingError,
    atomic_write,
    atomic_write_text,
    build_optimizer,
    build_scheduler,
    deterministic,
    init_from_env,
    load_checkpoint,
    rank,
    save_checkpoint,
    save_run_config,
    seed_everything,
    to_device,
    world_size,
)

N_SAMPLES, BATCH = 48, 8  # 6 batches per epoch, so step 10 is in the middle of epoch 1


class ToyData(Dataset):
    """y = x W + noise, with a counter of loaded samples."""

    def __init__(self, n: int = N_SAMPLES) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 2, generator=g) + 0.01 * torch.randn(n, 2, generator=g)
        self.loads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.loads += 1
        return {"x": self.x[i], "y": self.y[i]}


class ToyModel(nn.Module):
    """Two-layer MLP with dropout (so the RNG state matters) returning two weighted loss terms."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        err = self.net(batch["x"]) - batch["y"]
        return {"mse": err.pow(2).mean(), "l1": 0.1 * err.abs().mean()}


class Recorder(HookBase):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.grad_norms: list[float] = []
        self.clipped_norms: list[float] = []

    def after_step(self) -> None:
        t = self.trainer
        self.losses[t.step] = float(t.loss)
        if t.grad_norm is not None:
            self.grad_norms.append(float(t.grad_norm))
        grads = [p.grad.flatten() for p in t.model.parameters() if p.grad is not None]
        self.clipped_norms.append(float(torch.cat(grads).norm()))


def make_trainer(out_dir: Path, *, max_steps: int, horizon: int | None = None, hooks: list[HookBase] | None = None,
                 model: nn.Module | None = None, data: ToyData | None = None, lr: float = 1e-2,
                 grad_clip: float = 0.0, schedule: str = "cosine", num_workers: int = 0,
                 world: int = 1, rank_: int = 0, wrap: Any = None, amp: str = "auto") -> Trainer:
    seed_everything(0)
    model = model or ToyModel()
    if wrap is not None:
        model = wrap(model)
    cfg = OptimConfig(lr=lr, schedule=schedule, warmup_steps=1, grad_clip=grad_clip)
    optimizer = build_optimizer(model, cfg)
    sampler = ResumableSampler(len(data or ToyData()), batch_size=BATCH, shuffle=True, seed=7, rank=rank_,
                               world_size=world)
    loader = DataLoader(data or ToyData(), batch_sampler=sampler, num_workers=num_workers)
    return Trainer(model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, horizon or max_steps),
                   data=loader, out_dir=out_dir, max_steps=max_steps, hooks=hooks or [], grad_clip=cfg.grad_clip,
                   amp=amp, seed=0)


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_learns_and_logs(tmp_path: Path) -> None:
    rec = Recorder()
    hooks = [MetricsHook(every=5), ProgressHook(every=2), rec]
    make_trainer(tmp_path, max_steps=62, lr=3e-2, hooks=hooks).train()
    first, last = [sum(rec.losses[s] for s in r) / 5 for r in (range(1, 6), range(58, 63))]
    assert last < 0.3 * first
    lines = read_metrics(tmp_path)
    assert [r["step"] for r in lines] == [*range(5, 61, 5), 62]
    assert all(set(r["terms"]) == {"mse", "l1"} for r in lines)
    assert lines[-1]["loss"] == pytest.approx(rec.losses[62], rel=1e-6)
    assert lines[-1]["loss"] == pytest.approx(sum(lines[-1]["terms"].values()), rel=1e-6)
    assert lines[-1]["epoch"] == 10 and lines[-1]["step_time"] > 0
    step5 = 4 - 1  # 0-based step 4, after one warm-up step, of a 61-step decay
    assert lines[0]["lr"] == pytest.approx(3e-2 * (0.001 + 0.999 * (1 + math.cos(math.pi * step5 / 61)) / 2))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_resume_is_exact(tmp_path: Path) -> None:
    with deterministic():
        a = tmp_path / "a"
        rec_a = Recorder()
        make_trainer(a, max_steps=20, hooks=[CheckpointHook(every=5, keep_steps=True), MetricsHook(), rec_a]).train()
        b = tmp_path / "b"
        make_trainer(b, max_steps=10, horizon=20, hooks=[CheckpointHook(every=5), MetricsHook()]).train()
        # The checkpoint carries the training time so far; a resume adds its own to it.
        state = load_checkpoint(b / "checkpoints/last.pt")
        assert state["train_seconds"] > 0
        save_checkpoint(b / "checkpoints/last.pt", {**state, "train_seconds": 1000.0})
        data, rec_b = ToyData(), Recorder()
        trainer = make_trainer(b, max_steps=20, data=data, hooks=[CheckpointHook(every=5), MetricsHook(), rec_b])
        start = time.perf_counter()
        trainer.train(resume=True)
        resumed = time.perf_counter() - start
    assert 1000.0 < trainer.train_seconds <= 1000.0 + resumed
    assert 1000.0 < load_checkpoint(b / "checkpoints/last.pt")["train_seconds"] <= trainer.train_seconds
    assert sorted(rec_b.losses) == list(range(11, 21))
    assert all(rec_b.losses[s] == rec_a.losses[s] for s in range(11, 21))
    assert read_metrics(a) == [{**r, "step_time": ra["step_time"], "data_time": ra["data_time"]}
                               for r, ra in zip(read_metrics(b), read_metrics(a), strict=True)]
    assert data.loads == 10 * BATCH  # the 4 consumed batches of epoch 1 were skipped, not loaded
    state_a, state_b = load_checkpoint(a / "checkpoints/last.pt"), load_checkpoint(b / "checkpoints/last.pt")
    assert (state_a["step"], state_a["epoch"], state_a["iter_in_epoch"]) == (20, 3, 2)
    assert all(torch.equal(state_a["model"][k], state_b["model"][k]) for k in state_a["model"])
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == [
        "last.pt", "step_000005.pt", "step_000010.pt", "step_000015.pt", "step_000020.pt"]
    assert load_checkpoint(a / "checkpoints/step_000010.pt")["step"] == 10


def test_resume_with_workers_matches(tmp_path: Path) -> None:
    rec_a, rec_b = Recorder(), Recorder()
    make_trainer(tmp_path / "a", max_steps=8, num_workers=2, hooks=[rec_a]).train()
    make_trainer(tmp_path / "b", max_steps=5, horizon=8, num_workers=2, hooks=[CheckpointHook(every=5)]).train()
    make_trainer(tmp_path / "b", max_steps=8, num_workers=2, hooks=[rec_b]).train(resume=True)
    assert rec_b.losses == {s: rec_a.losses[s] for s in range(6, 9)}


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_modes(tmp_path: Path, amp: str) -> None:
    rec = Recorder()
    trainer = make_trainer(tmp_path, max_steps=3, amp=amp, hooks=[CheckpointHook(every=3), rec])
    trainer.train()
    assert all(math.isfinite(v) for v in rec.losses.values()) and len(rec.losses) == 3
    scaler = load_checkpoint(tmp_path / "checkpoints/last.pt")["scaler"]
    assert (scaler is not None and scaler["scale"] > 0) if amp == "fp16" else scaler is None


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_trainer(tmp_path, max_steps=5, hooks=[CheckpointHook(every=5)]).train()

    def broken_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        f.write(b"partial checkpoint bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointWriteError) as failed:
        make_trainer(tmp_path, max_steps=10, hooks=[CheckpointHook(every=5)]).train(resume=True)
    last = tmp_path / "checkpoints" / "last.pt"
    assert str(failed.value).startswith(f"writing {last} failed: the disk is full ([Errno 28] No space left on "
                                        f"device); free space on the disk that holds {last.parent} (old runs")
    assert str(failed.value).endswith("then continue the run with the same command and --resume: it starts again "
                                      "from the run's last checkpoint, checkpoints/last.pt, which a failed write "
                                      "leaves as it was")
    assert isinstance(failed.value.__cause__, OSError)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 5
    monkeypatch.undo()
    trainer = make_trainer(tmp_path, max_steps=10, hooks=[CheckpointHook(every=5)])
    trainer.train(resume=True)
    assert trainer.step == 10 and load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 10


def test_non_finite_loss_names_step_and_term(tmp_path: Path) -> None:
    class Exploding(ToyModel):
        def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            terms = super().forward(batch)
            return {**terms, "bad": terms["mse"] * float("nan")}

    with pytest.raises(NonFiniteLossError, match=r"step 1 .*'bad' = nan") as failed:
        make_trainer(tmp_path, max_steps=3, model=Exploding()).train()
    # A dict batch names no samples; no checkpoint was written, so --resume is not offered.
    assert "sample(s)" not in str(failed.value) and "--resume" not in str(failed.value)
    assert str(failed.value).endswith(f"no checkpoint was written before this step ({tmp_path / 'checkpoints'} "
                                      "holds none), so there is nothing to resume: train again from the start")


def test_write_errors_other_than_a_full_disk(tmp_path: Path) -> None:
    def refused(f: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with pytest.raises(CheckpointWriteError) as failed:
        atomic_write(tmp_path / "a.txt", refused, then="then try again")
    assert str(failed.value) == (f"writing {tmp_path / 'a.txt'} failed: the file system refused it ([Errno 13] "
                                 "Permission denied); fix that (permissions, a read-only or unmounted disk), then "
                                 "try again")
    assert list(tmp_path.iterdir()) == []   # no temporary file left
    assert atomic_write_text(tmp_path / "a.txt", "ok\n").read_text() == "ok\n"


def test_model_output_is_checked(tmp_path: Path) -> None:
    class Wrong(ToyModel):
        def forward(self, batch: dict[str, torch.Tensor]) -> Any:
            return {"mse": (self.net(batch["x"]) - batch["y"]).pow(2)}

    with pytest.raises(TrainingError, match=r"'mse': \(8, 2\)"):
        make_trainer(tmp_path, max_steps=2, model=Wrong()).train()


def test_grad_clipping_bounds_the_norm(tmp_path: Path) -> None:
    rec = Recorder()
    make_trainer(tmp_path, max_steps=6, grad_clip=0.05, hooks=[rec]).train()
    assert min(rec.grad_norms) > 0.05  # every step needed clipping...
    assert max(rec.clipped_norms) <= 0.05 * (1 + 1e-4)  # ...and got it
    assert max(rec.clipped_norms) == pytest.approx(0.05, rel=1e-4)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedules(schedule: str) -> None:
    cfg = OptimConfig(lr=2.0, schedule=schedule, warmup_steps=20, start_lr_ratio=0.1, min_lr_ratio=0.01)
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, 100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warm_quarter = (1 - math.cos(math.pi / 4)) / 2 if schedule == "onecycle" else 0.25
    assert lrs[0] == pytest.approx(0.2)
    assert lrs[5] == pytest.approx(2.0 * (0.1 + 0.9 * warm_quarter))
    assert lrs[20] == pytest.approx(2.0)
    assert lrs[60] == pytest.approx(2.0 * (0.01 + 0.99 * 0.5))
    assert lrs[99] == pytest.approx(2.0 * (0.01 + 0.99 * (1 + math.cos(math.pi * 79 / 80)) / 2))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02)


def test_optim_config_checks_and_weight_decay_groups() -> None:
    with pytest.raises(ConfigError, match="can't provide both warmup_steps"):
        OptimConfig(warmup_steps=10, pct_start=0.3)
    assert OptimConfig(schedule="onecycle").warmup_for(1000) == 400
    with pytest.raises(ConfigError, match="warm-up of 400 steps in a run of 400"):
        build_scheduler(build_optimizer(nn.Linear(2, 2), OptimConfig()), OptimConfig(warmup_steps=400), 400)
    optimizer = build_optimizer(ToyModel(), OptimConfig(weight_decay=0.05))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and [p.shape for p in decay["params"]] == [(32, 8), (2, 32)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # 2 biases, LayerNorm weight and bias


def test_resume_without_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path / "checkpoints" / "last.pt")):
        make_trainer(tmp_path, max_steps=2).train(resume=True)


def test_fresh_run_refuses_existing_run(tmp_path: Path) -> None:
    make_trainer(tmp_path, max_steps=2, hooks=[CheckpointHook(every=5)]).train()
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 2  # final save at the end
    with pytest.raises(TrainingError, match="already holds a run"):
        make_trainer(tmp_path, max_steps=2).train()


def test_sampler_partitions_and_resumes_across_world_sizes() -> None:
    samplers = [ResumableSampler(10, batch_size=2, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    batches = [list(s) for s in samplers]
    assert [len(b) for b in batches] == [3, 3] == [len(s) for s in samplers]
    assert sorted(i for b in batches for batch in b for i in batch) == list(range(10))
    order = samplers[0].order(0).tolist()
    assert batches[0][0] == order[0:4:2] and batches[1][0] == order[1:4:2]
    assert samplers[0].order(1).tolist() != order
    assert ResumableSampler(10, batch_size=2, shuffle=True, seed=3).order(0).tolist() == order
    samplers[0].advance(2)  # 8 of 10 samples consumed over both ranks
    single = ResumableSampler(10, batch_size=3, shuffle=True, seed=3)
    single.load_state_dict(samplers[0].state_dict())
    assert list(single) == [order[8:10]]
    single.set_epoch(1)
    assert [i for batch in single for i in batch] == samplers[0].order(1).tolist()
    with pytest.raises(CheckpointError, match="seed=3 but this run's has seed=4"):
        ResumableSampler(10, batch_size=2, shuffle=True, seed=4).load_state_dict(samplers[0].state_dict())
    padded = ResumableSampler(5, batch_size=2, shuffle=False, seed=0, rank=1, world_size=2)
    assert list(padded) == [[1, 3], [0]]  # 5 samples padded to 6 by repeating sample 0
    assert list(ResumableSampler(5, batch_size=2, shuffle=False, seed=0, drop_last=True)) == [[0, 1], [2, 3]]
    padded.limit(1)  # the loop's last steps: the loader ends with them
    assert list(padded) == [[1, 3]] and len(padded) == 2
    padded.limit(None)
    assert list(padded) == [[1, 3], [0]]


def test_to_device_nested() -> None:
    class Pair(NamedTuple):
        a: torch.Tensor
        b: int

    @dataclass(frozen=True)
    class Frame:
        points: torch.Tensor
        name: str

    t = torch.ones(2)
    moved = to_device({"p": Pair(t, 3), "f": [Frame(t, "x")], "t": (t, None)}, "cpu")
    assert isinstance(moved["p"], Pair) and moved["p"].b == 3 and torch.equal(moved["p"].a, t)
    assert isinstance(moved["f"][0], Frame) and moved["f"][0].name == "x"
    assert isinstance(moved["t"], tuple) and moved["t"][1] is None
    if torch.cuda.is_available():
        assert to_device({"x": [t]}, "cuda")["x"][0].device.type == "cuda"


def test_save_run_config(tmp_path: Path) -> None:
    path = save_run_config(tmp_path, {"optim": {"lr": 0.001, "betas": [0.9, 0.999]}, "train": {"max_steps": 5}})
    assert path.read_text().splitlines()[0] == "optim:"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(local: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local), LOCAL_RANK=str(local),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    device = init_from_env()
    assert (rank(), world_size(), device.type) == (local, 2, "cpu")

    def ddp(m: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(m)

    for name, steps, resume in (("a", 8, False), ("b", 4, False), ("b", 8, True)):
        hooks: list[HookBase] = [CheckpointHook(every=4), MetricsHook(tensorboard=False)]
        make_trainer(Path(out) / name, max_steps=steps, horizon=8, world=2, rank_=local, wrap=ddp,
                     hooks=hooks).train(resume=resume)
    torch.distributed.destroy_process_group()


def test_ddp_gloo_two_ranks(tmp_path: Path) -> None:
    """Two gloo ranks with DDP: rank 0 alone writes, every rank's RNG is saved, resume stays exact."""
    # fork, not spawn: re-importing torch in two children costs several seconds on a small machine.
    torch.multiprocessing.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True,
                                          start_method="fork")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))  # rank 0 alone writes
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    state = load_checkpoint(tmp_path / "a/checkpoints/last.pt")
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert not any(k.startswith("module.") for k in state["model"])
