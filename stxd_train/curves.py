"""Training curves of a run folder: every loss term of `metrics.jsonl` against the step, as one PNG."""

from __future__ import annotations

import json
from pathlib import Path


def plot_training_curves(run: str | Path, out: str | Path | None = None) -> Path | None:
    """Plot the total loss and each term logged in `run/metrics.jsonl` (log scale) into `out`
    (default `run/training_curves.png`); returns its path, or None when the run logged nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    steps = [m["step"] for m in lines]
    series = {"loss": [m["loss"] for m in lines]}
    for name in lines[0].get("terms", {}):
        series[name] = [m["terms"].get(name, float("nan")) for m in lines]
    out = Path(out) if out is not None else run / "training_curves.png"
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in series.items():
        ax_loss.plot(steps, values, label=name, linewidth=1.5 if name == "loss" else 1.0)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title(f"{run.name}: training loss")
    ax_loss.legend(fontsize=8)
    ax_lr.plot(steps, [m["lr"] for m in lines])
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
