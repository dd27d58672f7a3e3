"""Model folders from wherever a job put them: a local path, an ``s3://`` prefix, or MLflow.

Every training stage exports ``OUT/model/`` and logs it as the run's ``model`` artifact,
registered under the stage's model name. ``fetch_model_folder`` gives a local folder for any
of ``/path/to/model``, ``s3://bucket/prefix/model``, ``models:/<name>/<version>``,
``models:/<name>@<alias>``, ``runs:/<run id>/model`` and ``mlflow-artifacts:/...``, so
loaders (``sonosynth.trainers.sam.load_sam_model``, and the LoRA sampler's ``fetch_lora``
once it moves here) need not know where the model lives.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
TEMP_PREFIX = "sonosynth-model-"


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(MLFLOW_SCHEMES)


@contextmanager
def model_folder(uri: str, tracking_uri: str | None = None, **kwargs) -> Iterator[Path]:
    """``fetch_model_folder`` as a context: a downloaded copy is deleted on exit (a local folder
    is left alone). For loaders that read the files into memory."""
    path = fetch_model_folder(uri, tracking_uri, **kwargs)
    temp = next((p for p in (path, *path.parents) if p.name.startswith(TEMP_PREFIX)
                 and p.parent == Path(tempfile.gettempdir())), None)
    try:
        yield path
    finally:
        if temp is not None and not Path(str(uri)).expanduser().is_dir():
            shutil.rmtree(temp, ignore_errors=True)


def fetch_model_folder(uri: str, tracking_uri: str | None = None, *, required: str | None = None,
                       what: str = "model", hint: str = "a model/ folder written by a sonosynth training stage",
                       storage=None) -> Path:
    """A local folder with the model at ``uri`` (downloaded into a new temporary folder, named
    ``sonosynth-model-*``, unless it is local; ``model_folder`` deletes it after use).

    ``tracking_uri`` is the MLflow server (or store) of MLflow URIs; None uses
    $MLFLOW_TRACKING_URI. ``required`` names a file the folder must hold (the error names
    ``what`` and ``hint`` when it does not). ``storage`` is the ``StorageConfig`` of ``s3://``."""
    uri = str(uri)
    if is_mlflow_uri(uri):
        import mlflow

        dest = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        try:
            source = resolve_registered(uri, tracking_uri) if uri.startswith("models:/") else uri
            path = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=dest, tracking_uri=tracking_uri, registry_uri=tracking_uri))
        except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; say what to fix
            shutil.rmtree(dest, ignore_errors=True)
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise FileNotFoundError(f"cannot fetch {what} {uri} from MLflow at {tracking_uri or 'the default URI'}: "
                                    f"{first}. Check the model name, version or alias, and the tracking URI") from None
    elif uri.startswith("s3://"):
        from sonosynth.infra.storage import open_storage

        store, path = open_storage(uri, storage), Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        keys = store.list("")
        if not keys:
            path.rmdir()
            raise FileNotFoundError(f"{what} {uri} is empty or does not exist; point it at {hint}")
        for key in keys:
            (path / key).parent.mkdir(parents=True, exist_ok=True)
            (path / key).write_bytes(store.get_bytes(key))
    else:
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{what} {uri} is not a folder; point it at {hint}")
    if required and not (path / required).is_file():
        raise FileNotFoundError(f"{what} {uri} holds no {required}; point it at {hint}")
    return path


def resolve_registered(uri: str, tracking_uri: str | None = None) -> str:
    """The artifact URI a ``models:/<name>/<version>[/path]`` or ``models:/<name>@<alias>[/path]``
    (or ``models:/<name>/latest``) points at, looked up in the registry at ``tracking_uri``.

    MLflow's own ``download_artifacts`` resolves ``models:/`` with the process-wide registry
    URI whatever ``registry_uri`` it is given (MLflow 3.17), so the lookup is done here."""
    from mlflow import MlflowClient

    rest = uri.removeprefix("models:/")
    head, _, sub = rest.partition("/")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if "@" in head:
        name, alias = head.split("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        name = head
        ref, _, sub = sub.partition("/")
        if ref == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise LookupError(f"registered model {name!r} has no versions")
            version = str(max(int(v.version) for v in versions))
        elif ref.isdigit():
            version = ref
        else:
            raise ValueError(f"{uri}: give a version number, latest or @alias after the model name "
                             f"(models:/{name}/3, models:/{name}@champion); stages are not supported")
    source = client.get_model_version_download_uri(name, version)
    return f"{source.rstrip('/')}/{sub}" if sub else source
