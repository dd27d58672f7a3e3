"""The KubeRay operator's own checks, beyond its CRD schemas, for the fields sonosynth sets.

The API server only applies the CRD schema; the operator then validates each object before it
acts on it and, when a check fails, records an event and does nothing else (a RayJob becomes
``ValidationFailed``, a RayCronJob never schedules). ``operator_problems(doc)`` ports those
checks from the operator's Go source at ``KUBERAY`` for RayCluster, RayJob and RayCronJob
(and a RayJob kept in a ConfigMap for a CronJob to create), limited to the fields sonosynth's
manifests set or could set through ``k8s render``. Every message ends with its citation:
``[KubeRay v1.7.0 FILE FUNCTION]``. Two checks are behaviour rather than refusals, and say
so: a head ``/tmp/ray`` volume not named ``ray-logs`` (the autoscaler sidecar then logs to a
volume of its own) and cleanup settings that the operator ignores in clusterSelector mode.

Feature gates are taken at their v1.7.0 defaults (ray-operator/pkg/features/features.go),
except RayCronJob, which the manifests need switched on.
"""

from __future__ import annotations

import re
import zoneinfo
from typing import Any, Callable

import yaml

KUBERAY = "v1.7.0"
VALIDATION = "ray-operator/controllers/ray/utils/validation.go"
POD = "ray-operator/controllers/ray/common/pod.go"
RAYJOB_CONTROLLER = "ray-operator/controllers/ray/rayjob_controller.go"
RAYCRONJOB_CONTROLLER = "ray-operator/controllers/ray/raycronjob_controller.go"
MAIN = "ray-operator/main.go"
CRON_PARSER = "github.com/robfig/cron/v3 v3.0.1 parser.go"

MAX_RAYCLUSTER_NAME = 53
"""MaxRayClusterNameLength (utils/constant.go): 63 minus the longest service suffix, "-serve-svc"."""
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6
"""MaxRayJobNameLength (47): a RayJob's RayCluster is its name plus 6 characters."""
MAX_RAYCRONJOB_NAME = MAX_RAYJOB_NAME - 11
"""MaxRayCronJobNameLength (36): each run's RayJob is NAME-<Unix minute, up to 10 digits>."""
FEATURE_GATES = {"RayJobDeletionPolicy": True, "RayCronJob": True}
"""RayJobDeletionPolicy: beta, on by default. RayCronJob: alpha, off by default; required here."""
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"
RAY_LOGS = ("ray-logs", "/tmp/ray")
"""RayLogVolumeName and RayLogVolumeMountPath (common/pod.go)."""
ORDER = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")
"""validateTTLConsistency: TTLs must not decrease along this order."""

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_GO_VERSION = re.compile(r"\s*v?([0-9]+(?:\.[0-9]+)*)(.*)")
_GO_DURATION = re.compile(r"[-+]?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)")
_GENERATED = "b2d4f"
"""Five characters standing for the API server's random generateName suffix."""

Problems = list[str]


def cite(function: str, file: str = VALIDATION) -> str:
    return f"[KubeRay {KUBERAY} {file} {function}]"


def operator_problems(doc: dict[str, Any]) -> Problems:
    """What the operator would refuse (or silently not do) in one manifest; [] when nothing."""
    kind = doc.get("kind")
    checks: dict[str, Callable[[dict[str, Any]], Problems]] = {
        "RayCluster": raycluster_problems, "RayJob": rayjob_problems, "RayCronJob": raycronjob_problems,
        "ConfigMap": configmap_problems}
    return checks[kind](doc) if kind in checks else []


def configmap_problems(doc: dict[str, Any]) -> Problems:
    """A RayJob kept in a ConfigMap (the CronJob fallback creates it with kubectl)."""
    out = []
    for key, text in (doc.get("data") or {}).items():
        for inner in yaml.safe_load_all(text) if key.endswith((".yaml", ".yml")) else []:
            if isinstance(inner, dict) and inner.get("kind"):
                out += [f"ConfigMap {doc['metadata']['name']} {key}: {p}" for p in operator_problems(inner)]
    return out


# -- names --------------------------------------------------------------------------------------

def dns1035_errors(name: str) -> list[str]:
    """k8s.io/apimachinery validation.IsDNS1035Label."""
    errors = []
    if len(name) > 63:
        errors.append("must be no more than 63 characters")
    if not _DNS1035.fullmatch(name):
        errors.append("must consist of lower case alphanumeric characters or '-', start with an alphabetic "
                      "character, and end with an alphanumeric character")
    return errors


def eventual_name(meta: dict[str, Any]) -> str:
    """metadata.name, or what the API server makes of generateName (at most 58 characters + 5)."""
    if meta.get("name"):
        return meta["name"]
    return meta.get("generateName", "")[:58] + _GENERATED


def raycluster_name_problems(name: str) -> Problems:
    c = cite("ValidateRayClusterMetadata")
    out = []
    if len(name) > MAX_RAYCLUSTER_NAME:
        out.append(f"RayCluster name {name!r} should be no more than {MAX_RAYCLUSTER_NAME} characters {c}")
    if dns1035_errors(name):
        out.append(f"RayCluster name {name!r} should be a valid DNS1035 label: {dns1035_errors(name)} {c}")
    return out


def rayjob_name_problems(name: str, what: str = "RayJob name") -> Problems:
    c = cite("ValidateRayJobMetadata")
    out = []
    if len(name) > MAX_RAYJOB_NAME:
        out.append(f"{what} {name!r} ({len(name)} characters) should be no more than {MAX_RAYJOB_NAME} "
                   f"characters {c}")
    if dns1035_errors(name):
        out.append(f"{what} {name!r} should be a valid DNS1035 label: {dns1035_errors(name)} {c}")
    return out


# -- RayCluster ---------------------------------------------------------------------------------

def raycluster_problems(doc: dict[str, Any]) -> Problems:
    meta = doc.get("metadata") or {}
    where = f"RayCluster {meta.get('name')}"
    out = raycluster_name_problems(meta.get("name", ""))
    out += raycluster_spec_problems(doc.get("spec") or {}, meta.get("annotations") or {})
    return [f"{where}: {p}" for p in out]


def _pod(group: dict[str, Any]) -> dict[str, Any]:
    return (group.get("template") or {}).get("spec") or {}


def _head_env(spec: dict[str, Any]) -> dict[str, str]:
    containers = _pod(spec.get("headGroupSpec") or {}).get("containers") or [{}]
    return {e["name"]: e.get("value", "") for e in containers[0].get("env") or []}


def autoscaling(spec: dict[str, Any] | None) -> bool:
    """utils.IsAutoscalingEnabled."""
    return bool(spec) and spec.get("enableInTreeAutoscaling") is True


def autoscaling_v2(spec: dict[str, Any]) -> bool:
    """utils.IsAutoscalingV2Enabled: autoscalerOptions.version is v2."""
    return (spec.get("autoscalerOptions") or {}).get("version") == "v2"


def raycluster_spec_problems(spec: dict[str, Any], annotations: dict[str, str]) -> Problems:
    """ValidateRayClusterSpec, for the fields sonosynth sets."""
    c = cite("ValidateRayClusterSpec")
    head = spec.get("headGroupSpec") or {}
    if not _pod(head).get("containers"):
        return [f"headGroupSpec should have at least one container {c}"]
    out = group_problems("Head", head)
    for group in spec.get("workerGroupSpecs") or []:
        out += worker_group_problems(group, spec)
    out += autoscaler_problems(spec)
    out += auth_problems(spec)
    out += ray_logs_problems(spec)
    return out


def group_problems(name: str, group: dict[str, Any]) -> Problems:
    """validateRayGroupResources and validateRayGroupLabels."""
    params = group.get("rayStartParams") or {}
    out = []
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
        out.append(f"resource fields should not be set in both rayStartParams and Resources for {name} group; "
                   f"please use only one {cite('validateRayGroupResources')}")
    c = cite("validateRayGroupLabels")
    if "labels" in params:
        out.append(f"rayStartParams['labels'] is not supported for {name} group; please use the top-level "
                   f"Labels field instead {c}")
    for key, value in (group.get("labels") or {}).items():
        if not qualified_name(key):
            out.append(f"invalid label key for {name} group: {key!r} {c}")
        if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
            out.append(f"invalid label value for key {key!r} in {name} group: {value!r} {c}")
    return out


def qualified_name(key: str) -> bool:
    """validation.IsQualifiedName: [DNS-1123 subdomain prefix/]name of at most 63 characters."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.fullmatch(name))


def worker_group_problems(group: dict[str, Any], spec: dict[str, Any]) -> Problems:
    """ValidateRayClusterSpec's loop over workerGroupSpecs, and validateWorkerGroupIdleTimeout."""
    c = cite("ValidateRayClusterSpec")
    name = group.get("groupName")
    lo, hi = group.get("minReplicas"), group.get("maxReplicas")
    out = []
    if not _pod(group).get("containers"):
        out.append(f"workerGroupSpec should have at least one container {c}")
    if not autoscaling(spec) and (lo is None or hi is None):
        out.append(f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled {c}")
    if lo is not None and lo < 0:
        out.append(f"worker group {name} has negative minReplicas {lo} {c}")
    if hi is not None and hi < 0:
        out.append(f"worker group {name} has negative maxReplicas {hi} {c}")
    if lo is not None and hi is not None and lo > hi:
        out.append(f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi} {c}")
    out += group_problems(name, group)
    idle = group.get("idleTimeoutSeconds")
    if idle is not None:
        c = cite("validateWorkerGroupIdleTimeout")
        v2_env = _head_env(spec).get(AUTOSCALER_V2_ENV) in ("1", "true")
        if idle < 0:
            out.append(f"worker group {name}: idleTimeoutSeconds must be non-negative, got {idle} {c}")
        elif not autoscaling_v2(spec) and not v2_env:
            out.append(f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled. Please "
                       f"set .spec.autoscalerOptions.version to 'v2' {c}")
    return out


def autoscaler_problems(spec: dict[str, Any]) -> Problems:
    """ValidateRayClusterSpec's autoscaler checks."""
    c = cite("ValidateRayClusterSpec")
    options = spec.get("autoscalerOptions") or {}
    env = _head_env(spec)
    out = []
    if not autoscaling(spec) and env.get(AUTOSCALER_V2_ENV) in ("1", "true"):
        out.append(f"environment variable {AUTOSCALER_V2_ENV} cannot be set to {env[AUTOSCALER_V2_ENV]!r} when "
                   f"enableInTreeAutoscaling is false {c}")
    if autoscaling(spec):
        if options.get("version") is not None and AUTOSCALER_V2_ENV in env:
            out.append(f"both .spec.autoscalerOptions.version and head Pod env var {AUTOSCALER_V2_ENV} are set, "
                       f"please only use the former {c}")
        if autoscaling_v2(spec):
            pods = [("head Pod", spec["headGroupSpec"])] + \
                   [(f"worker group {g.get('groupName')}", g) for g in spec.get("workerGroupSpecs") or []]
            for where, group in pods:
                if _pod(group).get("restartPolicy", "Never") != "Never":
                    out.append(f"restartPolicy for {where} should be Never or unset when using autoscaler V2 {c}")
    idle = options.get("idleTimeoutSeconds")
    if idle is not None and idle < 0:
        out.append(f"autoscalerOptions.idleTimeoutSeconds must be non-negative, got {idle} {c}")
    if any(e.get("name") == "KUBERAY_GEN_AUTOSCALER_START_CMD" for e in options.get("env") or []):
        out.append(f"autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD {c}")
    return out


def go_version(text: str) -> tuple[int, ...] | None:
    """k8s.io/apimachinery version.ParseGeneric: at least major.minor, no zero-prefixed major,
    anything after the numbers ignored; None when it fails."""
    match = _GO_VERSION.fullmatch(text)
    parts = match.group(1).split(".") if match else []
    if len(parts) < 2 or (parts[0].startswith("0") and parts[0] != "0"):
        return None
    return tuple(int(p) for p in parts + ["0"] * (3 - len(parts)))  # compared as if zero-padded


def auth_problems(spec: dict[str, Any]) -> Problems:
    """ValidateRayClusterSpec's authOptions checks."""
    c = cite("ValidateRayClusterSpec")
    auth = spec.get("authOptions") or {}
    k8s_auth = auth.get("enableK8sTokenAuth") is True
    if auth.get("mode") != "token":
        return [f"authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token' {c}"] \
            if k8s_auth else []
    if not spec.get("rayVersion"):
        return [f"authOptions.mode is 'token' but RayVersion was not specified. Ray version 2.52.0 or later is "
                f"required {c}"]
    version = go_version(str(spec["rayVersion"]))
    if version is None:
        return [f"authOptions.mode is 'token' but RayVersion format is invalid: {spec['rayVersion']} {c}"]
    out = []
    if version < (2, 52, 0):
        out.append(f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {spec['rayVersion']} {c}")
    if k8s_auth and version < (2, 55, 0):
        out.append(f"authOptions.enableK8sTokenAuth is enabled but minimum Ray version is 2.55.0 {c}")
    if k8s_auth and auth.get("secretName"):
        out.append(f"authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is also set {c}")
    return out


def ray_logs_problems(spec: dict[str, Any]) -> Problems:
    """With the autoscaler on, BuildPod adds the sidecar a volume named ray-logs at /tmp/ray and the
    Ray container one only when it mounts nothing at /tmp/ray (addEmptyDir, checkIfVolumeMounted,
    checkIfVolumeExists): a /tmp/ray volume under another name leaves the two on separate volumes,
    and the autoscaler's events never reach the Ray head's logs. Behaviour, not a refusal."""
    if not autoscaling(spec):
        return []
    volume, path = RAY_LOGS
    container = _pod(spec["headGroupSpec"])["containers"][0]
    mounts = [m for m in container.get("volumeMounts") or [] if m.get("mountPath") == path]
    if mounts and mounts[0].get("name") != volume:
        return [f"the head's {path} volume is {mounts[0].get('name')!r}: the autoscaler sidecar mounts a separate "
                f"emptyDir {volume!r} there, so its logs and events are lost; name the volume {volume!r} "
                f"(behaviour, not a refusal) {cite('BuildPod/addEmptyDir', POD)}"]
    return []


# -- RayJob -------------------------------------------------------------------------------------

def rayjob_problems(doc: dict[str, Any]) -> Problems:
    meta = doc.get("metadata") or {}
    name = eventual_name(meta)
    what = "RayJob name" if meta.get("name") else f"RayJob name from generateName {meta.get('generateName')!r}"
    out = rayjob_name_problems(name, what)
    out += rayjob_spec_problems(doc.get("spec") or {}, meta.get("annotations") or {})
    return [f"RayJob {meta.get('name') or meta.get('generateName')}: {p}" for p in out]


def rayjob_spec_problems(spec: dict[str, Any], annotations: dict[str, str]) -> Problems:
    """ValidateRayJobSpec (and the clusterSelector-mode behaviour of the RayJob controller)."""
    c = cite("ValidateRayJobSpec")
    suspend, shutdown = spec.get("suspend", False), spec.get("shutdownAfterJobFinishes", False)
    selector = spec.get("clusterSelector") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    out = []
    if suspend and not shutdown:
        out.append(f"a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended {c}")
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        out.append(f"TTLSecondsAfterFinished must be a non-negative integer {c}")
    out += deletion_problems(spec)
    if suspend and selector:
        out.append(f"the ClusterSelector mode doesn't support the suspend operation {c}")
    if not spec.get("rayClusterSpec") and not selector:
        out.append(f"one of RayClusterSpec or ClusterSelector must be set {c}")
    if selector:
        if not selector.get("ray.io/cluster"):
            out.append(f"cluster name in ClusterSelector should not be empty {c}")
        if mode == "SidecarMode":
            out.append(f"ClusterSelector is not supported in SidecarMode {c}")
        if backoff is not None and backoff > 0:
            out.append(f"BackoffLimit is incompatible with ClusterSelector mode {c}")
        out += selector_mode_behaviour(spec)
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        out.append(f"BackoffLimit is incompatible with InteractiveMode {c}")
    if mode == "SidecarMode":
        out += [f"Currently, SidecarMode doesn't support {f[0].upper() + f[1:]} {c}"
                for f in ("submitterPodTemplate", "submitterConfig") if spec.get(f)]
    if spec.get("rayClusterSpec"):
        if (spec["rayClusterSpec"].get("authOptions") or {}).get("enableK8sTokenAuth") is True:
            out.append(f"K8s token auth mode is currently not supported for RayJob {c}")
        out += raycluster_spec_problems(spec["rayClusterSpec"], annotations)
    out += runtime_env_problems(spec.get("runtimeEnvYAML", ""))
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if spec.get(field) is not None and spec[field] <= 0:
            out.append(f"{field} must be a positive integer {c}")
    if backoff is not None and backoff < 0:
        out.append(f"backoffLimit must be a positive integer {c}")
    return out


def runtime_env_problems(text: str) -> Problems:
    """dashboardclient.UnmarshalRuntimeEnvYAML: YAML holding a mapping (or nothing)."""
    c = cite("ValidateRayJobSpec/UnmarshalRuntimeEnvYAML")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as err:
        return [f"failed to unmarshal RuntimeEnvYAML: {err} {c}"]
    return [] if value is None or isinstance(value, dict) else [f"RuntimeEnvYAML is not a mapping {c}"]


def selector_mode_behaviour(spec: dict[str, Any]) -> Problems:
    """In the terminal states the RayJob controller returns before any deletion logic when
    clusterSelector is set (Reconcile, case Complete/Failed): these fields validate and then do
    nothing. Behaviour, not a refusal."""
    ignored = [f for f in ("deletionStrategy", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished") if spec.get(f)]
    if not ignored:
        return []
    return [f"{', '.join(ignored)} never act on a RayJob with clusterSelector: the operator skips every deletion "
            f"for it (behaviour, not a refusal) {cite('RayJobReconciler.Reconcile', RAYJOB_CONTROLLER)}"]


def deletion_problems(spec: dict[str, Any]) -> Problems:
    """validateDeletionConfiguration."""
    c = cite("validateDeletionConfiguration")
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    out = []
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        out.append(f"a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished {c}")
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return out
    if not FEATURE_GATES["RayJobDeletionPolicy"]:
        return out + [f"RayJobDeletionPolicy feature gate must be enabled to use DeletionStrategy {c}"]
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    rules = strategy.get("deletionRules") or []
    if rules and shutdown:
        out.append(f"spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are mutually exclusive {c}")
    if rules and legacy:
        out.append(f"Cannot use both legacy onSuccess/onFailure fields and deletionRules simultaneously {c}")
    if legacy:
        return out + legacy_deletion_problems(spec)
    if rules:
        return out + deletion_rules_problems(spec)
    return out + [f"DeletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules field {c}"]


def legacy_deletion_problems(spec: dict[str, Any]) -> Problems:
    """validateLegacyDeletionPolicies (onSuccess/onFailure); first failure only, as in Go."""
    c = cite("validateLegacyDeletionPolicies")
    strategy = spec["deletionStrategy"]
    if strategy.get("onSuccess") is None or strategy.get("onFailure") is None:
        return [f"both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set {c}"]
    policies = {"success": strategy["onSuccess"].get("policy"), "failure": strategy["onFailure"].get("policy")}
    for when, policy in policies.items():
        if policy is None:
            return [f"the DeletionPolicyType field of DeletionStrategy.On{when.title()} cannot be unset {c}"]
    for when, policy in policies.items():
        if spec.get("clusterSelector") and policy in ("DeleteCluster", "DeleteWorkers"):
            return [f"the ClusterSelector mode doesn't support DeletionStrategy={policy} on {when} {c}"]
    if "DeleteWorkers" in policies.values() and autoscaling(spec.get("rayClusterSpec")):
        return [f"DeletionStrategy=DeleteWorkers currently does not support RayCluster with autoscaling enabled {c}"]
    if spec.get("shutdownAfterJobFinishes") and "DeleteNone" in policies.values():
        return [f"shutdownAfterJobFinshes is set to 'true' while deletion policy is 'DeleteNone' {c}"]
    return []


def deletion_rules_problems(spec: dict[str, Any]) -> Problems:
    """validateDeletionRules, validateDeletionCondition and validateTTLConsistency."""
    c = cite("validateDeletionRules")
    ttls: dict[tuple[str, str], dict[str, int]] = {}
    out = []
    for i, rule in enumerate(spec["deletionStrategy"]["deletionRules"]):
        cond, policy = rule.get("condition") or {}, rule.get("policy")
        if ("jobStatus" in cond) == ("jobDeploymentStatus" in cond):
            out.append(f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus must be set "
                       f"{cite('validateDeletionCondition')}")
            continue
        if cond.get("ttlSeconds", 0) < 0:
            out.append(f"deletionRules[{i}]: TTLSeconds must be non-negative {cite('validateDeletionCondition')}")
            continue
        if spec.get("clusterSelector") and policy in ("DeleteCluster", "DeleteWorkers"):
            out.append(f"deletionRules[{i}]: DeletionPolicyType {policy!r} not supported when ClusterSelector is "
                       f"set {c}")
            continue
        if autoscaling(spec.get("rayClusterSpec")) and policy == "DeleteWorkers":
            out.append(f"deletionRules[{i}]: DeletionPolicyType 'DeleteWorkers' not supported with autoscaling "
                       f"enabled {c}")
            continue
        key = ("JobStatus", cond["jobStatus"]) if "jobStatus" in cond else \
              ("JobDeploymentStatus", cond["jobDeploymentStatus"])
        if policy in ttls.setdefault(key, {}):
            out.append(f"deletionRules[{i}]: duplicate rule for DeletionPolicyType {policy!r} and {key[0]} "
                       f"{key[1]!r} {c}")
            continue
        ttls[key][policy] = cond.get("ttlSeconds", 0)
    for (kind, value), by_policy in ttls.items():
        present = [(p, by_policy[p]) for p in ORDER if p in by_policy]
        for (before, low), (policy, ttl) in zip(present, present[1:]):
            if ttl < low:
                out.append(f"for {kind} {value!r}: {policy} TTL ({ttl}) must be >= {before} TTL ({low}) "
                           f"{cite('validateTTLConsistency')}")
    return out


# -- RayCronJob ---------------------------------------------------------------------------------

def raycronjob_problems(doc: dict[str, Any]) -> Problems:
    """ValidateRayCronJobSpec, and the name of the RayJob each run creates (getRayJobName)."""
    c = cite("ValidateRayCronJobSpec")
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    name = meta.get("name", "")
    if not FEATURE_GATES["RayCronJob"]:
        return [f"RayCronJob {name}: no RayCronJob controller runs without the RayCronJob feature gate "
                f"{cite('main', MAIN)}"]
    out = []
    if len(name) > MAX_RAYCRONJOB_NAME:
        out.append(f"RayCronJob name {name!r} ({len(name)} characters) should be no more than "
                   f"{MAX_RAYCRONJOB_NAME} characters {c}")
    child = f"{name}-{'2' * 10}"
    if dns1035_errors(child):
        out.append(f"the RayJob name of a run, {child!r}, should be a valid DNS1035 label: "
                   f"{dns1035_errors(child)} {cite('getRayJobName', RAYCRONJOB_CONTROLLER)} "
                   f"{cite('ValidateRayJobMetadata')}")
    schedule = spec.get("schedule", "")
    if "TZ" in schedule:
        out.append(f"cannot use TZ or CRON_TZ in schedule, use timeZone field instead {c}")
    elif cron_error(schedule):
        out.append(f"invalid cron schedule: {cron_error(schedule)} {c} [{CRON_PARSER} ParseStandard]")
    if "timeZone" in spec:
        out += time_zone_problems(spec["timeZone"])
    out += [f"invalid RayJob template: {p}" for p in rayjob_spec_problems(spec.get("jobTemplate") or {}, {})]
    return [f"RayCronJob {name}: {p}" for p in out]


def time_zone_problems(tz: Any) -> Problems:
    """time.LoadLocation (Go's embedded tz database: "UTC", "Local" and IANA names)."""
    c = cite("ValidateRayCronJobSpec")
    if tz == "":
        return [f"timeZone must not be empty string {c}"]
    if tz in ("UTC", "Local"):
        return []
    try:
        zoneinfo.ZoneInfo(str(tz))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return [f"invalid time zone: unknown time zone {tz} {c}"]
    return []


_CRON_FIELDS = (  # robfig/cron v3 bounds: minutes, hours, dom, months, dow
    (0, 59, {}), (0, 23, {}), (1, 31, {}),
    (1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}),
    (0, 6, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
)
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def cron_error(spec: str) -> str | None:
    """cron.ParseStandard: five fields or a descriptor; the parse error, or None."""
    if not spec:
        return "empty spec string"
    if spec.startswith("@"):
        if spec in _DESCRIPTORS or (spec.startswith("@every ") and _GO_DURATION.fullmatch(spec[7:])):
            return None
        return f"unrecognized descriptor: {spec}"
    fields = spec.split()
    if len(fields) != 5:
        return f"expected exactly 5 fields, found {len(fields)}: {spec}"
    for field, bounds in zip(fields, _CRON_FIELDS):
        for expr in filter(None, field.split(",")):
            error = _cron_range_error(expr, *bounds)
            if error:
                return error
    return None


def _cron_int(text: str, names: dict[str, int]) -> int:
    if text.lower() in names:
        return names[text.lower()]
    if not re.fullmatch(r"[-+]?[0-9]+", text):
        raise ValueError(f"failed to parse int from {text}")
    if int(text) < 0:
        raise ValueError(f"negative number ({int(text)}) not allowed: {text}")
    return int(text)


def _cron_range_error(expr: str, lo: int, hi: int, names: dict[str, int]) -> str | None:
    """getRange: number | number "-" number [ "/" number ], or * / ? with an optional step."""
    range_and_step = expr.split("/")
    low_high = range_and_step[0].split("-")
    if len(range_and_step) > 2:
        return f"too many slashes: {expr}"
    try:
        if low_high[0] in ("*", "?"):
            start, end = lo, hi
        elif len(low_high) > 2:
            return f"too many hyphens: {expr}"
        else:
            start = _cron_int(low_high[0], names)
            end = _cron_int(low_high[1], names) if len(low_high) == 2 else start
        step = _cron_int(range_and_step[1], {}) if len(range_and_step) == 2 else 1
    except ValueError as err:
        return str(err)
    if len(range_and_step) == 2 and len(low_high) == 1:
        end = hi  # "N/step" means "N-max/step"
    if start < lo:
        return f"beginning of range ({start}) below minimum ({lo}): {expr}"
    if end > hi:
        return f"end of range ({end}) above maximum ({hi}): {expr}"
    if start > end:
        return f"beginning of range ({start}) beyond end of range ({end}): {expr}"
    if step == 0:
        return f"step of range should be a positive number: {expr}"
    return None
