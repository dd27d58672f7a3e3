"""The stage registry: every stage is declared here once, and only here.

A stage is one config class and one ``run(cfg) -> Report``, imported lazily (torch, Ray and
diffusers load only when a stage runs). Its entry also holds what the command line needs:
the help text with examples and the flags, as data. ``sonosynth STAGE RECIPE [flags]
[--set k=v ...]`` is generated from the entry (``launch/cli/stage_verbs.py``), and
``sonosynth config``, ``submit``, ``k8s render``, the pipeline and the sweep find stages
here. Adding a stage is one module and one entry in ``STAGES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from sonosynth.infra.config import Config
from sonosynth.infra.stage import Report

RECIPE_HELP = "Recipe: a name in configs/ (see `sonosynth config --recipes`) or a YAML path."
SET_HELP = ("Override any config field, e.g. --set engine.max_steps=500 (repeatable; `sonosynth config "
            "STAGE` lists the fields).")


@dataclass(frozen=True)
class Flag:
    """A command-line option of a stage verb: ``--NAME VALUE`` sets the config field ``field``.

    Flags sit between the recipe and ``--set`` (defaults < recipe < flags < --set); a flag
    that is not given leaves the field to the recipe.
    """

    name: str
    """The option without its dashes, e.g. ``num-samples``."""
    field: str
    """The dotted config field it sets, e.g. ``cohort.phantom.num``."""
    help: str
    type: type = str
    """str, int, float or bool (a bool is ``--NAME/--no-NAME`` unless ``switch``)."""
    switch: bool = False
    """A bool set to true by ``--NAME``; absent means "not given", never false."""
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    null_word: str | None = None
    """This value sets the field to null (``--split all``), since a missing flag means "not given"."""


def out_flag(help: str = "Output folder or s3://bucket/prefix.") -> Flag:
    return Flag("out", "out", help)


def progress_flag(field: str = "progress", help: str = "Show a progress bar.") -> Flag:
    return Flag("progress", field, help, bool)


ADDRESS = Flag("address", "ray.address", "Ray cluster to join, e.g. ray://head:10001 or auto (default: "
               "$RAY_ADDRESS, else a local Ray).")
TRAINING_WORKERS = Flag("workers", "engine.workers", "Training workers (ranks): one per GPU.", int)


@dataclass(frozen=True)
class Stage:
    name: str
    """The CLI verb, e.g. ``train-lora``."""
    summary: str
    """One line for listings."""
    load: Callable[[], tuple[type[Config], Callable[[Any], Report]]]
    """Imports the stage: (config class, run function)."""
    help: str = ""
    """The verb's --help: a first line, paragraphs, and ``Example:`` with command lines."""
    flags: tuple[Flag, ...] = ()
    recipe_optional: bool = False
    """The verb runs from its flags alone (``sonosynth evaluate --dataset ...``)."""
    recipe_help: str = RECIPE_HELP
    set_help: str = SET_HELP
    resolver: Callable[[str | None, dict[str, Any], list[str]], Config] | None = None
    """(recipe, flags, overrides) -> config, for a stage whose recipe is not one config (the pipeline)."""
    render: Callable[[Report], str] = Report.render
    """What the verb prints when the stage is done."""

    @property
    def config_class(self) -> type[Config]:
        return self.load()[0]

    def run(self, cfg: Config) -> Report:
        return self.load()[1](cfg)

    def resolve(self, recipe: str | None, flags: dict[str, Any], overrides: Iterable[str] = ()) -> Config:
        """defaults < recipe < flags (a nested mapping of config fields) < --set overrides."""
        if self.resolver is not None:
            return self.resolver(recipe, flags, list(overrides))
        from sonosynth.launch.recipes import resolve

        return resolve(self.config_class, recipe, flags, overrides)


def training_report(stage: str, summary: dict[str, Any]) -> Report:
    """A training job's summary.json as a Report (every training stage shares this)."""
    ev0, ev1 = summary.get("eval_start", {}), summary.get("eval_end", {})
    lines = []
    if summary.get("already_complete"):
        lines.append("this job had already finished; nothing was retrained")
    lines.append(f"trained {summary['steps']} steps on {summary['examples']} examples with "
                 f"{summary['workers']} workers")
    lines += [f"  {name}: {ev0[name]:.4f} -> {ev1[name]:.4f}" for name in sorted(set(ev0) & set(ev1))]
    best = summary.get("best") or {}
    if best.get("metric"):
        lines.append(f"  best {best['metric']} = {best['value']:.4f} at step {best['step']} (exported)")
    ml = summary.get("mlflow") or {}
    if ml.get("offline"):
        lines.append("warning: MLflow was unreachable; see tracking-offline/ and `sonosynth tracking-replay`")
    out = summary["model"].rsplit("/model", 1)[0]
    return Report(stage=stage, out=out, text="\n".join(lines),
                  figures={k: v for k, v in summary.items() if k not in ("mlflow", "lineage")},
                  outputs={"model": summary["model"]}, tracking=ml)


def _training(cls: type[Config]) -> tuple[type[Config], Callable[[Any], Report]]:
    """A training stage: its config class, run on Ray Train by the shared launcher."""
    from sonosynth.trainers.launcher import train

    return cls, lambda cfg: training_report(cls.stage, train(cfg))


def _ingest():
    from sonosynth.datasets.ingest import IngestConfig, run

    return IngestConfig, run


def _train_lora():
    from sonosynth.trainers.diffusion.train import LoraTrainConfig

    return _training(LoraTrainConfig)


def _train_sam():
    from sonosynth.trainers.sam.train import SamTrainConfig

    return _training(SamTrainConfig)


def _train_classifier():
    from sonosynth.trainers.classifier.train import ClassifierTrainConfig

    return _training(ClassifierTrainConfig)


def _train_controlnet():
    from sonosynth.trainers.controlnet.train import ControlNetTrainConfig

    return _training(ControlNetTrainConfig)


def _quality():
    from sonosynth.launch.quality.stage import QualityConfig, run

    return QualityConfig, run


def _generate():
    from sonosynth.launch.generate.config import GenerateConfig
    from sonosynth.launch.generate.driver import run

    return GenerateConfig, run


def _evaluate():
    from sonosynth.launch.evaluate.segmentation import EvaluateConfig, run

    return EvaluateConfig, run


def _promote():
    from sonosynth.launch.promote import PromoteConfig, run

    return PromoteConfig, run


def _pipeline():
    from sonosynth.launch.pipeline import PipelineConfig, run

    return PipelineConfig, run


def _resolve_pipeline(recipe: str | None, flags: dict[str, Any], overrides: list[str]) -> Config:
    from sonosynth.launch.pipeline import resolve_pipeline

    return resolve_pipeline(recipe or "", flags, overrides)


def _pipeline_summary(report: Report) -> str:
    """A blank line after the stages' own output; the text already names the outputs and the run."""
    return "\n" + report.text


def _sweep():
    from sonosynth.launch.pipeline.sweep import SweepConfig, run

    return SweepConfig, run


# -- the verbs' help ------------------------------------------------------------------------

INGEST_HELP = """Read a real cohort (or the phantom) into a sonosynth dataset.

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

TRAIN_LORA_HELP = """Fine-tune a Stable Diffusion LoRA with DeepSpeed on Ray Train, tracked in MLflow.

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

TRAIN_CONTROLNET_HELP = """Train a ControlNet that draws a fetal head image for a given head mask.

A diffusers ControlNetModel, initialised from the base UNet (optionally with a trained LoRA
fused in), learns to follow the filled head mask; the base model stays frozen. Training runs
on the shared engine (Ray Train + DeepSpeed), resumes from the last checkpoint in OUT, and
exports OUT/model in the diffusers format (ControlNetModel.from_pretrained and
StableDiffusionControlNetPipeline load it unchanged), registered in MLflow as
sonosynth-controlnet. `sonosynth generate --mode mask` samples with it.

Examples:

\b
    sonosynth train-controlnet controlnet_tiny --dataset runs/ph --out runs/cn
    sonosynth train-controlnet controlnet_head --dataset runs/hc18 \\
        --set model.pretrained=/models/sd15
"""

QUALITY_HELP = """Score a synthetic set against real data before anything trains on it.

Feature-space distances between real and synthetic images (FID, KID, precision/recall,
density/coverage) beside a real-vs-real baseline of the same size, each with a bootstrap
interval; label fidelity of image+mask pairs (a segmenter prompted with the box of each
pair's own mask, Dice against that mask, the same on real pairs as the reference) and the
mask-shape statistics of both sets. OUT gets summary.json, per_image.parquet, a t-SNE plot
of the features and overlays of the worst pairs; a gate in the recipe passes or stops the
synthetic arm of a pipeline.

Examples:

\b
    sonosynth quality quality_tiny --real runs/ph --synthetic runs/syn \\
        --out runs/quality
    sonosynth quality quality_head --real s3://bucket/hc18 \\
        --synthetic s3://bucket/synthetic --segmenter models:/sonosynth-sam@champion
"""

GENERATE_HELP = """Sample synthetic image+mask pairs (or plane images) on Ray into WebDataset shards.

Each sampler actor loads the base model and fuses the LoRA once; shards are published
atomically with a completion record, so re-running the same command after a crash
resumes with no duplicated and no missing sample. Joint-mode masks are extracted from
the blue channel, filled and quality-checked; rejected samples are redrawn with derived
seeds.
In mask mode a ControlNet (`sonosynth train-controlnet`) draws an image for each mask
drawn from a head-shape model fitted on real masks (or from the real masks, augmented),
and the sample's mask is that mask exactly.

Examples:

\b
    sonosynth generate generate_tiny --lora runs/lora/model \\
        --num-samples 32 --out runs/syn
    sonosynth generate generate_joint_head \\
        --lora models:/sonosynth-lora@champion --num-samples 500 \\
        --out s3://bucket/synthetic --address auto
    sonosynth generate generate_mask_tiny --controlnet runs/cn/model \\
        --num-samples 32 --out runs/syn-mask
"""

TRAIN_SAM_HELP = """Fine-tune the Segment Anything Model on real and synthetic image+mask pairs.

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

TRAIN_CLASSIFIER_HELP = """Train a fetal plane classifier on real and synthetic planes (FU-LoRA, corrected).

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

EVALUATE_HELP = """Score segmentation masks (or plane predictions) per image and per cohort.

For every image with a ground-truth mask: Dice, IoU, HD95 (pixels, and mm when the
pixel size is known) and the head-circumference error of the fitted ellipse, at native
resolution and at 256 px, over K jittered box prompts. The box baseline (the ellipse
inscribed in the prompt box) is scored the same way, so the figures show what a model
learned beyond its prompt. OUT gets per_image.parquet and .csv, summary.json (dice_mean,
box_baseline_dice_mean, ...), a Dice distribution plot and overlays of the worst cases.
A classifier (--model models:/sonosynth-classifier@champion, or --set
predictions_csv=FILE) is scored with accuracy, macro and weighted P/R/F1, one-vs-rest
AUC, the confusion matrix and a per-centre breakdown.

Examples:

\b
    sonosynth evaluate --dataset runs/hc18 --predictions runs/preds \\
        --out runs/eval
    sonosynth evaluate --dataset runs/hc18 \\
        --model models:/sonosynth-sam@champion --out runs/eval-sam
"""

PROMOTE_HELP = """Score a new model version against the champion; promote it if it wins.

The version gets the alias challenger. It and the champion are scored by the same
evaluation stage on the recipe's fixed evaluation set (same datasets, split, seed and box
draws), and the recipe's rules decide: the challenger becomes champion only if it beats
the champion, and the first version of a model becomes champion. The decision and both
sets of figures are written as tags on the version, in the promote run in MLflow and in
OUT/decision.json. `sonosynth champion` sets, shows or rolls back the champion by hand.

Example:

\b
    sonosynth promote promote_sam.yaml --model sonosynth-sam --version 7 \\
        --tracking-uri http://mlflow:5000
"""

PIPELINE_HELP = """Run the stages of a pipeline recipe in order, skipping those already done.

Each section of the recipe runs one stage (`sonosynth config` lists them) and writes to
OUT/SECTION/KEY, where the key hashes the stage's config and its inputs' keys. A section whose output is
finished is skipped, so a killed or failed pipeline resumes where it stopped, and
changing one section re-runs it and what depends on it. One MLflow run holds a nested
run per stage. OUT gets report.html (synthetic pairs, Dice before/after synthetic data,
the promotion decision, the lineage), lineage.csv and lineage.md, and pipeline.json.

Examples:

\b
    sonosynth pipeline demo --out runs/demo
    sonosynth pipeline demo --out runs/demo --from sam_synthetic
    sonosynth pipeline demo --set lora.engine.max_steps=20
"""

SWEEP_HELP = """Run one stage over a grid of overrides, then write the results table from MLflow.

The sweep recipe names the stage, its base recipe and the grid (each axis maps labels to
overrides); every combination is a cell with its own output folder under OUT, run by the
stage itself, so finished cells are skipped and a killed sweep resumes. With an evaluate
section each cell's model is also scored. OUT gets results.csv and results.md (one row
per cell, the metrics read back from the MLflow runs) and summary.json.

Example:

\b
    sonosynth sweep sam_paper_a_sweep --out s3://bucket/sweeps/paper-a
"""

# -- the registry ---------------------------------------------------------------------------

PIPELINE = "pipeline"
"""The stage ``sonosynth demo`` runs."""

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", "a real cohort (or the phantom) -> WebDataset shards + manifest", _ingest, INGEST_HELP, (
        Flag("cohort", "cohort.name", "Cohort adapter.", choices=("hc18", "fpdb", "africa", "folder", "phantom")),
        Flag("src", "cohort.src", "Folder holding the cohort's images."),
        Flag("index", "cohort.index", "The cohort's index CSV (fpdb, africa; hc18 pixel sizes; folder labels)."),
        out_flag(),
        Flag("num-samples", "cohort.phantom.num", "Phantom samples to draw (--cohort phantom).", int),
        Flag("workers", "workers", "Processes building shards in parallel.", int),
        Flag("strict", "strict", "Exit 1 if any input is quarantined.", bool, switch=True),
        progress_flag(),
    ), recipe_optional=True, recipe_help="Recipe (e.g. ingest_hc18, ingest_fpdb) or a YAML path; optional."),
    Stage("train-lora", "a Stable Diffusion LoRA (joint image+mask, or one caption per plane)",
          _train_lora, TRAIN_LORA_HELP, (
              out_flag(),
              Flag("dataset", "data.dataset", "Training dataset (from `sonosynth ingest`)."),
              TRAINING_WORKERS, ADDRESS, progress_flag("engine.progress"))),
    Stage("train-controlnet", "a ControlNet that generates an image for a given head mask",
          _train_controlnet, TRAIN_CONTROLNET_HELP, (
              out_flag(),
              Flag("dataset", "data.dataset", "Training image+mask dataset (from `sonosynth ingest`)."),
              Flag("lora", "lora", "A trained LoRA fused into the base UNet first (folder, s3:// or MLflow URI)."),
              TRAINING_WORKERS, ADDRESS, progress_flag("engine.progress"))),
    Stage("generate", "synthetic image+mask pairs (or plane images) from a LoRA, on Ray", _generate,
          GENERATE_HELP, (
              out_flag(),
              Flag("num-samples", "num_samples", "Accepted samples to deliver.", int),
              Flag("lora", "sampler.lora", "LoRA folder, s3:// prefix or MLflow URI, e.g. "
                                           "models:/sonosynth-lora@champion."),
              Flag("mode", "mode", "joint (image+mask), class (plane images) or mask (an image drawn for each "
                                   "given mask; needs --controlnet). Default: mask when --controlnet is given, "
                                   "else the LoRA's training mode.",
                   choices=("joint", "class", "mask")),
              Flag("controlnet", "sampler.controlnet", "Mask mode: the ControlNet folder, s3:// prefix or MLflow "
                                                       "URI, e.g. models:/sonosynth-controlnet@champion."),
              Flag("workers", "workers", "Sampler actors (default: one per GPU).", int),
              ADDRESS, progress_flag())),
    Stage("train-sam", "fine-tune SAM on a mix of real and synthetic image+mask pairs",
          _train_sam, TRAIN_SAM_HELP, (
              out_flag(),
              Flag("dataset", "data.sources.real.dataset", "Real image+mask dataset (from `sonosynth ingest`)."),
              Flag("synthetic", "data.sources.synthetic.dataset",
                   "Synthetic image+mask dataset (from `sonosynth generate`) mixed in."),
              TRAINING_WORKERS, ADDRESS, progress_flag("engine.progress"))),
    Stage("train-classifier", "a fetal plane classifier on real + synthetic planes (FU-LoRA, corrected)",
          _train_classifier, TRAIN_CLASSIFIER_HELP, (
              out_flag(),
              Flag("dataset", "data.sources.real.dataset", "Real plane dataset (from `sonosynth ingest`)."),
              Flag("synthetic", "data.sources.synthetic.dataset",
                   "Synthetic plane dataset (class-mode `sonosynth generate`) mixed in."),
              TRAINING_WORKERS, ADDRESS, progress_flag("engine.progress"))),
    Stage("quality", "FID/KID/precision-recall and label fidelity of a synthetic set vs real data", _quality,
          QUALITY_HELP, (
              Flag("real", "real.dataset", "Real dataset (from `sonosynth ingest`)."),
              Flag("synthetic", "synthetic.dataset", "Synthetic dataset (from `sonosynth generate`)."),
              Flag("segmenter", "fidelity.model", "Segmenter for label fidelity: folder, s3:// or MLflow URI, "
                                                  "e.g. models:/sonosynth-sam@champion."),
              out_flag(), progress_flag(),
          )),
    Stage("evaluate", "score segmentation masks (or plane predictions) per image and per cohort", _evaluate,
          EVALUATE_HELP, (
              Flag("dataset", "dataset", "Dataset with ground-truth masks (from ingest)."),
              Flag("predictions", "predictions",
                   "Folder (or s3:// prefix) of predicted mask PNGs named <sample key>.png."),
              Flag("model", "model", "A trained model to score: folder, s3:// prefix or MLflow URI, e.g. "
                                     "models:/sonosynth-sam@champion or models:/sonosynth-classifier@champion."),
              Flag("base-checkpoint", "base_checkpoint",
                   "SAM: the base checkpoint (.pth) a decoder-only or LoRA model was trained from."),
              Flag("split", "split", "Split to score (default test; 'all' for every sample).", null_word="all"),
              out_flag(), progress_flag(),
          ), recipe_optional=True, recipe_help="Recipe or YAML path; optional (the flags are enough)."),
    Stage("promote", "score a new model version against the champion; move the champion alias", _promote,
          PROMOTE_HELP, (
              Flag("model", "model", "Registered model, e.g. sonosynth-sam."),
              Flag("version", "version", "The challenger's version (default: the model's latest)."),
              Flag("tracking-uri", "tracking.uri", "MLflow server or store holding the registry (default: "
                                                   "$MLFLOW_TRACKING_URI)."),
              out_flag("Folder or s3:// prefix for decision.json and both evaluations."),
              progress_flag(help="Show the evaluations' progress bars."))),
    Stage(PIPELINE, "the stages of a pipeline recipe in order, each skipped when already done", _pipeline,
          PIPELINE_HELP, (
              out_flag("Output folder or s3://bucket/prefix of every stage, the report and the lineage."),
              Flag("from", "from_stage", "Re-run this section and every later one (the earlier ones must have "
                                         "finished).", metavar="SECTION"),
              Flag("only", "only", "Re-run this section alone (what it reads must have finished).",
                   metavar="SECTION"),
              Flag("tracking-uri", "tracking.uri", "MLflow server or store of every stage (default: "
                                                   "$MLFLOW_TRACKING_URI, else OUT/mlflow.db)."),
              progress_flag(help="Show the stages' progress bars."),
          ), recipe_help="Pipeline recipe: a name in configs/ (e.g. demo) or a YAML path.",
          set_help="Override any field: SECTION.key=value for a stage (e.g. lora.engine.max_steps=20), or a "
                   "pipeline field (repeatable).", resolver=_resolve_pipeline, render=_pipeline_summary),
    Stage("sweep", "one stage over a grid of overrides; the results table read back from MLflow", _sweep,
          SWEEP_HELP, (out_flag(),)),
)}


def get_stage(name: str) -> Stage:
    from sonosynth.infra.config import ConfigError

    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return STAGES[name]
