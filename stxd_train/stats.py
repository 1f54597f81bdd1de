"""Paired statistics over seeds: is a variant better than its reference run of the same seed?

Two runs with the same `train.seed` share initial weights, sample order and augmentation draws, so their
difference removes the seed's own luck. `paired_t_interval` and `paired_summary` turn per-seed differences into a
mean and a paired-t confidence interval; `frame_bootstrap` gives a percentile interval over resamples of the
evaluation frames; `paired_comparison` applies both to the evaluated runs of a sweep or of `stxd-train compare`.
Imports nothing heavier than numpy (scipy when a t interval is computed, the devkit when runs are re-scored).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from pipelines.errors import ConfigError

PAIRED_METRICS: tuple[str, ...] = ("NDS", "mAP")
BOOTSTRAP_SEED = 0   # the frame resamples are the same in every table, so tables can be compared


def t_quantile(probability: float, dof: int) -> float:
    """The `probability` quantile of Student's t distribution with `dof` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(probability, dof))


def paired_t_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the paired-t confidence interval of the mean difference.

    `differences`: one value per seed, variant minus reference. The bounds are NaN for fewer than 2 values
    (the mean too when there are none).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence is {confidence}; expected a value in (0, 1), e.g. 0.95")
    values = [float(d) for d in differences]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_summary(reference: Mapping[int, float], variant: Mapping[int, float],
                   confidence: float = 0.95) -> dict[str, Any]:
    """Per-seed differences `variant - reference` over the seeds both have, with their mean, standard deviation
    (NaN below 2 seeds), count and paired-t interval.

    Returns {"seeds": [s, ...], "differences": {s: d, ...}, "mean", "std", "n", "ci_low", "ci_high"}.
    """
    seeds = sorted(set(reference) & set(variant))
    differences = {seed: float(variant[seed]) - float(reference[seed]) for seed in seeds}
    mean, low, high = paired_t_interval(list(differences.values()), confidence)
    std = statistics.stdev(differences.values()) if len(seeds) > 1 else math.nan
    return {"seeds": seeds, "differences": differences, "mean": mean, "std": std, "n": len(seeds),
            "ci_low": low, "ci_high": high}


def percentile_interval(draws: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) percentiles of bootstrap draws, e.g. 2.5 and 97.5 for `confidence` 0.95 (NaN without draws)."""
    values = np.asarray(draws, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


class FrameScoring(Protocol):
    """What the frame bootstrap needs of a run (`pipelines.matches.FrameScorer`): its frames, and its metrics with
    each frame counted a given number of times."""

    @property
    def tokens(self) -> np.ndarray: ...

    def score(self, counts: np.ndarray | None = None) -> Mapping[str, float]: ...


def frame_bootstrap(reference: Mapping[int, FrameScoring], variant: Mapping[int, FrameScoring], *,
                    metrics: Sequence[str] = ("NDS", "mAP"), draws: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """Percentile interval of the mean over seeds of `variant - reference`, resampling the evaluation frames.

    Each draw resamples the frames with replacement once and applies that resample to every run (both runs of
    each seed, and all seeds), re-scores them, and averages the per-seed differences over the seeds that both
    have. Returns {metric: {"low", "high", "mean" (over draws), "draws", "seeds"}}; NaN bounds without a common
    seed or with `draws` 0.
    """
    from pipelines.matches import frame_positions

    seeds = sorted(set(reference) & set(variant))
    if not seeds or draws < 1:
        return {m: {"low": math.nan, "high": math.nan, "mean": math.nan, "draws": 0, "seeds": len(seeds)}
                for m in metrics}
    frames = reference[seeds[0]].tokens
    pairs = []
    for s in seeds:
        ref, var = reference[s], variant[s]
        pairs.append((ref, frame_positions(frames, ref.tokens, where=f"seed {s}"),
                      var, frame_positions(frames, var.tokens, where=f"seed {s}")))
    rng = np.random.default_rng(seed)
    out = np.empty((draws, len(metrics)))
    for d in range(draws):
        counts = np.bincount(rng.integers(0, len(frames), len(frames)), minlength=len(frames))
        per_seed = []
        for ref, ref_at, var, var_at in pairs:
            a, b = ref.score(counts[ref_at]), var.score(counts[var_at])
            per_seed.append([b[m] - a[m] for m in metrics])
        out[d] = np.mean(per_seed, axis=0)
    result = {}
    for k, m in enumerate(metrics):
        low, high = percentile_interval(out[:, k], confidence)
        result[m] = {"low": low, "high": high, "mean": float(np.mean(out[:, k])), "draws": draws,
                     "seeds": len(seeds)}
    return result


def matches_path(run: Path) -> Path:
    """`RUN/eval/<split>/matches.npz` of the split that `RUN/metrics.json` scored (a path that does not exist
    when the run is not scored)."""
    from pipelines.matches import MATCHES_FILE

    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        return run / "eval" / MATCHES_FILE
    return run / "eval" / str(json.loads(metrics_path.read_text()).get("split")) / MATCHES_FILE


def paired_comparison(rows: list[dict[str, Any]], *, reference: str, draws: int = 1000,
                      confidence: float = 0.95) -> list[dict[str, Any]]:
    """Every variant of `rows` (dicts with variant, seed, NDS, mAP, run, and optionally matches: the run's
    `matches.npz`, else `matches_path(run)`) against `reference`, seed by seed.

    One entry per other variant: {"variant", "reference", "seeds": common seeds, and per metric of
    `PAIRED_METRICS` {"seeds" (those scored), "differences" (one per seed), "mean", "std", "n", "ci_low",
    "ci_high" (paired t), "bootstrap_low", "bootstrap_high", "bootstrap_draws" (frame bootstrap; None where a
    run has no `matches.npz`)}, and "without_matches": those runs}.
    """
    from pipelines.matches import FrameMatches, FrameScorer

    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        seeds = by_variant.setdefault(row["variant"], {})
        if row["seed"] in seeds:
            raise ConfigError(f"variant {row['variant']} has two runs of seed {row['seed']} "
                              f"({seeds[row['seed']]['run']} and {row['run']}); a paired comparison needs one run "
                              "per variant and seed")
        seeds[row["seed"]] = row
    if reference not in by_variant:
        raise ConfigError(f"reference {reference!r} is none of the variants {sorted(by_variant)}")
    scorers: dict[str, FrameScorer | None] = {}

    def scorer(row: dict[str, Any]) -> FrameScorer | None:
        if row["run"] not in scorers:
            path = Path(row["matches"]) if row.get("matches") else matches_path(Path(row["run"]))
            scorers[row["run"]] = FrameScorer(FrameMatches.load(path)) if path.is_file() else None
        return scorers[row["run"]]

    ref_rows = by_variant[reference]
    entries = []
    for name, var_rows in by_variant.items():
        if name == reference:
            continue
        common = sorted(set(ref_rows) & set(var_rows))
        entry: dict[str, Any] = {"variant": name, "reference": reference, "seeds": common}
        boot: dict[str, dict[str, float]] = {}
        if draws > 0 and common:
            pairs = [(s, scorer(ref_rows[s]), scorer(var_rows[s])) for s in common]
            entry["without_matches"] = [row["run"] for s in common for row in (ref_rows[s], var_rows[s])
                                        if scorers[row["run"]] is None]
            if not entry["without_matches"]:   # so every scorer of `pairs` is there
                boot = frame_bootstrap({s: cast(FrameScorer, ref) for s, ref, _ in pairs},
                                       {s: cast(FrameScorer, var) for s, _, var in pairs},
                                       metrics=PAIRED_METRICS, draws=draws, seed=BOOTSTRAP_SEED,
                                       confidence=confidence)
        for metric in PAIRED_METRICS:
            stats = paired_summary({s: ref_rows[s][metric] for s in common if ref_rows[s][metric] is not None},
                                   {s: var_rows[s][metric] for s in common if var_rows[s][metric] is not None},
                                   confidence)
            interval = boot.get(metric)
            entry[metric] = {"seeds": stats["seeds"], "differences": [stats["differences"][s] for s in stats["seeds"]],
                             "mean": stats["mean"], "std": stats["std"], "n": stats["n"],
                             "ci_low": stats["ci_low"], "ci_high": stats["ci_high"],
                             "bootstrap_low": interval["low"] if interval else None,
                             "bootstrap_high": interval["high"] if interval else None,
                             "bootstrap_draws": interval["draws"] if interval else 0}
        entries.append(entry)
    return entries


def json_safe(value: Any) -> Any:
    """`value` with every NaN as None: results.json stays strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _interval(low: float | None, high: float | None) -> str:
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "–"
    return f"[{low:+.4f}, {high:+.4f}]"


def paired_markdown(paired: list[dict[str, Any]]) -> list[str]:
    """The lines of the paired-differences table of `paired_comparison`'s entries."""
    if not paired:
        return []
    lines = [f"Paired differences to {paired[0]['reference']} (variant minus reference, run of the same seed); "
             "95% intervals: paired t over seeds, bootstrap over the evaluation frames:", "",
             "| variant | metric | seeds | per-seed differences | mean | t interval | frame bootstrap |",
             "|---|---|---:|---|---:|---:|---:|"]
    for entry in paired:
        for metric in PAIRED_METRICS:
            m = entry[metric]
            diffs = ", ".join(f"{s}: {d:+.4f}" for s, d in zip(m["seeds"], m["differences"], strict=True))
            mean = "–" if m["n"] == 0 else f"{m['mean']:+.4f}"
            lines.append(f"| {entry['variant']} | {metric} | {m['n']} | {diffs or '–'} | {mean} | "
                         f"{_interval(m['ci_low'], m['ci_high'])} | "
                         f"{_interval(m['bootstrap_low'], m['bootstrap_high'])} |")
    missing = list(dict.fromkeys(run for entry in paired for run in entry.get("without_matches", [])))
    if missing:
        lines += ["", f"No frame bootstrap where a run lacks `eval/<split>/matches.npz` ({', '.join(missing)}): "
                      "score it again with `stxd-train eval --run RUN`, which writes it."]
    return lines
