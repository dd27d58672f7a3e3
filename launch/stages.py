"""The stage registry: every stage is declared here once, and only here.

A stage is one config class and one ``run(cfg) -> Report``, imported lazily (torch, Ray and
diffusers load only when a stage runs). Its entry also holds what the command line needs:
the help text with examples (written in ``stage_help.py``) and the flags, as data. ``sonosynth STAGE RECIPE [flags]
[--set k=v ...]`` is generated from the entry (``launch/cli/stage_verbs.py``), and
``sonosynth config``, ``submit``, ``k8s render``, the pipeline and the sweep find stages
here. Adding a stage is one module, its help text and one entry in ``STAGES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from sonosynth.infra.config import Config
from sonosynth.infra.stage import Report
from sonosynth.launch.stage_help import (
    EVALUATE_HELP, GENERATE_HELP, INGEST_HELP, PIPELINE_HELP, PROMOTE_HELP, QUALITY_HELP, SWEEP_HELP,
    TRAIN_CLASSIFIER_HELP, TRAIN_CONTROLNET_HELP, TRAIN_LORA_HELP, TRAIN_SAM_HELP,
)

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
    from sonosynth.launch.sweep.config import SweepConfig
    from sonosynth.launch.sweep.runner import run

    return SweepConfig, run


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
    Stage("sweep", "one stage over a grid of overrides and seeds; tables with intervals from MLflow", _sweep,
          SWEEP_HELP, (out_flag(), Flag("parallel", "parallel", "Runs at once: 1 (here, one after another), N "
                                         "(Ray tasks on the cluster) or auto (as many as the cluster holds).",
                                         metavar="N|auto"), ADDRESS)),
)}


def get_stage(name: str) -> Stage:
    from sonosynth.infra.config import ConfigError

    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return STAGES[name]
