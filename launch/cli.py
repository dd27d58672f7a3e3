"""The ``sonosynth`` command: one subcommand per stage; each function's signature is its CLI.

Every stage resolves its config as defaults < recipe (``--recipe``) < flags < ``--set
a.b=value``, writes the resolved config next to its output, runs, and prints a summary.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from sonosynth.datasets.cohorts import CohortError
from sonosynth.infra.config import ConfigError, describe, merge
from sonosynth.infra.storage import StorageError
from sonosynth.launch.recipes import resolve

app = typer.Typer(
    name="sonosynth",
    help="Diffusion-based synthetic data augmentation for fetal ultrasound, on Ray clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Recipe = Annotated[Optional[str], typer.Option("--recipe", "-r",
                                               help="YAML recipe (path, or name in configs/).")]
Overrides = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override any config field: --set engine.max_steps=500 (repeatable; "
                  "`sonosynth config STAGE` lists the fields).")]


class CohortChoice(str, Enum):
    hc18 = "hc18"
    fpdb = "fpdb"
    africa = "africa"
    folder = "folder"
    phantom = "phantom"


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def ingest(
    cohort: Annotated[Optional[CohortChoice], typer.Option(help="Cohort adapter.")] = None,
    src: Annotated[Optional[str], typer.Option(help="Folder holding the cohort's images.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Destination: a folder or s3://bucket/prefix.")] = None,
    index: Annotated[Optional[str], typer.Option(
        help="The cohort's index CSV (fpdb, africa; hc18 pixel sizes; folder labels).")] = None,
    num: Annotated[Optional[int], typer.Option(help="Number of phantom samples (--cohort phantom).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any input is quarantined.")] = False,
    workers: Annotated[Optional[int], typer.Option(help="Processes building shards in parallel.")] = None,
    recipe: Recipe = None,
    set_: Overrides = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Read a real cohort (or the phantom) into WebDataset shards, manifest.parquet and
    quarantine.jsonl at OUT. Outline masks are filled; bad inputs are quarantined with a
    reason. Re-running into the same OUT resumes and never duplicates samples."""
    from sonosynth.datasets.ingest import IngestConfig, run_ingest

    flags = {"cohort": {"name": cohort.value if cohort else None, "src": src, "index": index,
                        "phantom": {"num": num}},
             "out": out, "strict": strict or None, "workers": workers}
    try:
        cfg = resolve(IngestConfig, recipe, flags, set_ or [])
        report = run_ingest(cfg, progress=progress)
    except (ConfigError, CohortError, StorageError) as err:
        _fail(err)
    typer.echo(report.summary())
    if report.ingested == 0:
        typer.secho("error: nothing was ingested; see the quarantine reasons above", fg="red", err=True)
        raise typer.Exit(1)
    if cfg.strict and report.quarantined:
        typer.secho("error: --strict and some inputs were quarantined", fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def inspect(
    dataset: Annotated[str, typer.Argument(help="Dataset folder or s3:// prefix.")],
    grid: Annotated[Optional[str], typer.Option(help="Write a PNG grid of samples with masks here.")] = None,
    samples: Annotated[int, typer.Option(help="Samples in the grid.")] = 16,
) -> None:
    """Read a dataset back: manifest counts checked against a full streamed read."""
    from sonosynth.datasets.summary import summarize

    try:
        summary = summarize(dataset, grid=grid, grid_samples=samples)
    except StorageError as err:
        _fail(err)
    typer.echo(json.dumps(summary, indent=2))
    if summary["samples_read"] != summary["samples_in_manifest"]:
        typer.secho("error: shards and manifest disagree", fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="Folder for everything the demo writes.")] = "runs/demo",
    recipe: Recipe = "demo",
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override the demo recipe: --set train_lora.engine.max_steps=20 (repeatable).")] = None,
) -> None:
    """The embedded default end to end on this machine: phantom ingest -> tiny joint-mode
    LoRA (2 DeepSpeed ranks on a local Ray) -> synthetic image+mask pairs from that LoRA
    (sampler actors on the same Ray), all tracked in a local MLflow store."""
    from sonosynth.datasets.ingest import IngestConfig, run_ingest
    from sonosynth.datasets.summary import summarize
    from sonosynth.infra.config import apply_overrides, build, load_yaml
    from sonosynth.launch.generate import GenerateConfig
    from sonosynth.launch.generate_driver import GenerationError, run_generate
    from sonosynth.launch.recipes import find_recipe
    from sonosynth.trainers.diffusion.train import LoraTrainConfig
    from sonosynth.trainers.engine import TrainingError, train

    root = Path(out).resolve()
    try:
        data = apply_overrides(load_yaml(find_recipe(recipe)) if recipe else {}, set_ or [])
        ingest_cfg = build(IngestConfig, {**data.get("ingest", {}), "out": str(root / "real")}, "demo ingest")
        lora_cfg = build(LoraTrainConfig, merge(data.get("train_lora", {}), {
            "out": str(root / "lora"), "data": {"dataset": str(root / "real")},
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"}}), "demo train_lora")
        gen_cfg = build(GenerateConfig, merge(data.get("generate", {}), {
            "out": str(root / "synthetic"), "sampler": {"lora": str(root / "lora" / "model")},
            "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"}}), "demo generate")
        typer.echo("1/3 ingest: phantom cohort -> WebDataset shards")
        report = run_ingest(ingest_cfg)
        summary = summarize(ingest_cfg.out, grid=str(root / "real_preview.png"))
        typer.echo(report.summary())
        typer.echo("2/3 train-lora: tiny joint-mode LoRA, 2 ranks (first run builds a DeepSpeed op, ~30 s)")
        trained = train(lora_cfg)
        _print_training_summary(trained)
        typer.echo("3/3 generate: synthetic image+mask pairs from that LoRA, sampler actors on Ray")
        generated = run_generate(gen_cfg)
    except (ConfigError, CohortError, StorageError, TrainingError, GenerationError) as err:
        _fail(err)
    _print_generation(generated)
    typer.echo("")
    typer.echo(f"dataset:        {root / 'real'} ({summary['samples_read']} samples)")
    typer.echo(f"dataset grid:   {summary['grid']}")
    typer.echo(f"LoRA (diffusers format): {root / 'lora' / 'model'}")
    typer.echo(f"LoRA samples:   {root / 'lora' / 'previews' / 'final.png'}")
    typer.echo(f"synthetic:      {root / 'synthetic'} ({generated['accepted']} image+mask pairs)")
    typer.echo(f"synthetic grid: {root / 'synthetic' / 'samples_grid.png'}")
    typer.echo(f"MLflow UI:      mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}")


@app.command("train-lora")
def train_lora(
    recipe: Annotated[str, typer.Argument(
        help="Recipe: lora_joint_head, lora_class_planes(_r8/_r32), lora_joint_tiny, ... or a YAML path.")],
    out: Annotated[Optional[str], typer.Option(help="Output folder or s3:// prefix.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Training dataset (from `sonosynth ingest`).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Training workers (one per GPU).")] = None,
    set_: Overrides = None,
) -> None:
    """Fine-tune a Stable Diffusion LoRA with DeepSpeed on Ray Train, tracked in MLflow.

    Joint mode (paper A) learns image+mask together; class mode (FU-LoRA) one caption per
    plane. Re-running the same command resumes from the last checkpoint in OUT. The LoRA
    is written to OUT/model (diffusers format) and registered in MLflow as sonosynth-lora."""
    from sonosynth.trainers.diffusion.train import LoraTrainConfig
    from sonosynth.trainers.engine import TrainingError, train

    flags = {"out": out, "data": {"dataset": dataset}, "engine": {"workers": workers}}
    try:
        cfg = resolve(LoraTrainConfig, recipe, flags, set_ or [])
        summary = train(cfg)
    except (ConfigError, StorageError, TrainingError) as err:
        _fail(err)
    _print_training_summary(summary)


def _print_training_summary(summary: dict) -> None:
    if summary.get("already_complete"):
        typer.echo("this job had already finished; nothing was retrained")
    ev0, ev1 = summary.get("eval_start", {}), summary.get("eval_end", {})
    typer.echo(f"trained {summary['steps']} steps on {summary['examples']} examples with "
               f"{summary['workers']} workers")
    for name in sorted(set(ev0) & set(ev1)):
        typer.echo(f"  {name}: {ev0[name]:.4f} -> {ev1[name]:.4f}")
    typer.echo(f"model:   {summary['model']}")
    ml = summary.get("mlflow") or {}
    if ml.get("run_id"):
        typer.echo(f"mlflow:  run {ml['run_id']} at {ml['uri']}")
    if ml.get("version"):
        typer.echo(f"registered: {ml['registered_model']} version {ml['version']}")
    if ml.get("offline"):
        typer.secho("warning: MLflow was unreachable; see tracking-offline/ and `sonosynth tracking-replay`",
                    fg="yellow", err=True)


@app.command()
def generate(
    recipe: Annotated[str, typer.Argument(help="Recipe: generate_joint_head, generate_class_planes, "
                                               "generate_tiny, ... or a YAML path.")],
    out: Annotated[Optional[str], typer.Option(help="Destination dataset: a folder or s3://bucket/prefix.")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Accepted samples to deliver.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Sampler actors (default: one per GPU).")] = None,
    lora: Annotated[Optional[str], typer.Option(
        help="LoRA folder, s3:// prefix or MLflow URI, e.g. models:/sonosynth-lora@champion.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to join (default: $RAY_ADDRESS, "
                                                        "else a local Ray).")] = None,
    set_: Overrides = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Sample synthetic image+mask pairs (or plane images) on Ray into WebDataset shards.

    Each sampler actor loads the base model and fuses the LoRA once; shards are published
    atomically with a completion record, so re-running the same command after a crash resumes
    with no duplicated and no missing sample. Joint-mode masks are extracted from the blue
    channel, filled and quality-checked; rejected samples are redrawn with derived seeds."""
    from sonosynth.launch.generate import GenerateConfig
    from sonosynth.launch.generate_driver import GenerationError, run_generate

    flags = {"out": out, "num_samples": num_samples, "workers": workers, "sampler": {"lora": lora},
             "ray": {"address": address}}
    try:
        cfg = resolve(GenerateConfig, recipe, flags, set_ or [])
        report = run_generate(cfg, progress=progress)
    except (ConfigError, StorageError, FileNotFoundError, ValueError) as err:
        _fail(err)
    except GenerationError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(1)
    _print_generation(report)


def _print_generation(r: dict) -> None:
    rate = f"{r['acceptance_rate']:.0%}" if r["acceptance_rate"] is not None else "n/a"
    typer.echo(f"generated {r['accepted']}/{r['requested']} samples (run {r['run_id']}, {r['mode']} mode) "
               f"in {r['shards']} shards; {r['shards_reused']} shards were already complete")
    typer.echo(f"  acceptance {rate}; rejected: {r['rejected_by_reason'] or 'none'}")
    if r.get("steady_samples_per_s"):
        typer.echo(f"  {r['steady_samples_per_s']:.2f} accepted samples/s while sampling "
                   f"({r['samples_per_s']:.2f}/s over {r['seconds']:.1f} s including model loading)")
    typer.echo(f"dataset: {r['out']}")
    typer.echo(f"grid:    {r['out'].rstrip('/')}/samples_grid.png")
    ml = r.get("mlflow") or {}
    if ml.get("run_id"):
        typer.echo(f"mlflow:  run {ml['run_id']} at {ml['uri']}")


@app.command("tracking-replay")
def tracking_replay(
    folder: Annotated[str, typer.Argument(help="The job's tracking-offline folder.")],
    uri: Annotated[Optional[str], typer.Option(help="Tracking URI (default: $MLFLOW_TRACKING_URI).")] = None,
    experiment: Annotated[str, typer.Option(
        help="Experiment for a run that was never created (the job's own run is reused when it exists).")
    ] = "sonosynth-train-lora",
) -> None:
    """Send tracking records that a job could not deliver while MLflow was down."""
    from sonosynth.infra.tracking import TrackingConfig, replay

    try:
        run_id = replay(folder, TrackingConfig(uri=uri), experiment=experiment)
    except (FileNotFoundError, ConnectionError) as err:
        _fail(err)
    typer.echo(f"delivered to run {run_id}")


@app.command("config")
def show_config(
    stage: Annotated[str, typer.Argument(help="Stage whose config to explain: ingest, train-lora, generate.")],
) -> None:
    """List every field of a stage's config with its type, default and meaning."""
    from sonosynth.datasets.ingest import IngestConfig
    from sonosynth.trainers.diffusion.train import LoraTrainConfig

    from sonosynth.launch.generate import GenerateConfig

    stages = {"ingest": IngestConfig, "train-lora": LoraTrainConfig, "generate": GenerateConfig}
    if stage not in stages:
        _fail(ConfigError(f"unknown stage {stage!r}; choose from {', '.join(stages)}"))
    typer.echo("\n".join(describe(stages[stage])))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app(prog_name="sonosynth")


if __name__ == "__main__":
    sys.exit(main())
