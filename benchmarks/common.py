"""What every benchmark script shares: the machine line, markdown tables, interleaved timing and JSON results.

Each script prints a markdown section (a title, the machine, one table, the ratios) on stdout and, with
`--json PATH`, writes its numbers for `run_all.py`, which assembles BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> str:
    """One line: CPU model and cores, torch version and threads, device (with the GPU's name on CUDA)."""
    import torch

    where = device
    if device.startswith("cuda"):
        where = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return (f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {where}")


def resolve_device(name: str) -> str:
    """`cpu` or `cuda[:i]`; asking for CUDA where there is none is an error, not a silent CPU run."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA device; run on a GPU machine "
                         "with a CUDA build of torch, or use --device cpu")
    return name


def sync(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, *, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, called A B C A B C … for `warmup` untimed then `rounds` timed rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def reset_peak_rss() -> None:
    """Restart the peak resident set size (VmHWM) at the current one (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """The process's peak resident set size since start or since `reset_peak_rss`."""
    return _status_kib("VmHWM") / 1024


def rss_mib() -> float:
    """The process's current resident set size."""
    return _status_kib("VmRSS") / 1024


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; `align` is one character per column, `l` or `r` (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, results: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2, sort_keys=True))


def dir_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
