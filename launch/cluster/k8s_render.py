"""Kubernetes manifests from recipes: ``sonosynth k8s render RECIPE STAGE``.

A stage on the KubeRay cluster of ``k8s/`` is a RayJob whose entrypoint is the same CLI verb
as a local run (``sonosynth STAGE RECIPE --set ...``), submitted over HTTP by the operator
(``submissionMode: HTTPMode``) to the long-lived RayCluster (``clusterSelector``), so no
submitter pod, image or service account is involved and the cluster's token auth is the
operator's business. The recipe and every override are resolved with the stage's config
class first: a bad key fails here. A recipe shipped in the image (``configs/``) is referred
to by name; any other recipe file is embedded, resolved (``extends:`` merged), in the job's
runtime env and written back to a file by ``python -m sonosynth.launch.cluster.submit``.

With a schedule the same job spec becomes a RayCronJob, or (``cronjob=True``) a plain
CronJob that creates the RayJob with kubectl, for operators without RayCronJob (its service
account and Role are in ``k8s/components/nightly-cronjob``).

What the KubeRay operator (v1.7.0) refuses beyond its CRD schemas is refused here too: no
``backoffLimit`` (incompatible with ``clusterSelector``; a stage resumes where it stopped, so a
retry is a new RayJob), and names that are DNS-1035 labels within its limits (a RayJob 47
characters, a RayCronJob 36, the CronJob fallback 41 so that its ``generateName``'d RayJobs
fit). The operator's rules are ported, with citations, in ``tests/unit/k8s/kuberay_rules.py``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from sonosynth.infra.secrets import redact_uri

NAMESPACE = "sonosynth"
CLUSTER = "sonosynth"
KUBECTL_IMAGE = "registry.k8s.io/kubectl:v1.34.1"
CREATOR_ACCOUNT = "sonosynth-rayjob-creator"
"""Service account of the CronJob fallback: may create RayJobs, nothing else."""
RAYJOB_NAME_MAX = 47
"""KubeRay's MaxRayJobNameLength: 53 (a RayCluster) - 6 (utils/constant.go, v1.7.0)."""
RAYCRONJOB_NAME_MAX = 36
"""MaxRayCronJobNameLength: 47 - 11, as each run's RayJob is NAME-<Unix minute>."""
GENERATED_SUFFIX = 6
"""generateName: the API server appends 5 random characters to NAME- ."""
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def slug(text: str, max_len: int = 47) -> str:
    """A DNS-1123 label from free text."""
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    s = re.sub(r"-{2,}", "-", s)[:max_len].rstrip("-")
    if not s:
        raise ValueError(f"cannot make a Kubernetes name from {text!r}; pass --name")
    return s


def name_limit(schedule: str | None, cronjob: bool) -> tuple[int, str]:
    """The longest name KubeRay accepts for what is rendered, and why."""
    if not schedule:
        return RAYJOB_NAME_MAX, "a RayJob name"
    if not cronjob:
        return RAYCRONJOB_NAME_MAX, "a RayCronJob name (each run's RayJob is NAME-<minute>)"
    return RAYJOB_NAME_MAX - GENERATED_SUFFIX, "the CronJob's name (each run's RayJob is NAME-xxxxx)"


def fitted(text: str, limit: int) -> str:
    """TEXT made a DNS-1035 label (a letter first) of at most LIMIT characters."""
    s = slug(text, 63).lstrip("0123456789-")[:limit].rstrip("-")
    if not s:
        raise ValueError(f"cannot make a Kubernetes name from {text!r}; pass --name")
    return s


def job_name(name: str | None, default: str, schedule: str | None = None, cronjob: bool = False) -> str:
    """NAME checked against KubeRay's rules (ConfigError), or DEFAULT shortened to fit them."""
    from sonosynth.infra.config import ConfigError

    limit, what = name_limit(schedule, cronjob)
    if name is None:
        return fitted(default, limit)
    problems = [f"{len(name)} characters, over KubeRay's {limit} for {what}"] if len(name) > limit else []
    if not _DNS1035.fullmatch(name):
        problems.append("not a DNS-1035 label")
    if not problems:
        return name
    try:
        hint = f", e.g. {fitted(name, limit)!r}"
    except ValueError:
        hint = ""
    raise ConfigError(f"--name {name!r}: {'; '.join(problems)}; the KubeRay operator would refuse the job. Pass "
                      f"a --name of at most {limit} characters: lowercase letters, digits and '-', starting with "
                      f"a letter and ending with a letter or digit{hint}")


def recipe_reference(recipe: str) -> tuple[str, str | None]:
    """(what the entrypoint names, the embedded YAML when the recipe is not in the image)."""
    from sonosynth.launch.recipes import find_recipe, load_recipe, packaged_recipes

    path = find_recipe(recipe)  # a ConfigError names the known recipes
    packaged = packaged_recipes()
    if packaged is not None and path.resolve().parent == packaged.resolve():
        return path.stem, None
    return path.name, yaml.safe_dump(load_recipe(path), sort_keys=False)


def labels(stage: str, recipe: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "sonosynth", "app.kubernetes.io/part-of": "sonosynth",
            "app.kubernetes.io/component": slug(stage, 63), "sonosynth.io/stage": slug(stage, 63),
            "sonosynth.io/recipe": slug(Path(recipe).stem, 63)}


def check_config(stage: str, recipe: str, overrides: list[str]) -> list[str]:
    """Validate RECIPE + overrides with the stage's config class, here and now.

    Paths that only the cluster has (``/models/...`` baked into the image or mounted) cannot be
    checked on this machine: a validator that rejects a path that does not exist here becomes
    a warning; every other error (unknown key, bad value) raises ConfigError. Returns warnings.
    The pipeline is resolved as ``sonosynth pipeline`` resolves it (``--set SECTION.key=v``).
    """
    from pydantic import ValidationError

    from sonosynth.infra.config import ConfigError, apply_overrides, build
    from sonosynth.launch.recipes import find_recipe, load_recipe
    from sonosynth.launch.stages import STAGES
    from sonosynth.launch.cluster.submit import job_verbs

    if stage in STAGES and STAGES[stage].resolver is not None:  # a recipe resolved its own way (the pipeline)
        cfg = STAGES[stage].resolve(recipe, {}, overrides)  # a bad key raises ConfigError
        return placement_warnings(cfg.out, cfg.tracking.model_dump())
    path = find_recipe(recipe)
    data = load_recipe(path)
    if overrides:
        data = apply_overrides(data, overrides)
    source = str(path) + (" + --set " + " ".join(overrides) if overrides else "")
    if stage not in STAGES:
        verbs = job_verbs()
        if stage not in verbs:
            raise ConfigError(f"unknown stage {stage!r}; stages and verbs a job can run are {', '.join(verbs)}")
        return [f"{stage} is not in the stage registry: its recipe exists, and its fields are checked when the "
                f"job starts"]
    cls = STAGES[stage].config_class
    warnings: list[str] = []
    try:
        cfg: Any = cls.model_validate(data)
    except ValidationError as err:
        for e in err.errors():
            value = e.get("input")
            if e["type"].startswith("value_error") and isinstance(value, str) and "/" in value \
                    and "://" not in value and not Path(value).expanduser().exists():
                warnings.append(f"{'.'.join(str(p) for p in e['loc'])}: {value} is not on this machine; it must "
                                f"exist on every node of the cluster (in the image or a mounted volume)")
            else:
                build(cls, data, source)  # raises the ConfigError naming every bad key and the fix
        cfg = None
    dest = getattr(cfg, "out", None) if cfg is not None else data.get("out")
    tracking = data.get("tracking") if isinstance(data.get("tracking"), dict) else {}
    return warnings + placement_warnings(dest, tracking)


def placement_warnings(dest: Any, tracking: dict[str, Any]) -> list[str]:
    """Where the job writes: outputs and the tracking store must outlive the pod."""
    warnings = []
    if isinstance(dest, str) and "://" not in dest:
        warnings.append(f"out is {dest!r}, a path inside the pod: use s3:// (or a shared volume) so the result "
                        f"outlives the job and every node can write it")
    uri = tracking.get("uri")
    if uri and tracking.get("enabled", True) and not str(uri).startswith(("http://", "https://", "databricks")):
        warnings.append(f"tracking.uri is {redact_uri(str(uri))!r}, a store inside the pod; the cluster's MLflow is "
                        f"http://mlflow.{NAMESPACE}.svc:5000 (MLFLOW_TRACKING_URI on the cluster)")
    return warnings


def job_spec(stage: str, recipe: str, overrides: list[str], cluster: str = CLUSTER) -> tuple[dict[str, Any], list[str]]:
    """The RayJob spec that runs ``sonosynth STAGE RECIPE --set ...``, and warnings."""
    warnings = check_config(stage, recipe, overrides)
    ref, embedded = recipe_reference(recipe)
    argv = [stage, ref] + [arg for o in overrides for arg in ("--set", o)]
    from sonosynth.launch.cluster.submit import check_secrets

    check_secrets(argv, embedded)  # a manifest is a file in a repo: no password may go in it
    spec: dict[str, Any] = {
        "clusterSelector": {"ray.io/cluster": cluster},
        "submissionMode": "HTTPMode",
    }
    if embedded is None:
        spec["entrypoint"] = shlex.join(["sonosynth", *argv])
    else:
        from sonosynth.launch.cluster.submit import PACKAGE_ENV, RECIPE_ENV

        spec["entrypoint"] = shlex.join(["python", "-m", "sonosynth.launch.cluster.submit", *argv])
        spec["runtimeEnvYAML"] = yaml.safe_dump(
            {"env_vars": {RECIPE_ENV: embedded, PACKAGE_ENV: "image"}}, sort_keys=False, width=1000)
    spec["metadata"] = {"sonosynth.stage": stage, "sonosynth.recipe": Path(recipe).stem}
    return spec, warnings


def _meta(name: str, namespace: str, stage: str, recipe: str, command: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels(stage, recipe),
            "annotations": {"sonosynth.io/rendered-by": command}}


def render(recipe: str, stage: str, overrides: list[str] | None = None, *, name: str | None = None,
           namespace: str = NAMESPACE, cluster: str = CLUSTER, schedule: str | None = None,
           time_zone: str | None = None, cronjob: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """The manifests for STAGE with RECIPE: [RayJob], [RayCronJob] or [ConfigMap, CronJob].

    ``name`` (default STAGE-RECIPE, shortened to fit) must be one the KubeRay operator accepts
    for what is rendered, else ConfigError."""
    overrides = list(overrides or [])
    options = {"--name": name, "--namespace": namespace if namespace != NAMESPACE else None,
               "--cluster": cluster if cluster != CLUSTER else None, "--schedule": schedule,
               "--time-zone": time_zone, "--cronjob": cronjob and bool(schedule)}
    name = job_name(name, f"{stage}-{Path(recipe).stem}", schedule, cronjob)
    check_placement(cluster, time_zone)
    spec, warnings = job_spec(stage, recipe, overrides, cluster)
    meta = _meta(name, namespace, stage, recipe, render_command(recipe, stage, overrides, options))
    if not schedule:
        return [{"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": spec}], warnings
    if not cronjob:
        cron: dict[str, Any] = {"schedule": schedule}
        if time_zone:
            cron["timeZone"] = time_zone
        cron["jobTemplate"] = spec
        return [{"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": meta, "spec": cron}], warnings
    return cronjob_fallback(meta, spec, schedule, time_zone), warnings


def check_placement(cluster: str, time_zone: str | None) -> None:
    """What else the operator (and Kubernetes, for the CronJob) would refuse: ConfigError."""
    import zoneinfo

    from sonosynth.infra.config import ConfigError

    if not cluster:
        raise ConfigError("--cluster is empty: name the RayCluster the job runs on (default sonosynth)")
    if time_zone is None:
        return
    try:
        zoneinfo.ZoneInfo(time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"--time-zone {time_zone!r} is not in the tz database; give a name such as Etc/UTC or "
                          f"Europe/Paris") from None


def render_command(recipe: str, stage: str, overrides: list[str], options: dict[str, Any]) -> str:
    """The ``sonosynth k8s render`` command line that writes these manifests (options set only)."""
    argv = ["sonosynth", "k8s", "render", recipe, stage, *[arg for o in overrides for arg in ("--set", o)]]
    for flag, value in options.items():
        argv += [flag] if value is True else [flag, value] if value else []
    return shlex.join(argv)


def cronjob_fallback(meta: dict[str, Any], spec: dict[str, Any], schedule: str,
                     time_zone: str | None = None) -> list[dict[str, Any]]:
    """A ConfigMap holding the RayJob (generateName: one per run) and a CronJob creating it."""
    name, namespace = meta["name"], meta["namespace"]
    job_meta = {"generateName": f"{name}-", "namespace": namespace, "labels": dict(meta["labels"])}
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": job_meta, "spec": spec}
    config = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": f"{name}-rayjob", "namespace": namespace, "labels": dict(meta["labels"])},
              "data": {"rayjob.yaml": dump([rayjob])}}
    restricted = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                  "readOnlyRootFilesystem": True}
    pod = {
        "metadata": {"labels": dict(meta["labels"])},
        "spec": {
            "serviceAccountName": CREATOR_ACCOUNT,
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "create-rayjob",
                "image": KUBECTL_IMAGE,
                "command": ["kubectl"],
                "args": ["create", "-f", "/etc/sonosynth/rayjob.yaml"],
                "env": [{"name": "HOME", "value": "/tmp"}],
                "securityContext": restricted,
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                              "limits": {"cpu": "200m", "memory": "128Mi"}},
                "volumeMounts": [{"name": "rayjob", "mountPath": "/etc/sonosynth", "readOnly": True},
                                 {"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "rayjob", "configMap": {"name": f"{name}-rayjob"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}],
        },
    }
    cron_spec: dict[str, Any] = {"schedule": schedule}
    if time_zone:
        cron_spec["timeZone"] = time_zone
    cron_spec.update({
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": 3600,
        "successfulJobsHistoryLimit": 3,
        "failedJobsHistoryLimit": 3,
        "jobTemplate": {"spec": {"backoffLimit": 2, "activeDeadlineSeconds": 600,
                                 "ttlSecondsAfterFinished": 86400, "template": pod}},
    })
    cron = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta, "spec": cron_spec}
    return [config, cron]


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (embedded recipes, runtime envs)."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
