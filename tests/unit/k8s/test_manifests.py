"""Every Kubernetes manifest validates offline, as an API server with KubeRay would check it.

The kustomize overlays are built once per session (conftest.py); every document, and every
`sonosynth k8s render` output, is validated: KubeRay kinds against the CRD schemas in
../shared/schemas/kuberay (objects closed, as `kubectl apply --validate=strict` does: an unknown
field fails), core kinds with kubernetes-validate (strict, offline schemas). Then the stack's own
rules: pods at the restricted Pod Security level, requests and limits on every container,
secrets referenced and never inlined, a service account per pod with no API token unless it
needs one. What the KubeRay operator itself refuses beyond the schemas: test_operator_rules.py.
"""

from __future__ import annotations

import copy
import functools
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "k8s"
SCHEMAS = Path(os.environ.get("SONOSYNTH_SHARED", REPO.parent / "shared")) / "schemas" / "kuberay"
K8S_VERSION = "1.30.0"
"""Core schemas to validate against (CronJob.timeZone needs Kubernetes 1.27+)."""
SECRET_NAMES = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY", "CREDENTIAL")
API_ACCOUNTS = {"sonosynth-ray-head", "sonosynth-rayjob-creator", "sonosynth-rayjob-cleaner"}
"""The only service accounts that get an API token: the autoscaler's, the CronJob fallback's and
the RayJob cleanup's."""


def closed(schema):
    """An OpenAPI schema with every object that lists its properties closed to others."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_validators() -> dict:
    import jsonschema

    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS} (set SONOSYNTH_SHARED)")
    out = {}
    for path in sorted(SCHEMAS.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = closed(version["schema"]["openAPIV3Schema"])
        out[f"{crd['spec']['group']}/v1", crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    assert {k for _, k in out} >= {"RayCluster", "RayJob", "RayCronJob"}
    return out


def validate(doc: dict) -> None:
    """Raise with every problem of one manifest."""
    import kubernetes_validate

    key = (doc.get("apiVersion"), doc.get("kind"))
    if str(key[0]).startswith("ray.io/"):
        assert key in crd_validators(), f"no CRD schema for {key}"
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validators()[key].iter_errors(doc)]
        assert not errors, f"{key[1]} {doc['metadata'].get('name')}: " + "\n".join(errors[:20])
        # the CRD leaves metadata open; check it as the ObjectMeta it is
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                     K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    if doc.get("kind") == "ConfigMap":  # a RayJob kept for a CronJob to create
        for key, text in (doc.get("data") or {}).items():
            for inner in yaml.safe_load_all(text) if key.endswith((".yaml", ".yml")) else []:
                if isinstance(inner, dict) and inner.get("kind"):
                    validate(inner)


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return [(kind, spec["template"]["spec"])]
    if kind == "CronJob":
        return [(kind, spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "RayCluster":
        return [("head", spec["headGroupSpec"]["template"]["spec"])] + \
               [(f"worker {g['groupName']}", g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    if kind == "RayJob":
        return pod_specs({"kind": "RayCluster", "spec": spec["rayClusterSpec"]}) if "rayClusterSpec" in spec else []
    if kind == "RayCronJob":
        return pod_specs({"kind": "RayJob", "spec": spec["jobTemplate"]})
    return []


def policy_problems(docs: list[dict]) -> list[str]:
    problems = []
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata'].get('name')}"
        if doc["kind"] == "Secret":
            problems.append(f"{name}: secrets are referenced, never inlined")
        if doc["kind"] == "Namespace":
            labels = doc["metadata"].get("labels", {})
            if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
                problems.append(f"{name}: pod security must be enforced at the restricted level")
        if doc["kind"] == "RayCluster":
            auto = doc["spec"].get("autoscalerOptions", {})
            sc = auto.get("securityContext", {})
            drops = sc.get("capabilities", {}).get("drop", [])
            if sc.get("allowPrivilegeEscalation") is not False or "ALL" not in drops:
                problems.append(f"{name}: the autoscaler sidecar must run restricted")
            if not auto.get("resources", {}).get("limits"):
                problems.append(f"{name}: the autoscaler sidecar needs requests and limits")
            if doc["spec"].get("authOptions", {}).get("mode") != "token":
                problems.append(f"{name}: Ray token auth must be on")
        for where, pod in pod_specs(doc):
            here = f"{name} ({where})"
            psc = pod.get("securityContext", {})
            sa = pod.get("serviceAccountName")
            if not sa or sa == "default":
                problems.append(f"{here}: needs its own service account")
            elif sa not in API_ACCOUNTS:
                default = accounts.get(sa, {}).get("automountServiceAccountToken")
                token = pod.get("automountServiceAccountToken", default)
                if token is not False:
                    problems.append(f"{here}: service account {sa} must not mount an API token")
            for vol in pod.get("volumes", []):
                if "hostPath" in vol:
                    problems.append(f"{here}: hostPath volume {vol['name']}")
            if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
                problems.append(f"{here}: host namespaces")
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                csc = c.get("securityContext", {})
                cn = f"{here} container {c['name']}"
                if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                    problems.append(f"{cn}: runAsNonRoot")
                if csc.get("runAsUser", psc.get("runAsUser", 1)) == 0:
                    problems.append(f"{cn}: runs as root")
                seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
                if seccomp not in ("RuntimeDefault", "Localhost"):
                    problems.append(f"{cn}: seccompProfile RuntimeDefault")
                if csc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{cn}: allowPrivilegeEscalation false")
                if "ALL" not in csc.get("capabilities", {}).get("drop", []) or csc.get("capabilities", {}).get("add"):
                    problems.append(f"{cn}: capabilities drop ALL, add none")
                if csc.get("privileged"):
                    problems.append(f"{cn}: privileged")
                res = c.get("resources", {})
                for part in ("requests", "limits"):
                    if not {"cpu", "memory"} <= set(res.get(part, {})):
                        problems.append(f"{cn}: {part} for cpu and memory")
                for env in c.get("env", []):
                    if any(s in env["name"].upper() for s in SECRET_NAMES) and "value" in env:
                        problems.append(f"{cn}: {env['name']} inlined; use valueFrom.secretKeyRef")
    return problems


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    return next(d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"]))


def fallback_rayjob(docs: list[dict]) -> dict:
    config = next(d for d in docs if d["kind"] == "ConfigMap" and "rayjob.yaml" in d.get("data", {}))
    return yaml.safe_load(config["data"]["rayjob.yaml"])


def test_every_built_manifest_validates_against_kuberay_and_kubernetes_schemas(built, build):
    docs = built[build]
    assert docs
    for doc in docs:
        validate(doc)


def test_pods_are_restricted_limited_and_hold_no_secrets(built, build):
    assert policy_problems(built[build]) == []


def test_the_overlays_differ_where_they_should(built, build):
    docs = built[build]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"sonosynth"}
    cluster = one(docs, "RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus is None) == build.startswith(("overlays/dev", "dev")), build
    # the dev overlay empties the models volume (patched by index, after a `test` of its name)
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    assert set(volumes) == {"ray-logs", "dshm", "models"}
    assert ("emptyDir" in volumes["models"]) == build.startswith(("overlays/dev", "dev")), build


def test_the_image_is_set_by_the_overlays(built):
    images = {c["image"] for d in built["overlays/gpu"] for _, p in pod_specs(d) for c in p["containers"]}
    assert "registry.example.com/sonosynth:0.1.0" in images and "sonosynth" not in images


@pytest.mark.parametrize("overlay", ["dev", "gpu"])
def test_the_nightly_is_suspended_in_dev_only_with_or_without_the_fallback(built, overlay):
    dev = overlay == "dev"
    assert one(built[f"overlays/{overlay}"], "RayCronJob")["spec"]["suspend"] is dev
    for build in (f"{overlay}+nightly-cronjob", f"{overlay}(nightly-cronjob)"):
        docs = built[build]
        assert not [d for d in docs if d["kind"] == "RayCronJob"], build
        assert one(docs, "CronJob", "sonosynth-nightly")["spec"]["suspend"] is dev, build


@pytest.mark.parametrize("fallback", ["gpu+nightly-cronjob", "gpu(nightly-cronjob)"])
def test_the_fallback_creates_the_very_same_rayjob(built, fallback):
    docs = built[fallback]
    cron = one(docs, "CronJob", "sonosynth-nightly")
    rayjob_cron = one(built["overlays/gpu"], "RayCronJob")["spec"]
    assert cron["spec"]["schedule"] == rayjob_cron["schedule"]
    assert cron["spec"]["timeZone"] == rayjob_cron["timeZone"]
    assert fallback_rayjob(docs)["spec"] == rayjob_cron["jobTemplate"]
    role = one(docs, "Role", "sonosynth-rayjob-creator")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]


@pytest.mark.parametrize("cronjob", [False, True], ids=["raycronjob", "cronjob-fallback"])
def test_the_committed_nightly_is_what_render_writes(built, manifests, cronjob):
    """k8s/base/nightly.yaml and the component hold what `k8s render` writes (conftest.NIGHTLY)."""
    docs = manifests["k8s render nightly (--cronjob)" if cronjob else "k8s render nightly (RayCronJob)"]
    if not cronjob:
        committed = one(built["overlays/gpu"], "RayCronJob")["spec"]
        assert {**committed, "suspend": None} == {**docs[0]["spec"], "suspend": None}
        return
    committed = built["gpu+nightly-cronjob"]
    assert fallback_rayjob(committed)["spec"] == fallback_rayjob(docs)["spec"]
    assert fallback_rayjob(committed)["metadata"]["generateName"] == fallback_rayjob(docs)["metadata"]["generateName"]
    spec = one(committed, "CronJob", "sonosynth-nightly")["spec"]
    assert {**spec, "suspend": None} == {**one(docs, "CronJob")["spec"], "suspend": None}


def test_finished_rayjobs_are_cleaned_by_a_cronjob_that_may_only_list_and_delete_them(built, build):
    docs = built[build]
    cron = one(docs, "CronJob", "sonosynth-rayjob-cleanup")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "sonosynth-rayjob-cleaner"
    script = one(docs, "ConfigMap", pod["volumes"][0]["configMap"]["name"])  # generated: hashed name
    assert script["data"]["rayjob_cleanup.py"] == (K8S / "base" / "rayjob_cleanup.py").read_text()
    assert pod["containers"][0]["command"][-1].endswith("/rayjob_cleanup.py")
    role = one(docs, "Role", "sonosynth-rayjob-cleaner")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["list", "delete"]}]


def test_the_validation_is_strict(built):
    """A typo in a CRD's nested pod template, or in a core kind, fails: the checks are not vacuous."""
    import kubernetes_validate

    cluster = copy.deepcopy(one(built["overlays/gpu"], "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resoures"] = {}
    with pytest.raises(AssertionError, match="resoures"):
        validate(cluster)
    cluster = copy.deepcopy(next(d for d in built["overlays/gpu"] if d["kind"] == "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(AssertionError, match="maxReplicas"):
        validate(cluster)
    deployment = copy.deepcopy(next(d for d in built["overlays/gpu"] if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "IfNotPresent"
    deployment["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "DB_PASSWORD", "value": "x"})
    assert any("DB_PASSWORD inlined" in p for p in policy_problems([deployment]))


# -- sonosynth k8s render ---------------------------------------------------------------------

def committed_jobs() -> list[Path]:
    return sorted((K8S / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", committed_jobs(), ids=lambda p: p.name)
def test_committed_stage_jobs_are_what_render_writes_and_validate(path):
    from sonosynth.launch.cluster.k8s_render import render

    header = path.read_text().splitlines()[0]
    assert header.startswith("# Rendered by: sonosynth k8s render "), header
    args = shlex.split(header.removeprefix("# Rendered by: sonosynth k8s render "))
    recipe, stage, rest = args[0], args[1], args[2:]
    overrides = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] == "--set"]
    docs, _ = render(recipe, stage, overrides)
    assert [d for d in yaml.safe_load_all(path.read_text()) if d] == docs, \
        f"{path} is stale: re-run the command in its first line"
    for doc in docs:
        validate(doc)
    assert policy_problems(docs) == []


@pytest.mark.parametrize("cronjob", [False, True], ids=["raycronjob", "cronjob-fallback"])
def test_scheduled_renders_validate(cronjob):
    from sonosynth.launch.cluster.k8s_render import render

    docs, _ = render("lora_joint_head_cluster", "train-lora", ["engine.epochs=50"],
                     schedule="30 1 * * *", time_zone="Europe/Paris", cronjob=cronjob)
    assert [d["kind"] for d in docs] == (["ConfigMap", "CronJob"] if cronjob else ["RayCronJob"])
    for doc in docs:
        validate(doc)
    assert policy_problems(docs) == []
    cron = docs[-1]["spec"]
    assert cron["schedule"] == "30 1 * * *" and cron["timeZone"] == "Europe/Paris"
    job = yaml.safe_load(docs[0]["data"]["rayjob.yaml"])["spec"] if cronjob else cron["jobTemplate"]
    assert job["entrypoint"] == "sonosynth train-lora lora_joint_head_cluster --set engine.epochs=50"


def test_a_recipe_file_not_in_the_image_travels_in_the_job(tmp_path):
    from sonosynth.launch.cluster.k8s_render import render
    from sonosynth.launch.recipes import load_recipe
    from sonosynth.launch.cluster.submit import RECIPE_ENV

    recipe = tmp_path / "my_lora.yaml"
    recipe.write_text("extends: lora_joint_tiny\nout: s3://sonosynth/lora/mine\ndata:\n  dataset: s3://sonosynth/ph\n")
    (doc,), warnings = render(str(recipe), "train-lora", ["engine.max_steps=5"])
    validate(doc)
    assert doc["metadata"]["name"] == "train-lora-my-lora" and not warnings
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv == ["python", "-m", "sonosynth.launch.cluster.submit", "train-lora", "my_lora.yaml", "--set",
                    "engine.max_steps=5"]
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
    assert yaml.safe_load(env[RECIPE_ENV]) == load_recipe(recipe)  # extends: merged in


def test_render_checks_the_recipe_here_and_warns_about_local_paths():
    from sonosynth.infra.config import ConfigError
    from sonosynth.launch.cluster.k8s_render import render

    with pytest.raises(ConfigError, match="num_samplez: unknown key; did you mean 'num_samples'"):
        render("generate_cluster", "generate", ["num_samplez=5"])
    with pytest.raises(ConfigError, match="unknown stage 'train-lor'.*train-lora"):
        render("lora_joint_tiny", "train-lor")
    with pytest.raises(ConfigError, match="no recipe"):
        render("no_such_recipe", "generate")
    # a path only the cluster has is a warning, and so is an output inside the pod
    _, warnings = render("generate_cluster", "generate")
    assert any("/models/stable-diffusion-v1-5 is not on this machine" in w for w in warnings)
    _, warnings = render("lora_joint_tiny", "train-lora")
    assert any("out is 'runs/lora-joint-tiny', a path inside the pod" in w for w in warnings)


def test_render_resolves_a_pipeline_as_sonosynth_pipeline_does():
    from sonosynth.infra.config import ConfigError
    from sonosynth.launch.cluster.k8s_render import render

    with pytest.raises(ConfigError, match="nope: unknown key"):
        render("nightly_heads", "pipeline", ["nope=1"])
    with pytest.raises(ConfigError, match="from_stage='nope' names no section"):
        render("nightly_heads", "pipeline", ["from_stage=nope"])
    (doc,), warnings = render("nightly_heads", "pipeline", ["lora.engine.max_steps=20"])  # SECTION.key shorthand
    assert doc["spec"]["entrypoint"] == "sonosynth pipeline nightly_heads --set lora.engine.max_steps=20"
    assert warnings == [] and "backoffLimit" not in doc["spec"]
    _, warnings = render("nightly_heads_tiny", "pipeline")
    assert any("a path inside the pod" in w for w in warnings)


def test_the_rendered_by_annotation_is_the_whole_command():
    from sonosynth.launch.cluster.k8s_render import render

    docs, _ = render("lora_joint_head_cluster", "train-lora", ["engine.epochs=5"], name="lora-weekly",
                     schedule="0 3 * * 0", time_zone="Europe/Paris", cronjob=True)
    command = docs[-1]["metadata"]["annotations"]["sonosynth.io/rendered-by"]
    assert shlex.split(command) == ["sonosynth", "k8s", "render", "lora_joint_head_cluster", "train-lora", "--set",
                                    "engine.epochs=5", "--name", "lora-weekly", "--schedule", "0 3 * * 0",
                                    "--time-zone", "Europe/Paris", "--cronjob"]


def test_render_cli_writes_a_file_and_exits_2_on_a_bad_key(tmp_path):
    sonosynth = str(Path(sys.executable).with_name("sonosynth"))
    out = tmp_path / "job.yaml"
    ok = subprocess.run([sonosynth, "k8s", "render", "generate_cluster", "generate", "--set", "num_samples=64",
                         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    (doc,) = list(yaml.safe_load_all(out.read_text()))
    validate(doc)
    bad = subprocess.run([sonosynth, "k8s", "render", "generate_cluster", "generate", "--set", "nope=1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope: unknown key" in bad.stderr


def test_the_image_installs_every_package_folder():
    """infra/docker/Dockerfile copies every folder the wheel is built from (pyproject's package-dir)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    dockerfile = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    copied = {line.split()[1].rstrip("/") for line in dockerfile.splitlines() if line.startswith("COPY ")}
    folders = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    assert {f.split("/")[0] for f in folders} <= copied
    assert "-c constraints.txt torch==" in dockerfile and "FROM ${CUDA_IMAGE}" in dockerfile
    ignored = (REPO / "infra" / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert {f"!{f.split('/')[0]}/" for f in folders} <= set(ignored)
