"""`stxd-train`: teachers and camera students, evaluation, sweeps and diagnostics."""

from __future__ import annotations

from collections.abc import Callable

import click

from pipelines.cli_support import StxdGroup, debug_option


@click.group(cls=StxdGroup)
@debug_option
def main() -> None:
    """Training for stxd: the LiDAR teacher (stage one's model) and the camera students (stage two)."""


def _run_options(example: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The options of every training command: config, data, run folder, overrides, resume, device."""
    options = [
        click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                     help=f"Run YAML, e.g. {example}, or a run's RUN/config.yaml."),
        click.option("--dataroot", required=True, type=click.Path(), help="nuScenes root."),
        click.option("--version", required=True, help="Table folder, e.g. v1.0-trainval or v1.0-synth."),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config field (a.b=c)."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu or cuda[:i] (under torchrun, each rank's own device)."),
    ]

    def apply(command: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


@main.command()
@_run_options("configs/teacher/centerpoint_synth.yaml")
@click.option("--eval/--no-eval", "run_eval", default=True, show_default=True,
              help="Score the trained teacher on the val split with DetectionEval.")
def teacher(config_path: str, dataroot: str, version: str, out: str, overrides: tuple[str, ...], resume: bool,
            device: str, run_eval: bool) -> None:
    """Train the CenterPoint LiDAR teacher; writes RUN/teacher.pt for `stxd-cache extract`. Under torchrun, one
    process per device (gloo on CPU, nccl on GPU)."""
    from stxd_train.configs import TeacherRunConfig, load_run_config

    cfg = load_run_config(TeacherRunConfig, config_path, overrides, kind="teacher")   # checked before torch loads
    from stxd_train.engine import is_main_process
    from stxd_train.scoring import evaluate_run
    from stxd_train.teacher import train_teacher

    path = train_teacher(cfg, dataroot=dataroot, version=version, out=out, resume=resume, device=device)
    if is_main_process():
        click.echo(f"teacher written to {path}")
        if run_eval:
            _print_metrics(evaluate_run(out, device=device))


@main.command()
@_run_options("configs/student/bevformer_synth.yaml")
@click.option("--cache", type=click.Path(), help="Teacher cache (stxd-cache extract) to join with every sample.")
@click.option("--teacher-online", type=click.Path(dir_okay=False),
              help="Teacher checkpoint run at every step instead of a cache (the peers' way; for comparison).")
@click.option("--cache-config", type=click.Path(dir_okay=False),
              help="With --teacher-online: the cache layout to imitate, e.g. configs/cache/synth.yaml.")
@click.option("--trust-checkpoint", is_flag=True,
              help="With --teacher-online: allow full unpickling of the teacher checkpoint (runs code).")
@click.option("--eval/--no-eval", "run_eval", default=False, show_default=True,
              help="Score the trained student on the val split with DetectionEval.")
def fit(config_path: str, dataroot: str, version: str, out: str, cache: str | None, teacher_online: str | None,
        cache_config: str | None, trust_checkpoint: bool, overrides: tuple[str, ...], resume: bool, device: str,
        run_eval: bool) -> None:
    """Train a camera student; under torchrun, one process per device (gloo on CPU, nccl on GPU)."""
    from pipelines.config import load_config
    from stxd_train.configs import StudentRunConfig, load_run_config

    cfg = load_run_config(StudentRunConfig, config_path, overrides, kind="student")   # checked before torch loads
    from stxd_train.engine import is_main_process
    from stxd_train.fit import fit as fit_student

    layout = None
    if cache_config is not None:
        from stxd_cache.extract import ExtractConfig

        layout = load_config(ExtractConfig, cache_config)
    path = fit_student(cfg, dataroot=dataroot, version=version, out=out, cache=cache, teacher_online=teacher_online,
                       cache_config=layout, resume=resume, device=device, trust_checkpoint=trust_checkpoint)
    if is_main_process():
        click.echo(f"student written to {path}")
        if run_eval:
            from stxd_train.scoring import evaluate_run

            _print_metrics(evaluate_run(out, device=device))


@main.command(name="config")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Teacher or student run YAML (configs/teacher/*.yaml, configs/student/*.yaml, or RUN/config.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field (a.b=c).")
def config_(config_path: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved run config, one `field: value  # help` line per field, as `fit` or `teacher` would use
    it; every line can be passed back as --set field=value."""
    from pipelines.config import describe, read_yaml

    data = read_yaml(config_path)
    kind = data.get("kind") or ("student" if (data.get("model") or {}).get("name") in ("bevformer", "uvtr")
                                else "teacher")
    from stxd_train.configs import StudentRunConfig, TeacherRunConfig, load_run_config

    run_config = StudentRunConfig if kind == "student" else TeacherRunConfig
    cfg = load_run_config(run_config, config_path, overrides, kind=kind)
    click.echo(f"# {kind} run config of {config_path}" + "".join(f" --set {o}" for o in overrides))
    click.echo("\n".join(describe(cfg)))


@main.command(name="eval")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--split", help="Split to score (default: the run's val split); it must have annotations.")
@click.option("--dataroot", type=click.Path(), help="Dataset root (default: the one the run trained on).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
def eval_(run_dir: str, split: str | None, dataroot: str | None, device: str) -> None:
    """Score a teacher or student run with the real nuScenes DetectionEval: RUN/eval/SPLIT/ (metrics.json,
    summary.md, PR curves); scoring the run's val split also writes RUN/metrics.json, which compare reads."""
    from stxd_train.scoring import evaluate_run

    _print_metrics(evaluate_run(run_dir, split=split, device=device, dataroot=dataroot))


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--split", required=True, help="Split to predict, annotated or not (e.g. test).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Submission JSON to write.")
@click.option("--dataroot", type=click.Path(), help="Dataset root (default: the one the run trained on).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
def predict(run_dir: str, split: str, out: str, dataroot: str | None, device: str) -> None:
    """Write a teacher or student run's boxes on every sample of SPLIT as a nuScenes detection submission (the
    format the evaluation server takes), without scoring it."""
    from pipelines.paths import check_output_path
    from stxd_train.scoring import predict as run_predict
    from stxd_train.scoring import write_submission

    path = check_output_path(out, option="--out")
    found = run_predict(run_dir, split=split, device=device, dataroot=dataroot)
    submission = write_submission(found, path)
    boxes = sum(len(v) for v in submission["results"].values())
    click.echo(f"{path}: {len(submission['results'])} samples of {split}, {boxes} boxes")


@main.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Student or teacher run.")
@click.option("--sample", "token", required=True, help="Sample token (of the run's val or training splits).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--dataroot", type=click.Path(), help="Dataset root (default: the one the run trained on).")
@click.option("--min-score", default=0.3, show_default=True, help="Boxes drawn from this score up.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
def show(run_dir: str, token: str, out: str, dataroot: str | None, min_score: float, device: str) -> None:
    """Draw a run's boxes (red) and the GT (white) on the six camera images and in a BEV panel with the ego, axes
    in metres and a scale bar."""
    from pipelines.paths import check_output_path
    from stxd_train.show import show_run

    path = check_output_path(out, option="--out", inputs={"--run": run_dir, "--dataroot": dataroot})
    counts = show_run(run_dir, token, path, dataroot=dataroot, min_score=min_score, device=device)
    click.echo(f"wrote {path}: {counts['predicted']} boxes scoring >= {min_score:g} and {counts['gt']} GT boxes; "
               f"{counts['boxes_in_cameras']} boxes seen by a camera")


@main.command()
@click.option("--cache", required=True, type=click.Path(), help="Teacher cache every run trains against.")
@click.option("--grid", "grid_path", required=True, type=click.Path(dir_okay=False),
              help="Sweep YAML, e.g. configs/sweeps/ablation_synth.yaml.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder of the runs and the table.")
@click.option("--dataroot", type=click.Path(), help="Dataset root (default: the grid's `dataroot`).")
@click.option("--version", help="Table folder (default: the grid's `version`).")
@click.option("--parallel", default=1, show_default=True, help="Fits running at once, all reading the cache.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a grid field (a.b=c).")
@click.option("--device", default="cpu", show_default=True, help="Device of every run.")
def sweep(cache: str, grid_path: str, out: str, dataroot: str | None, version: str | None, parallel: int,
          overrides: tuple[str, ...], device: str) -> None:
    """Train and evaluate a grid of students against one cache; writes OUT/results.md and OUT/results.json.

    With a `reference` variant in the grid, the table adds each other variant's per-seed differences to it, their
    mean and 95% intervals (paired t over seeds, bootstrap over the evaluation frames)."""
    from pathlib import Path

    from pipelines.config import load_config
    from pipelines.errors import ConfigError
    from stxd_train.sweep import SweepConfig, run_sweep

    cfg = load_config(SweepConfig, grid_path, overrides)
    dataroot, version = dataroot or cfg.dataroot, version or cfg.version
    if not dataroot or not version:
        raise ConfigError(f"{grid_path} names no dataroot/version; pass --dataroot and --version")
    run_sweep(cfg, cache=cache, dataroot=dataroot, version=version, out=out, parallel=parallel, device=device)
    click.echo((Path(out) / "results.md").read_text(), nl=False)


@main.command()
@click.option("--run", "runs", multiple=True, required=True, type=click.Path(file_okay=False),
              help="Evaluated run folder (repeatable): one column each.")
@click.option("--reference", metavar="VARIANT|RUN",
              help="Also show every variant's differences to this one, run by run of the same train.seed, with 95% "
                   "intervals (paired t over seeds, bootstrap over the evaluation frames). Variant of a run: the "
                   "parent folder's name for OUT/<variant>/seed<N>, else the run folder's name.")
@click.option("--draws", default=1000, show_default=True, help="Frame resamples of the bootstrap (0: none).")
@click.option("--split", help="Compare the runs' scores on this split (RUN/eval/SPLIT/) [default: RUN/metrics.json, "
                              "the val split].")
def compare(runs: tuple[str, ...], reference: str | None, draws: int, split: str | None) -> None:
    """Evaluated runs side by side: NDS, mAP and the TP errors with each run's difference to the first, AP per class
    and the commit each was scored with."""
    from stxd_train.sweep import compare_markdown

    click.echo(compare_markdown(list(runs), reference=reference, draws=draws, split=split))


@main.command()
@click.option("--cache", required=True, type=click.Path(), help="Teacher cache whose features are measured.")
@click.option("--run", "runs", multiple=True, type=click.Path(file_okay=False),
              help="Student run folder (repeatable): its BEV features are measured too.")
@click.option("--split", required=True, help="Split whose samples are used, e.g. synth_val.")
@click.option("--dataroot", type=click.Path(), help="Dataset root (default: the first run's).")
@click.option("--version", help="Table folder (default: the first run's).")
@click.option("--max-rows", default=100_000, show_default=True, help="BEV cells sampled per feature set.")
@click.option("--orientation", is_flag=True,
              help="Also print each --run's per-class orientation error (AOE) from RUN/metrics.json.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
def diagnose(cache: str, runs: tuple[str, ...], split: str, dataroot: str | None, version: str | None,
             max_rows: int, orientation: bool, device: str) -> None:
    """Effective dimension (d_eff) of teacher and student BEV features, with --orientation the runs' AOE per class.

    d_eff is the participation ratio of a spectrum, of the feature covariance (cov) and of the correlation matrix
    of the channels standardised to unit variance (corr). Rows: the teacher's cached BEV, each run's raw BEV and,
    for a run distilled through an adapter, its adapted BEV. Compare students on their raw BEV: it is what the
    head reads, in the same channels for plain and distilled runs. CD is blind to the scale of each adapter
    output channel, so the adapted BEV's cov d_eff depends on arbitrary scales. The AOE per class is the nuScenes
    devkit's, as `stxd-train eval` stored it (barrier modulo π, traffic_cone not scored).
    """
    from stxd_train.diagnose import deff_markdown, orientation_markdown
    from stxd_train.diagnose import diagnose as run_diagnose

    if orientation and not runs:
        raise click.UsageError("--orientation reads the metrics of the --run folders; pass at least one --run")
    # Read before the slow feature pass, so that a run not yet scored fails at once.
    aoe = orientation_markdown(runs) if orientation else None
    table = run_diagnose(cache, runs=runs, split=split, dataroot=dataroot, version=version, device=device,
                         max_rows=max_rows)
    click.echo(deff_markdown(table), nl=False)
    if aoe is not None:
        click.echo("")
        click.echo(aoe, nl=False)


def _print_metrics(metrics: dict) -> None:
    click.echo(f"{metrics['split']}: NDS {metrics['NDS']:.4f}  mAP {metrics['mAP']:.4f}  mATE {metrics['mATE']:.3f}  "
               f"mASE {metrics['mASE']:.3f}  mAOE {metrics['mAOE']:.3f}  mAVE {metrics['mAVE']:.3f}  "
               f"mAAE {metrics['mAAE']:.3f}")
    click.echo("per-class AP: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["per_class_AP"].items()))


if __name__ == "__main__":   # torchrun --nproc_per_node N -m stxd_train.cli fit ...
    main()
