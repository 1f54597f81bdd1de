"""Where one distilled training step of a student spends its time, by operator, from torch.profiler.

    .venv/bin/python benchmarks/step_profile.py --dataroot out/distill_gain/data --version v1.0-synth \
        --cache out/distill_gain/cache.zarr --teacher out/distill_gain/teacher/teacher.pt --steps 6

The step is `step_time.py`'s cached mode (forward, backward, AdamW, batches loaded beforehand): two untimed
warm-up steps, then `--steps` profiled ones. The table gives the operators with the most self CPU time, per
step and as a share of the profiled total, and the same time grouped by kind (convolutions, grid sampling,
matrix products, everything else). `--channels-last` also times the same steps, interleaved, on a copy of the
model in channels-last memory format (and the batch's 4-D tensors; the 5-D camera stacks stay as they are, and
each convolution follows its weights' format): the same arithmetic in another layout, which oneDNN can run
faster on some CPUs.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import click
from common import interleaved, machine, median, resolve_device, table
from step_time import _build, _step, step_options

GROUPS = {
    "convolution (forward + backward)": ("convolution", "conv2d"),
    "grid sampling (forward + backward)": ("grid_sampler",),
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
}


def _group(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(key in name for key in keys):
            return group
    return "everything else"


def _channels_last(model: Any, batches: list[Any]) -> tuple[Any, list[Any]]:
    import torch

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            return value.contiguous(memory_format=torch.channels_last)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if hasattr(value, "__dataclass_fields__"):
            return type(value)(**{k: convert(getattr(value, k)) for k in value.__dataclass_fields__})
        return value

    return copy.deepcopy(model).to(memory_format=torch.channels_last), [convert(b) for b in batches]


@click.command()
@step_options
@click.option("--k", type=int, default=2, show_default=True, help="Past frames of TD.")
@click.option("--steps", default=6, show_default=True, help="Profiled steps.")
@click.option("--rows", default=15, show_default=True, help="Operators listed.")
@click.option("--channels-last", is_flag=True, help="Also time the steps in channels-last memory format.")
@click.option("--device", default="cpu", show_default=True)
def main(rows: int, channels_last: bool, **opts: Any) -> None:
    import torch

    opts["device"] = resolve_device(opts["device"])
    steps = opts["steps"]
    model, batches, _, optimizer = _build("cached", opts, steps + 2)
    for batch in batches[:2]:
        _step(model, optimizer, batch, opts["device"])
    seconds = []
    with torch.profiler.profile() as profile:
        for batch in batches[2:]:
            start = time.perf_counter()
            _step(model, optimizer, batch, opts["device"])
            seconds.append(time.perf_counter() - start)
    events = profile.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    click.echo(f"machine: {machine(opts['device'])}")
    click.echo(f"student `{opts['config']}`, terms {opts['terms']}, K = {opts['k']}; {steps} profiled steps, "
               f"median {median(seconds):.3f} s per step (with the profiler on)\n")
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    click.echo(table(["operator", "calls per step", "self ms per step", "share"],
                     [[e.key, f"{e.count / steps:.0f}", f"{e.self_cpu_time_total / 1e3 / steps:.1f}",
                       f"{e.self_cpu_time_total / total:.1%}"] for e in top]))
    grouped: dict[str, float] = {}
    for e in events:
        grouped[_group(e.key)] = grouped.get(_group(e.key), 0.0) + e.self_cpu_time_total
    click.echo("")
    click.echo(table(["kind", "self ms per step", "share"],
                     [[g, f"{t / 1e3 / steps:.1f}", f"{t / total:.1%}"]
                      for g, t in sorted(grouped.items(), key=lambda kv: -kv[1])]))
    if not channels_last:
        return
    converted, converted_batches = _channels_last(model, batches)
    variants = {"contiguous": (model, batches, optimizer),
                "channels_last": (converted, converted_batches, torch.optim.AdamW(converted.parameters(), lr=1e-4))}
    done = {name: 0 for name in variants}

    def one(name: str) -> Any:
        def run() -> None:
            m, b, o = variants[name]
            _step(m, o, b[done[name] % len(b)], opts["device"])
            done[name] += 1
        return run

    times = interleaved({name: one(name) for name in variants}, steps)
    click.echo("")
    click.echo(table(["memory format", "step (s), median"], [[n, f"{median(t):.3f}"] for n, t in times.items()]))
    click.echo(f"\nchannels_last / contiguous = **{median(times['channels_last']) / median(times['contiguous']):.3f}**")


if __name__ == "__main__":
    main()
