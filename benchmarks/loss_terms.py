"""Forward + backward time of each distillation term alone, on one cached batch of the student.

    .venv/bin/python benchmarks/loss_terms.py --dataroot out/demo/data --version v1.0-synth \
        --cache out/demo/cache.zarr --teacher out/demo/teacher/teacher.pt --k 3 --repeats 10

The student runs once; each term is then computed from its BEV and head outputs and back-propagated to
them (the adapter included), terms interleaved for `--repeats` rounds, medians in ms. This isolates what
the distillation adds to a training step from the student's own forward and backward.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import click
from common import machine, median, table
from step_time import _build

TERMS = ("cd", "td", "rd", "mse")


@click.command()
@click.option("--dataroot", required=True)
@click.option("--version", required=True)
@click.option("--cache", required=True)
@click.option("--teacher", required=True, help="Needed to build the batches as step_time.py does.")
@click.option("--config", default="configs/student/bevformer_synth.yaml", show_default=True)
@click.option("--cache-config", default="configs/cache/synth.yaml", show_default=True)
@click.option("--k", type=int, default=3, show_default=True)
@click.option("--repeats", default=10, show_default=True)
def main(repeats: int, **opts: Any) -> None:
    import torch

    opts.update(terms=",".join(TERMS), device="cpu", steps=1, rounds=0)
    model, batches, _, _ = _build("cached", opts, 8)
    batch = batches[-1]   # samples 14 and 15 of the split: every one of their K past frames exists
    valid = int(batch.cache.past_valid[:, :opts["k"]].sum())
    out = model.student(batch)
    bev = out.bev.detach().requires_grad_(True)
    preds = [{name: t.detach().requires_grad_(True) for name, t in task.items()} for task in out.preds]
    student_out = dataclasses.replace(out, bev=bev, preds=preds)
    times: dict[str, list[float]] = {term: [] for term in TERMS}
    for r in range(repeats + 1):
        for term in TERMS:
            model.cfg = dataclasses.replace(model.cfg, terms=(term,))
            start = time.perf_counter()
            loss = sum(model.distill_terms(student_out, batch.cache, batch.gt_boxes).values())
            inputs = [bev] + [t for task in preds for t in task.values()]
            torch.autograd.grad(loss, inputs, allow_unused=True)
            if r:
                times[term].append(time.perf_counter() - start)
    click.echo(f"machine: {machine()}")
    click.echo(f"`{opts['config']}`, one cached batch of {len(batch.tokens)} with {valid} valid past frames (K = "
               f"{opts['k']}); medians of {repeats} interleaved rounds\n")
    click.echo(table(["term", "forward + backward (ms)"], [[t, f"{median(times[t]) * 1000:.1f}"] for t in TERMS]))


if __name__ == "__main__":
    main()
