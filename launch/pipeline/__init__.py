"""``sonosynth pipeline``: the stages as one nightly run, each skipped when its output exists.

A pipeline recipe names its stages in order under ``stages:``; each section is one stage's
recipe fragment plus three pipeline fields:

- ``stage``: the stage it runs (``ingest``, ``train-lora``, ``generate``, ``train-sam``,
  ``train-classifier``, ``evaluate``, ``promote``, ...; ``sonosynth config`` lists them);
- ``recipe`` (optional): a shipped recipe or YAML path underneath the section's fields
  (defaults < recipe < section < ``--set``);
- ``if_exists`` (optional): run the section only when this path exists (e.g. real samples).

Inputs are wired with expressions: ``${SECTION.out}`` (that section's output folder),
``${SECTION.outputs.NAME}``, ``${SECTION.tracking.version}`` and any other field of its
report (``Report``: ``outputs``, ``figures``, ``tracking``), ``${SECTION.key}``; and the
built-ins ``${out}`` (the pipeline's folder), ``${shared_data}`` ($SONOSYNTH_SHARED_DATA,
else ``../shared/data`` beside the checkout) and ``${env:NAME}`` / ``${env:NAME|default}``.
A section may refer only to sections above it. When a referenced section is not run (its
``if_exists`` path is missing), the mapping holding the reference is left out of its parent
(e.g. one source of a training mix), a list item holding it is left out, and a section
that refers to it by a top-level field is not run either.

Every section writes to ``OUT/<section>/<key>``. The key is a hash of the stage and its
resolved config (defaults filled in, minus ``out``, ``tracking``, ``progress``, ``ray``,
``storage``, ``workers``), where every reference to another section stands for that
section's key, so a change upstream changes every key downstream. A stage that reads data
from outside (an ingest's source folder or ``s3://`` prefix) adds its source's fingerprint
(``datasets/source.py``: names, sizes, ETags or modification times) to its key, so new,
changed or removed source files re-run it and everything after it. A section whose folder
holds ``_PIPELINE_DONE.json`` (its report, written after it succeeded) is skipped: a killed
or failed pipeline resumes where it stopped (the interrupted stage resumes itself), a
re-run with nothing changed does nothing, and changing one section re-runs it and the
sections that depend on it only. ``from_stage`` re-runs a section and every later one,
``only`` one section (their old folders are set aside under ``OUT/<section>/_replaced/``).

A quality section (``stage: quality``) scores the output its ``synthetic.dataset`` names and
reports a gate; when the gate fails, the sections after it that read that output (the synthetic
arm) are gated (``on_fail: skip_synthetic``: not run, recorded with the decision) or train
without their synthetic ``data.sources`` (``train_without``; ``gate.py``). A resumed run reads
the stored gate back and decides the same.

One pipeline at a time writes OUT: the run takes a lease (``infra/lease.py``) on
``OUT/_pipeline/lease.json`` and renews it while it runs; a second run into the same OUT
exits 1 naming the holder, and the lease of a run that died expires after ``lease.ttl_s``.

One MLflow run (experiment ``tracking.experiment``, default ``sonosynth-pipeline``) is the
parent of one nested run per stage that ran; every stage is tracked in the pipeline's store.
A resumed pipeline reopens its parent run. The lineage table (section, stage, status, key,
inputs, outputs, MLflow run, model version) goes to ``lineage.csv``, ``lineage.md``,
``pipeline.json`` and ``report.html`` in OUT, and to the parent run. A failing stage marks
its nested run and the parent FAILED and raises ``PipelineFailed`` (one line: the stage,
the error, how to resume). With the tracking server down the pipeline goes on (each
tracker keeps its records in a ``tracking-offline`` folder); the next pipeline run that
reaches the server replays them, nested under their parent run.
"""
from sonosynth.launch.pipeline.config import (
    LeaseConfig, PipelineConfig, PipelineFailed, PipelineReportConfig, resolve_pipeline,
)
from sonosynth.launch.pipeline.expressions import shared_data_dir
from sonosynth.launch.pipeline.plan import Step, pipeline_key, plan
from sonosynth.launch.pipeline.runner import Run, run

__all__ = ["LeaseConfig", "PipelineConfig", "PipelineFailed", "PipelineReportConfig", "Run", "Step", "pipeline_key",
           "plan", "resolve_pipeline", "run", "shared_data_dir"]
