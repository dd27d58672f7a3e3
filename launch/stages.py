"""The stage registry: every stage is one config class and one ``run(cfg) -> Report``.

The CLI verbs, ``sonosynth config STAGE``, ``sonosynth demo`` and the pipeline find stages
here. Stages import lazily (torch, Ray and diffusers load only when a stage runs), and
``tests/unit/launch/test_stages.py`` resolves every entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sonosynth.infra.config import Config
from sonosynth.infra.stage import Report


@dataclass(frozen=True)
class Stage:
    name: str
    """The CLI verb, e.g. ``train-lora``."""
    summary: str
    """One line for listings."""
    load: Callable[[], tuple[type[Config], Callable[[Any], Report]]]
    """Imports the stage: (config class, run function)."""

    @property
    def config_class(self) -> type[Config]:
        return self.load()[0]

    def run(self, cfg: Config) -> Report:
        return self.load()[1](cfg)


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


def _ingest():
    from sonosynth.datasets.ingest import IngestConfig, run

    return IngestConfig, run


def _train_lora():
    from sonosynth.trainers.diffusion.train import LoraTrainConfig
    from sonosynth.trainers.launcher import train

    return LoraTrainConfig, lambda cfg: training_report("train-lora", train(cfg))


def _train_sam():
    from sonosynth.trainers.launcher import train
    from sonosynth.trainers.sam.train import SamTrainConfig

    return SamTrainConfig, lambda cfg: training_report("train-sam", train(cfg))


def _train_classifier():
    from sonosynth.trainers.classifier.train import ClassifierTrainConfig
    from sonosynth.trainers.launcher import train

    return ClassifierTrainConfig, lambda cfg: training_report("train-classifier", train(cfg))


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


def _sweep():
    from sonosynth.launch.pipeline.sweep import SweepConfig, run

    return SweepConfig, run


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", "a real cohort (or the phantom) -> WebDataset shards + manifest", _ingest),
    Stage("train-lora", "a Stable Diffusion LoRA (joint image+mask, or one caption per plane)", _train_lora),
    Stage("generate", "synthetic image+mask pairs (or plane images) from a LoRA, on Ray", _generate),
    Stage("train-sam", "fine-tune SAM on a mix of real and synthetic image+mask pairs", _train_sam),
    Stage("train-classifier", "a fetal plane classifier on real + synthetic planes (FU-LoRA, corrected)",
          _train_classifier),
    Stage("evaluate", "score segmentation masks (or plane predictions) per image and per cohort", _evaluate),
    Stage("promote", "score a new model version against the champion; move the champion alias", _promote),
    Stage("pipeline", "the stages of a pipeline recipe in order, each skipped when already done", _pipeline),
    Stage("sweep", "one stage over a grid of overrides; the results table read back from MLflow", _sweep),
)}


def get_stage(name: str) -> Stage:
    from sonosynth.infra.config import ConfigError

    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    return STAGES[name]
