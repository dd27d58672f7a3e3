"""What a registered model version was trained from, traced back to the LoRA that drew its synthetic data.

The trail, from what the stages record:

- a SAM or classifier version's ``lineage.json`` (the engine exports it in ``model/``) names its
  training sources: ``sources`` (SAM) or ``data.sources`` (classifier), each ``{dataset, split, ...}``,
  and its ``base_model``;
- a source whose folder holds ``job.json`` of stage ``generate`` is a synthetic set; its
  ``config.yaml`` names the LoRA it sampled with (``sampler.lora``: a folder, an s3:// prefix or a
  models:/ or runs:/ URI);
- a LoRA folder exported by train-lora (``OUT/model``) sits beside ``summary.json``, whose
  ``mlflow.run_id`` is the run that registered it: the registry's version with that ``run_id`` is
  the LoRA version (else the version summary.json or tracking.json recorded).

``trace`` follows it; ``Lineage.tags`` is what it found as ``sonosynth.lineage.*`` model-version
tags (what ``sonosynth champion show`` prints). Moving the LoRA's champion is ``champions.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from sonosynth.infra.jobdir import CONFIG_FILE, JOB_RECORD
from sonosynth.infra.model_registry import Registry
from sonosynth.infra.storage import StorageConfig, open_storage

TAG = "sonosynth.lineage."
SEPARATOR = "; "
NONE, UNKNOWN = "none", "unknown"
SUMMARY, TRACKING_RECORD = "summary.json", "tracking.json"
"""What a training stage writes beside its model/ folder (``sonosynth.trainers.engine``)."""


@dataclass
class SyntheticSet:
    """One synthetic source of a training mix and the LoRA it was drawn with."""

    source: str
    """The source's name in the training mix (e.g. synthetic)."""
    dataset: str
    lora: str | None = None
    """The LoRA as generate was given it; None: drawn without one (e.g. a ControlNet alone)."""
    lora_model: str | None = None
    lora_version: str | None = None
    note: str = ""
    """How the LoRA version was found, or why it was not."""

    @property
    def lora_ref(self) -> str | None:
        return f"{self.lora_model}/{self.lora_version}" if self.lora_model and self.lora_version else None


@dataclass
class Lineage:
    """A model version's training sources, its synthetic sets and their LoRAs, its base model."""

    model: str
    version: str
    base_model: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    """{source name: dataset} of the training mix."""
    synthetic: list[SyntheticSet] = field(default_factory=list)
    error: str | None = None
    """Why the lineage could not be read (nothing else is known then)."""

    @property
    def loras(self) -> list[tuple[str, str]]:
        """The distinct registered LoRA versions (model, version) its synthetic sets were drawn with."""
        found = {(s.lora_model, s.lora_version) for s in self.synthetic if s.lora_ref}
        return sorted((str(m), str(v)) for m, v in found)

    def tags(self) -> dict[str, str]:
        """The lineage as ``sonosynth.lineage.*`` model-version tags."""
        if self.error:
            return {f"{TAG}error": self.error[:4900]}
        unresolved = [s for s in self.synthetic if s.lora and not s.lora_ref]
        loras = [f"{m}/{v}" for m, v in self.loras] + [f"{UNKNOWN} ({s.lora}: {s.note})" for s in unresolved]
        return {f"{TAG}sources": SEPARATOR.join(f"{k}={v}" for k, v in self.sources.items())[:4900] or NONE,
                f"{TAG}synthetic": SEPARATOR.join(s.dataset for s in self.synthetic)[:4900] or NONE,
                f"{TAG}lora": SEPARATOR.join(loras)[:4900] or NONE,
                f"{TAG}base_model": self.base_model or UNKNOWN}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loras": [f"{m}/{v}" for m, v in self.loras]}


def parse_ref(ref: str | None) -> tuple[str, str] | None:
    """``sonosynth-lora/3`` as (model, version); None for anything else (none, unknown, several)."""
    if not ref or SEPARATOR.strip() in ref or " " in ref or "/" not in ref:
        return None
    model, _, version = ref.rpartition("/")
    return (model, version) if model and version.isdigit() else None


def trace(registry: Registry, model: str, version: str, storage: StorageConfig | None = None) -> Lineage:
    """Follow ``model`` version ``version``'s lineage.json to its synthetic sets and their LoRA versions.
    What cannot be read is said in ``error`` (the whole lineage) or a set's ``note``, never raised."""
    try:
        record = version_lineage(registry, model, version)
    except Exception as err:  # noqa: BLE001 - MLflow and the artifact stores raise many kinds
        return Lineage(model, version, error=f"cannot read lineage.json of {model} version {version}: {_first(err)}")
    sources = record.get("sources") or (record.get("data") or {}).get("sources") or {}
    if not sources and isinstance(record.get("dataset"), str):  # a LoRA or ControlNet: one dataset
        sources = {"data": {"dataset": record["dataset"]}}
    lineage = Lineage(model, version, base_model=record.get("base_model"),
                      sources={name: str(s.get("dataset")) for name, s in sources.items() if isinstance(s, dict)})
    for name, dataset in lineage.sources.items():
        found = synthetic_set(registry, name, dataset, storage)
        if found is not None:
            lineage.synthetic.append(found)
    return lineage


def version_lineage(registry: Registry, model: str, version: str) -> dict[str, Any]:
    """The lineage.json of a registered version's model folder."""
    import mlflow

    source = registry.client.get_model_version_download_uri(model, version)
    with tempfile.TemporaryDirectory(prefix="sonosynth-lineage-") as tmp, _no_download_bar():
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/lineage.json", dst_path=tmp,
                                                   tracking_uri=registry.uri)
        record = json.loads(Path(path).read_text())
    if not isinstance(record, dict):
        raise ValueError("lineage.json is not a JSON object")
    return record


def synthetic_set(registry: Registry, name: str, dataset: str, storage: StorageConfig | None = None
                  ) -> SyntheticSet | None:
    """The set and its LoRA when ``dataset`` was written by generate; None for any other dataset."""
    try:
        store = open_storage(dataset, storage)
        if not store.exists(JOB_RECORD) or json.loads(store.get_text(JOB_RECORD)).get("stage") != "generate":
            return None
        config = yaml.safe_load(store.get_text(CONFIG_FILE)) if store.exists(CONFIG_FILE) else {}
    except Exception as err:  # noqa: BLE001 - an unreadable folder is said, not raised
        return SyntheticSet(name, dataset, note=f"cannot read {dataset} ({_first(err)})")
    sampler = (config or {}).get("sampler") or {}
    lora = sampler.get("lora")
    if not lora:
        how = f"a ControlNet ({sampler['controlnet']})" if sampler.get("controlnet") else "the base model"
        return SyntheticSet(name, dataset, note=f"drawn without a LoRA, by {how}")
    try:
        model, version, note = lora_version(registry, str(lora), storage)
    except Exception as err:  # noqa: BLE001 - the registry refused the lookup: said, not raised
        model, version, note = None, None, f"cannot look up {lora} ({_first(err)})"
    return SyntheticSet(name, dataset, str(lora), model, version, note)


def lora_version(registry: Registry, uri: str, storage: StorageConfig | None = None
                 ) -> tuple[str | None, str | None, str]:
    """(registered model, version, how it was found) of the LoRA generate was given as ``uri``."""
    if uri.startswith("models:/"):
        head, _, rest = uri.removeprefix("models:/").partition("/")
        if "@" in head:
            model, alias = head.split("@", 1)
            version = registry.alias(model, alias)
            return model, version, (f"{uri}: the version holding {alias} at promotion" if version
                                    else f"{model} has no alias {alias} now")
        ref = rest.split("/")[0]
        if ref == "latest":
            return head, registry.latest(head), f"{uri}: the latest version at promotion"
        return head, ref, uri
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/")[0]
        found = _version_of_run(registry, run_id, None)
        return (*found, f"registered from run {run_id}") if found else (None, None, f"no version of run {run_id}")
    root = uri.rstrip("/")
    for folder in (root.rsplit("/", 1)[0] if "/" in root else ".", root):  # the stage folder, then the folder
        try:
            store = open_storage(folder, storage)
            if not store.exists(SUMMARY):
                continue
            mlflow_record = json.loads(store.get_text(SUMMARY)).get("mlflow") or {}
            tracked = json.loads(store.get_text(TRACKING_RECORD)) if store.exists(TRACKING_RECORD) else {}
        except Exception as err:  # noqa: BLE001
            return None, None, f"cannot read {folder}/{SUMMARY} ({_first(err)})"
        name = mlflow_record.get("registered_model") or tracked.get("registered_model")
        run_id = mlflow_record.get("run_id")
        found = _version_of_run(registry, run_id, name) if run_id else None
        if found:
            return (*found, f"registered from run {run_id} ({folder}/{SUMMARY})")
        version = mlflow_record.get("version") or tracked.get("model_version")
        if name and version:
            return name, str(version), f"recorded in {folder}"
        return None, None, f"{folder}/{SUMMARY} names no registered version (the LoRA was not registered)"
    return None, None, f"no {SUMMARY} beside {uri}: not a train-lora output, so its registered version is unknown"


def _version_of_run(registry: Registry, run_id: str, model: str | None) -> tuple[str, str] | None:
    versions = registry.client.search_model_versions(f"run_id = '{run_id}'")
    mine = [v for v in versions if model is None or v.name == model] or versions
    if not mine:
        return None
    best = max(mine, key=lambda v: int(v.version))
    return str(best.name), str(best.version)


@contextmanager
def _no_download_bar() -> Iterator[None]:
    """MLflow draws a progress bar for every download, even of one small file; it reads this
    variable at each download, and offers no other switch."""
    name, old = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[name] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _first(err: BaseException) -> str:
    """The error in one line (MLflow's download errors span several)."""
    text = " ".join(str(err).split())
    return text[:300] if text else type(err).__name__


__all__ = ["Lineage", "SyntheticSet", "lora_version", "parse_ref", "synthetic_set", "trace", "version_lineage"]
