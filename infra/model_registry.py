"""The one gateway to models: fetch a model folder from anywhere, and the registry's aliases.

Every training stage exports ``OUT/model/``, logs it as its run's ``model`` artifact and
registers it. ``fetch_model_folder`` gives a local folder for any of ``/path/to/model``,
``s3://bucket/prefix/model``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``,
``models:/<name>/latest``, ``runs:/<run id>/model`` and ``mlflow-artifacts:/...``, so loaders
need not know where a model lives. ``Registry(uri)`` moves the aliases: ``champion``, the
``previous_champion`` it replaced and the ``sonosynth.champion_history`` tag, used by the
promote stage and the ``sonosynth champion`` verbs.

The tracking URI is always passed explicitly: nothing here sets MLflow's process-wide URIs
(two pipelines with two stores can run in one process). ``None`` means the environment's
default (``$MLFLOW_TRACKING_URI``), resolved once by the caller's ``TrackingConfig``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sonosynth.infra.config import ConfigError
from sonosynth.infra.stage import InputNotFound

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
TEMP_PREFIX = "sonosynth-model-"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous_champion"
HISTORY_TAG = "sonosynth.champion_history"
HISTORY_KEEP = 50


def is_mlflow_uri(uri: str) -> bool:
    return str(uri).startswith(MLFLOW_SCHEMES)


def client(tracking_uri: str | None):
    """An MlflowClient whose tracking and registry are both ``tracking_uri``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


# -- model folders --------------------------------------------------------------------------------

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

    ``required`` names a file the folder must hold (the error names ``what`` and ``hint`` when
    it does not). ``storage`` is the ``StorageConfig`` of ``s3://``."""
    uri = str(uri)
    if is_mlflow_uri(uri):
        path = _download_mlflow(uri, tracking_uri, what)
    elif uri.startswith("s3://"):
        from sonosynth.infra.storage import open_storage

        store, path = open_storage(uri, storage), Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        keys = store.list("")
        if not keys:
            path.rmdir()
            raise InputNotFound(f"{what} {uri} is empty or does not exist; point it at {hint}")
        for key in keys:
            (path / key).parent.mkdir(parents=True, exist_ok=True)
            (path / key).write_bytes(store.get_bytes(key))
    else:
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise InputNotFound(f"{what} {uri} is not a folder; point it at {hint}")
    if required and not (path / required).is_file():
        raise InputNotFound(f"{what} {uri} holds no {required}; point it at {hint}")
    return path


def _download_mlflow(uri: str, tracking_uri: str | None, what: str) -> Path:
    import mlflow

    dest = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    try:
        source = resolve_registered(uri, tracking_uri) if uri.startswith("models:/") else uri
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=dest, tracking_uri=tracking_uri, registry_uri=tracking_uri))
    except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; say what to fix
        shutil.rmtree(dest, ignore_errors=True)
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise InputNotFound(f"cannot fetch {what} {uri} from MLflow at {tracking_uri or 'the default URI'}: "
                                f"{first}. Check the model name, version or alias, and the tracking URI") from None


def resolve_registered(uri: str, tracking_uri: str | None = None) -> str:
    """The artifact URI a ``models:/<name>/<version>[/path]``, ``models:/<name>@<alias>[/path]``
    or ``models:/<name>/latest`` points at, looked up in the registry at ``tracking_uri``.

    MLflow's own ``download_artifacts`` resolves ``models:/`` with the process-wide registry
    URI whatever ``registry_uri`` it is given (MLflow 3.17), so the lookup is done here."""
    head, _, sub = uri.removeprefix("models:/").partition("/")
    mlflow_client = client(tracking_uri)
    if "@" in head:
        name, alias = head.split("@", 1)
        version = mlflow_client.get_model_version_by_alias(name, alias).version
    else:
        name = head
        ref, _, sub = sub.partition("/")
        if ref == "latest":
            version = Registry(tracking_uri, mlflow_client).latest(name)
        elif ref.isdigit():
            version = ref
        else:
            raise ValueError(f"{uri}: give a version number, latest or @alias after the model name "
                             f"(models:/{name}/3, models:/{name}@champion); stages are not supported")
    source = mlflow_client.get_model_version_download_uri(name, version)
    return f"{source.rstrip('/')}/{sub}" if sub else source


# -- versions and aliases -------------------------------------------------------------------------

@dataclass
class AliasChange:
    """What an alias operation did (the promote stage's decision adds the figures)."""

    model: str
    version: str
    decision: str
    """first, promoted, refused, unchanged (already champion), manual, rolled_back."""
    reason: str
    champion_before: str | None = None
    champion_after: str | None = None


class Registry:
    """The registered models of one MLflow store: versions, aliases, the champion's history."""

    def __init__(self, tracking_uri: str | None, mlflow_client=None):
        self.uri = tracking_uri
        self.client = mlflow_client or client(tracking_uri)

    def alias(self, name: str, alias: str) -> str | None:
        """The version holding ``alias``, or None when no version holds it."""
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise

    def latest(self, name: str) -> str:
        versions = self.client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ConfigError(f"{name} has no registered version at {self.uri}; train one first")
        return str(max(int(v.version) for v in versions))

    def check_version(self, name: str, version: str) -> None:
        try:
            self.client.get_model_version(name, version)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"{name} has no version {version} ({str(err).splitlines()[0][:200]}); "
                              f"list them with `sonosynth champion show {name}` or in the MLflow UI") from None

    def history(self, name: str) -> list[str]:
        """Every version that was champion, oldest first (the last is the current one)."""
        try:
            tags = self.client.get_registered_model(name).tags or {}
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"no registered model {name!r} at {self.uri} ({str(err).splitlines()[0][:200]}); "
                              "check the name and the tracking URI") from None
        try:
            return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
        except ValueError:
            return []

    def _set_history(self, name: str, history: list[str]) -> None:
        self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:]))

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)

    def crown(self, name: str, version: str, before: str | None) -> None:
        """Make ``version`` champion; the champion it replaces keeps ``previous_champion``."""
        history = self.history(name)
        if not history and before:
            history = [before]
        self.client.set_registered_model_alias(name, CHAMPION, version)
        if before and before != version:
            self.client.set_registered_model_alias(name, PREVIOUS, before)
        self._set_history(name, [*history, version])

    def set_champion(self, name: str, version: str, reason: str = "promoted by an operator") -> AliasChange:
        """Operator override: make ``version`` champion without an evaluation (recorded as manual)."""
        version = str(version)
        self.check_version(name, version)
        before = self.alias(name, CHAMPION)
        if before == version:
            return AliasChange(name, version, "unchanged", f"version {version} is already the champion",
                               before, before)
        self.crown(name, version, before)
        change = AliasChange(name, version, "manual", f"{reason} (champion was version {before or 'none'})",
                             before, version)
        self.tag_version(name, version, {"sonosynth.decision": "manual", "sonosynth.reason": change.reason[:4900],
                                         "sonosynth.decided_at": _now()})
        return change

    def rollback(self, name: str) -> AliasChange:
        """Restore the champion before the current one (from the history, else ``previous_champion``)."""
        history = self.history(name)
        current = self.alias(name, CHAMPION)
        if history and history[-1] == current:
            history = history[:-1]
        target = history[-1] if history else self.alias(name, PREVIOUS)
        if target is None or target == current:
            raise ConfigError(f"{name} has no previous champion to roll back to (champion: version "
                              f"{current or 'none'}); choose one with `sonosynth champion set {name} --version V`")
        self.client.set_registered_model_alias(name, CHAMPION, target)
        earlier = [v for v in history[:-1] if v != target] if history else []
        if earlier:
            self.client.set_registered_model_alias(name, PREVIOUS, earlier[-1])
        else:
            try:
                self.client.delete_registered_model_alias(name, PREVIOUS)
            except Exception:  # noqa: BLE001 - no such alias
                pass
        self._set_history(name, history or [target])
        when = _now()
        if current:
            self.tag_version(name, current, {"sonosynth.decision": "rolled_back",
                                             "sonosynth.reason": f"rolled back to version {target} at {when}"})
        self.tag_version(name, target, {"sonosynth.restored_at": when})
        return AliasChange(name, target, "rolled_back",
                           f"champion rolled back from version {current} to version {target}", current, target)

    def describe(self, name: str) -> dict[str, Any]:
        """The champion, the previous champion, and each version that was champion with its decision."""
        history = self.history(name)
        rows = []
        for version in history:
            tags = self.client.get_model_version(name, version).tags or {}
            rows.append({"version": version, **{k: tags.get(f"sonosynth.{k}", "")
                                                 for k in ("decision", "reason", "decided_at")}})
        return {"model": name, "champion": self.alias(name, CHAMPION), "previous_champion": self.alias(name, PREVIOUS),
                "challenger": self.alias(name, CHALLENGER), "history": rows}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


__all__ = ["AliasChange", "CHALLENGER", "CHAMPION", "PREVIOUS", "Registry", "client", "fetch_model_folder",
           "is_mlflow_uri", "model_folder", "resolve_registered"]
