"""The ``sonosynth`` command: one verb per stage; each function's signature is its CLI.

Every stage verb takes the recipe as its first argument (a name from configs/ or a YAML
path), resolves its config as defaults < recipe < flags < ``--set a.b=value``, runs the
stage from ``sonosynth.launch.stages`` and prints its report.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from typing import Annotated, Any, NoReturn, Optional

import typer

from sonosynth.datasets.cohorts import CohortError
from sonosynth.infra.config import ConfigError, describe
from sonosynth.infra.stage import Report, StageFailed
from sonosynth.infra.storage import StorageError

EXIT_CODES = """Exit status: 0 done; 1 the stage ran and could not deliver (training failed, too few
samples passed QC, nothing ingested; what was written is kept and a re-run resumes); 2 a
usage error (unknown recipe or key, bad value, missing input), with the fix in the message."""

app = typer.Typer(
    name="sonosynth",
    help="Diffusion-based synthetic data augmentation for fetal ultrasound, on Ray clusters.\n\n"
         "Stages: ingest -> train-lora -> generate -> train-sam / train-classifier -> evaluate -> "
         "promote; `sonosynth pipeline` runs them in order, and `sonosynth demo` runs the embedded "
         "default end to end on this machine. `sonosynth config STAGE` lists every field a recipe "
         "or --set can change.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RecipeArg = Annotated[str, typer.Argument(
    metavar="RECIPE", help="Recipe: a name in configs/ (see `sonosynth config --recipes`) or a YAML path.")]
Out = Annotated[Optional[str], typer.Option(help="Output folder or s3://bucket/prefix.")]
Overrides = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Override any config field, e.g. --set engine.max_steps=500 (repeatable; `sonosynth config "
         "STAGE` lists the fields).")]
Progress = Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Show a progress bar.")]
Address = Annotated[Optional[str], typer.Option(
    help="Ray cluster to join, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS, else a local Ray).")]


class CohortChoice(str, Enum):
    hc18 = "hc18"
    fpdb = "fpdb"
    africa = "africa"
    folder = "folder"
    phantom = "phantom"


def _usage_error(err: Exception) -> NoReturn:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


def _failure(err: Exception) -> NoReturn:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(1)


USAGE_ERRORS = (ConfigError, CohortError, FileNotFoundError, ValueError)


def _run_stage(name: str, recipe: str | None, flags: dict[str, Any], overrides: list[str] | None) -> Report:
    """Resolve the stage's config, run it, print its report; exit 2 or 1 on errors."""
    from sonosynth.launch.recipes import resolve
    from sonosynth.launch.stages import get_stage

    stage = get_stage(name)
    try:
        cfg = resolve(stage.config_class, recipe, flags, overrides or [])
        report = stage.run(cfg)
    except USAGE_ERRORS as err:
        _usage_error(err)
    except (StageFailed, StorageError) as err:
        _failure(err)
    typer.echo(report.render())
    if report.failed:
        _failure(RuntimeError(report.failed))
    return report


@app.command()
def ingest(
    recipe: Annotated[Optional[str], typer.Argument(
        metavar="RECIPE", help="Recipe (e.g. ingest_hc18, ingest_fpdb) or a YAML path; optional.")] = None,
    cohort: Annotated[Optional[CohortChoice], typer.Option(help="Cohort adapter.")] = None,
    src: Annotated[Optional[str], typer.Option(help="Folder holding the cohort's images.")] = None,
    index: Annotated[Optional[str], typer.Option(
        help="The cohort's index CSV (fpdb, africa; hc18 pixel sizes; folder labels).")] = None,
    out: Out = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Phantom samples to draw (--cohort phantom).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Processes building shards in parallel.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any input is quarantined.")] = False,
    progress: Progress = None,
    set_: Overrides = None,
) -> None:
    """Read a real cohort (or the phantom) into a sonosynth dataset.

    OUT gets WebDataset shards, manifest.parquet, quarantine.jsonl, split_report.json and the
    resolved config.yaml. Outline masks are filled; unreadable, mismatched or empty inputs go
    to quarantine with a reason and the rest are ingested. Re-running into the same OUT
    resumes and never duplicates a sample.

    Examples:

    \b
        sonosynth ingest --cohort phantom --num-samples 64 --out runs/ph
        sonosynth ingest ingest_hc18 --src ~/data/HC18/training_set \\
            --out s3://bucket/hc18
    """
    flags = {"cohort": {"name": cohort.value if cohort else None, "src": src, "index": index,
                        "phantom": {"num": num_samples}},
             "out": out, "strict": strict or None, "workers": workers, "progress": progress}
    _run_stage("ingest", recipe, flags, set_)


@app.command("train-lora")
def train_lora(
    recipe: RecipeArg,
    out: Out = None,
    dataset: Annotated[Optional[str], typer.Option(help="Training dataset (from `sonosynth ingest`).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Training workers (ranks): one per GPU.")] = None,
    address: Address = None,
    progress: Progress = None,
    set_: Overrides = None,
) -> None:
    """Fine-tune a Stable Diffusion LoRA with DeepSpeed on Ray Train, tracked in MLflow.

    Joint mode (paper A) learns image and mask together (RGB = image, image, mask); class
    mode (FU-LoRA) learns one caption per plane. Re-running the same command resumes from
    the last checkpoint in OUT. The LoRA is written to OUT/model in the diffusers format and
    registered in MLflow as sonosynth-lora.

    Examples:

    \b
        sonosynth train-lora lora_joint_tiny --dataset runs/ph --out runs/lora
        sonosynth train-lora lora_joint_head --dataset runs/hc18 \\
            --set model.pretrained=/models/sd15
    """
    flags = {"out": out, "data": {"dataset": dataset}, "engine": {"workers": workers, "progress": progress},
             "ray": {"address": address}}
    _run_stage("train-lora", recipe, flags, set_)


@app.command()
def generate(
    recipe: RecipeArg,
    out: Out = None,
    num_samples: Annotated[Optional[int], typer.Option(help="Accepted samples to deliver.")] = None,
    lora: Annotated[Optional[str], typer.Option(
        help="LoRA folder, s3:// prefix or MLflow URI, e.g. models:/sonosynth-lora@champion.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Sampler actors (default: one per GPU).")] = None,
    address: Address = None,
    progress: Progress = None,
    set_: Overrides = None,
) -> None:
    """Sample synthetic image+mask pairs (or plane images) on Ray into WebDataset shards.

    Each sampler actor loads the base model and fuses the LoRA once; shards are published
    atomically with a completion record, so re-running the same command after a crash
    resumes with no duplicated and no missing sample. Joint-mode masks are extracted from
    the blue channel, filled and quality-checked; rejected samples are redrawn with derived
    seeds.

    Examples:

    \b
        sonosynth generate generate_tiny --lora runs/lora/model \\
            --num-samples 32 --out runs/syn
        sonosynth generate generate_joint_head \\
            --lora models:/sonosynth-lora@champion --num-samples 500 \\
            --out s3://bucket/synthetic --address auto
    """
    flags = {"out": out, "num_samples": num_samples, "workers": workers, "sampler": {"lora": lora},
             "ray": {"address": address}, "progress": progress}
    _run_stage("generate", recipe, flags, set_)


@app.command("train-sam")
def train_sam(
    recipe: RecipeArg,
    out: Out = None,
    dataset: Annotated[Optional[str], typer.Option(help="Real image+mask dataset (from `sonosynth ingest`).")] = None,
    synthetic: Annotated[Optional[str], typer.Option(
        help="Synthetic image+mask dataset (from `sonosynth generate`) mixed in.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Training workers (ranks): one per GPU.")] = None,
    address: Address = None,
    progress: Progress = None,
    set_: Overrides = None,
) -> None:
    """Fine-tune the Segment Anything Model on real and synthetic image+mask pairs.

    Modes: the mask decoder only (paper A), decoder plus LoRA on the image encoder's
    attention, or everything. Box prompts come from the mask after the paired augmentation,
    jittered; the best checkpoint by validation Dice is exported to OUT/model and registered
    in MLflow as sonosynth-sam. Re-running the same command resumes from the last checkpoint.

    Examples:

    \b
        sonosynth train-sam sam_tiny --dataset runs/hc18 --out runs/sam
        sonosynth train-sam sam_paper_a_synthetic --dataset runs/es \\
            --synthetic runs/syn --set model.checkpoint=/models/sam_vit_b.pth
    """
    flags = {"out": out, "data": {"sources": {"real": {"dataset": dataset}, "synthetic": {"dataset": synthetic}}},
             "engine": {"workers": workers, "progress": progress}, "ray": {"address": address}}
    _run_stage("train-sam", recipe, flags, set_)


@app.command("train-classifier")
def train_classifier(
    recipe: RecipeArg,
    out: Out = None,
    dataset: Annotated[Optional[str], typer.Option(help="Real plane dataset (from `sonosynth ingest`).")] = None,
    synthetic: Annotated[Optional[str], typer.Option(
        help="Synthetic plane dataset (class-mode `sonosynth generate`) mixed in.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Training workers (ranks): one per GPU.")] = None,
    address: Address = None,
    progress: Progress = None,
    set_: Overrides = None,
) -> None:
    """Train a fetal plane classifier on real and synthetic planes (FU-LoRA, corrected).

    Backbones from transformers (ResNet-18, MobileNetV2, EfficientNet-B0, ViT-B/16) or
    MONAI (DenseNet); one label map for the job; the paper's augmentation as a preset; the
    best checkpoint on the validation split is exported to OUT/model and registered in
    MLflow as sonosynth-classifier.

    Examples:

    \b
        sonosynth train-classifier classifier_tiny --dataset runs/africa \\
            --out runs/classifier
        sonosynth train-classifier classifier_hb --dataset runs/fpdb \\
            --synthetic runs/syn-planes --set model.backbone=resnet18
    """
    flags = {"out": out, "data": {"sources": {"real": {"dataset": dataset}, "synthetic": {"dataset": synthetic}}},
             "engine": {"workers": workers, "progress": progress}, "ray": {"address": address}}
    _run_stage("train-classifier", recipe, flags, set_)


@app.command()
def evaluate(
    recipe: Annotated[Optional[str], typer.Argument(
        metavar="RECIPE", help="Recipe or YAML path; optional (the flags are enough).")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset with ground-truth masks (from ingest).")] = None,
    predictions: Annotated[Optional[str], typer.Option(
        help="Folder (or s3:// prefix) of predicted mask PNGs named <sample key>.png.")] = None,
    model: Annotated[Optional[str], typer.Option(
        help="A trained model to score: folder, s3:// prefix or MLflow URI, e.g. "
             "models:/sonosynth-sam@champion or models:/sonosynth-classifier@champion.")] = None,
    base_checkpoint: Annotated[Optional[str], typer.Option(
        help="SAM: the base checkpoint (.pth) a decoder-only or LoRA model was trained from.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split to score (default test; 'all' for every sample).")] = None,
    out: Out = None,
    progress: Progress = None,
    set_: Overrides = None,
) -> None:
    """Score segmentation masks (or plane predictions) per image and per cohort.

    For every image with a ground-truth mask: Dice, IoU, HD95 (pixels, and mm when the
    pixel size is known) and the head-circumference error of the fitted ellipse, at native
    resolution and at 256 px, over K jittered box prompts. The box baseline (the ellipse
    inscribed in the prompt box) is scored the same way, so the figures show what a model
    learned beyond its prompt. OUT gets per_image.parquet and .csv, summary.json (dice_mean,
    box_baseline_dice_mean, ...), a Dice distribution plot and overlays of the worst cases.
    A classifier (--model models:/sonosynth-classifier@champion, or --set
    predictions_csv=FILE) is scored with accuracy, macro and weighted P/R/F1, one-vs-rest
    AUC, the confusion matrix and a per-centre breakdown.

    Example:

    \b
        sonosynth evaluate --dataset runs/hc18 --predictions runs/preds \\
            --out runs/eval
        sonosynth evaluate --dataset runs/hc18 \\
            --model models:/sonosynth-sam@champion --out runs/eval-sam
    """
    flags = {"dataset": dataset, "predictions": predictions, "model": model, "base_checkpoint": base_checkpoint,
             "out": out, "progress": progress,
             "split": None if split == "all" else split}
    if split == "all":  # a null flag means "not given", so "every split" goes in as an override
        set_ = ["split=null", *(set_ or [])]
    _run_stage("evaluate", recipe, flags, set_)


@app.command()
def sweep(
    recipe: RecipeArg,
    out: Out = None,
    set_: Overrides = None,
) -> None:
    """Run one stage over a grid of overrides, then write the results table from MLflow.

    The sweep recipe names the stage, its base recipe and the grid (each axis maps labels to
    overrides); every combination is a cell with its own output folder under OUT, run by the
    stage itself, so finished cells are skipped and a killed sweep resumes. With an evaluate
    section each cell's model is also scored. OUT gets results.csv and results.md (one row
    per cell, the metrics read back from the MLflow runs) and summary.json.

    Example:

    \b
        sonosynth sweep sam_paper_a_sweep --out s3://bucket/sweeps/paper-a
    """
    _run_stage("sweep", recipe, {"out": out}, set_)


@app.command()
def inspect(
    dataset: Annotated[str, typer.Argument(metavar="DATASET", help="Dataset folder or s3:// prefix.")],
    grid: Annotated[Optional[str], typer.Option(help="Write a PNG grid of samples with masks here.")] = None,
    samples: Annotated[int, typer.Option(help="Samples in the grid.")] = 16,
) -> None:
    """Read a dataset back: manifest counts checked against a full streamed read.

    Prints the counts as JSON and exits 1 when the shards and the manifest disagree.

    Example:

    \b
        sonosynth inspect runs/phantom --grid runs/phantom/grid.png
    """
    from sonosynth.datasets.summary import summarize

    try:
        summary = summarize(dataset, grid=grid, grid_samples=samples)
    except StorageError as err:
        _usage_error(err)
    typer.echo(json.dumps(summary, indent=2))
    if summary["samples_read"] != summary["samples_in_manifest"]:
        _failure(RuntimeError("shards and manifest disagree"))


@app.command("config")
def show_config(
    stage: Annotated[Optional[str], typer.Argument(
        metavar="STAGE", help="Stage whose config to explain (ingest, train-lora, generate).")] = None,
    recipes: Annotated[bool, typer.Option("--recipes", help="List the recipes that ship with sonosynth.")] = False,
) -> None:
    """List every field of a stage's config with its type, default and meaning.

    Examples:

    \b
        sonosynth config generate
        sonosynth config --recipes
    """
    from sonosynth.launch.recipes import recipe_names
    from sonosynth.launch.stages import STAGES, get_stage

    if recipes:
        typer.echo("\n".join(recipe_names()))
        return
    if stage is None:
        typer.echo("\n".join(f"{s.name:<12} {s.summary}" for s in STAGES.values()))
        return
    try:
        cls = get_stage(stage).config_class
    except ConfigError as err:
        _usage_error(err)
    typer.echo("\n".join(describe(cls)))


@app.command("tracking-replay")
def tracking_replay(
    folder: Annotated[str, typer.Argument(metavar="FOLDER", help="The job's tracking-offline folder.")],
    uri: Annotated[Optional[str], typer.Option(help="Tracking URI (default: $MLFLOW_TRACKING_URI).")] = None,
    experiment: Annotated[Optional[str], typer.Option(
        help="Send to this experiment instead of the one the records name.")] = None,
) -> None:
    """Send tracking records that a job could not deliver while MLflow was down.

    The run and experiment come from the records: a run created before the server went away
    gets the rest of its records; otherwise a run is created in the job's experiment.

    Example:

    \b
        sonosynth tracking-replay runs/lora/tracking-offline \\
            --uri http://mlflow:5000
    """
    from sonosynth.infra.tracking import TrackingConfig, replay

    try:
        run_id = replay(folder, TrackingConfig(uri=uri), experiment=experiment)
    except FileNotFoundError as err:
        _usage_error(err)
    except ConnectionError as err:
        _failure(err)
    typer.echo(f"delivered to run {run_id}")


from sonosynth.launch.cli.cluster import register as _register_cluster  # noqa: E402 - verbs defined there
from sonosynth.launch.cli.pipeline import register as _register_pipeline  # noqa: E402

_register_pipeline(app)
_register_cluster(app)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app(prog_name="sonosynth")


if __name__ == "__main__":
    sys.exit(main())
