"""What the KubeRay operator refuses beyond its CRD schemas: no manifest of the project trips it.

`kuberay_rules.operator_problems` ports the operator's validation (KubeRay v1.7.0, each rule
citing its Go file and function) for the fields sonosynth sets. It runs over every manifest
(conftest.manifests: each kustomize build, with and without the CronJob fallback, k8s/jobs/,
and `k8s render` for every shipped *_cluster recipe and for the nightly), and each rule is shown
to fire on a deliberate violation, so a passing run means something.
"""

from __future__ import annotations

import copy

import pytest
import yaml

RULES_SPEC = {"deletionStrategy": {"deletionRules": [
    {"condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 86400}, "policy": "DeleteSelf"}]}}
"""A deletion strategy that validates with clusterSelector (and then never acts)."""
ON_CLUSTER_SPEC = "RayJob with rayClusterSpec"
"""A sample: the RayJob with the gpu overlay's RayCluster spec instead of clusterSelector."""


def merged(doc: dict, patch: dict) -> dict:
    """DOC with PATCH merged in: nested dicts merge, int keys index lists, None deletes."""
    out = copy.deepcopy(doc)

    def has(target, key) -> bool:
        return key in target if isinstance(target, dict) else key < len(target)

    def apply(target, change):
        for key, value in change.items():
            if value is None:
                del target[key]
            elif isinstance(value, dict) and has(target, key) and isinstance(target[key], (dict, list)):
                apply(target[key], value)
            else:
                target[key] = value
    apply(out, patch)
    return out


@pytest.fixture(scope="session")
def samples(manifests) -> dict[str, dict]:
    """One valid document per kind the rules check."""
    def first(label, kind):
        return next(d for d in manifests[label] if d["kind"] == kind)

    cluster = first("build overlays/gpu", "RayCluster")
    rayjob = first("k8s/jobs/train-lora.yaml", "RayJob")
    return {
        "RayCluster": cluster,
        "RayJob": rayjob,
        ON_CLUSTER_SPEC: merged(rayjob, {"spec": {"clusterSelector": None, "rayClusterSpec": cluster["spec"]}}),
        "RayCronJob": first("k8s render nightly (RayCronJob)", "RayCronJob"),
        "ConfigMap": next(d for d in manifests["build gpu+nightly-cronjob"]
                          if d["kind"] == "ConfigMap" and "rayjob.yaml" in d.get("data", {})),
    }


def test_no_manifest_breaks_an_operator_rule(manifests, rules):
    problems = {label: [p for d in docs for p in rules.operator_problems(d)] for label, docs in manifests.items()}
    assert {label: p for label, p in problems.items() if p} == {}
    kinds = {d["kind"] for docs in manifests.values() for d in docs}
    assert {"RayCluster", "RayJob", "RayCronJob", "ConfigMap"} <= kinds  # every kind was checked
    assert "build dev+nightly-cronjob" in manifests and "k8s render nightly (--cronjob)" in manifests


def test_the_samples_are_clean(samples, rules):
    """So that each violation below is reported because of its change alone."""
    assert {kind: rules.operator_problems(doc) for kind, doc in samples.items()} == {kind: [] for kind in samples}


# (id, sample, patch, what the message says); the cited rule is in kuberay_rules.py
VIOLATIONS = [
    # RayJob: ValidateRayJobMetadata
    ("rayjob-name-48-chars", "RayJob", {"metadata": {"name": "a" * 48}}, "no more than 47 characters"),
    ("rayjob-name-leading-digit", "RayJob", {"metadata": {"name": "1-train-lora"}}, "valid DNS1035 label"),
    ("rayjob-name-uppercase", "RayJob", {"metadata": {"name": "Train-lora"}}, "valid DNS1035 label"),
    ("rayjob-generatename-too-long", "RayJob", {"metadata": {"name": None, "generateName": "a" * 42 + "-"}},
     "from generateName"),
    # RayJob: ValidateRayJobSpec
    ("backoffLimit-with-clusterSelector", "RayJob", {"spec": {"backoffLimit": 1}},
     "BackoffLimit is incompatible with ClusterSelector mode"),
    ("backoffLimit-negative", ON_CLUSTER_SPEC, {"spec": {"backoffLimit": -1}}, "backoffLimit must be a positive"),
    ("backoffLimit-with-InteractiveMode", ON_CLUSTER_SPEC,
     {"spec": {"backoffLimit": 1, "submissionMode": "InteractiveMode"}}, "incompatible with InteractiveMode"),
    ("suspend-with-clusterSelector", "RayJob", {"spec": {"suspend": True, "shutdownAfterJobFinishes": True}},
     "doesn't support the suspend operation"),
    ("suspend-without-shutdown", ON_CLUSTER_SPEC, {"spec": {"suspend": True}}, "not allowed to be suspended"),
    ("clusterSelector-empty-name", "RayJob", {"spec": {"clusterSelector": {"ray.io/cluster": ""}}},
     "should not be empty"),
    ("clusterSelector-with-SidecarMode", "RayJob", {"spec": {"submissionMode": "SidecarMode"}},
     "not supported in SidecarMode"),
    ("neither-cluster-nor-selector", "RayJob", {"spec": {"clusterSelector": None}},
     "one of RayClusterSpec or ClusterSelector"),
    ("runtimeEnvYAML-not-yaml", "RayJob", {"spec": {"runtimeEnvYAML": "env_vars: [a"}}, "failed to unmarshal"),
    ("runtimeEnvYAML-a-list", "RayJob", {"spec": {"runtimeEnvYAML": "- a\n- b\n"}}, "not a mapping"),
    ("activeDeadlineSeconds-zero", "RayJob", {"spec": {"activeDeadlineSeconds": 0}}, "must be a positive integer"),
    ("rayClusterSpec-checked-too", ON_CLUSTER_SPEC,
     {"spec": {"rayClusterSpec": {"workerGroupSpecs": {0: {"minReplicas": 9}}}}}, "greater than maxReplicas"),
    # RayJob: TTL, shutdownAfterJobFinishes and deletion (validateDeletionConfiguration and below)
    ("ttl-without-shutdown", "RayJob", {"spec": {"ttlSecondsAfterFinished": 3600}},
     "cannot have TTLSecondsAfterFinished"),
    ("ttl-negative", ON_CLUSTER_SPEC, {"spec": {"ttlSecondsAfterFinished": -1}}, "must be a non-negative integer"),
    ("deletionRules-with-shutdown", "RayJob", {"spec": {**RULES_SPEC, "shutdownAfterJobFinishes": True}},
     "mutually exclusive"),
    ("deletionRules-and-legacy", "RayJob",
     {"spec": {"deletionStrategy": {**RULES_SPEC["deletionStrategy"], "onSuccess": {"policy": "DeleteSelf"}}}},
     "Cannot use both legacy"),
    ("deletionStrategy-empty", "RayJob", {"spec": {"deletionStrategy": {}}}, "requires either BOTH"),
    ("deletionRules-DeleteCluster-with-clusterSelector", "RayJob",
     {"spec": {"deletionStrategy": {"deletionRules": [
         {"condition": {"jobStatus": "FAILED"}, "policy": "DeleteCluster"}]}}},
     "'DeleteCluster' not supported when ClusterSelector is set"),
    ("deletionRules-DeleteWorkers-with-autoscaling", ON_CLUSTER_SPEC,
     {"spec": {"deletionStrategy": {"deletionRules": [
         {"condition": {"jobStatus": "FAILED"}, "policy": "DeleteWorkers"}]}}}, "not supported with autoscaling"),
    ("deletionRule-condition-both-statuses", "RayJob",
     {"spec": {"deletionStrategy": {"deletionRules": [
         {"condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}, "policy": "DeleteSelf"}]}}},
     "exactly one of JobStatus and JobDeploymentStatus"),
    ("deletionRules-duplicate", "RayJob",
     {"spec": {"deletionStrategy": {"deletionRules": RULES_SPEC["deletionStrategy"]["deletionRules"] * 2}}},
     "duplicate rule"),
    ("deletionRules-ttl-order", ON_CLUSTER_SPEC,
     {"spec": {"deletionStrategy": {"deletionRules": [
         {"condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 600}, "policy": "DeleteCluster"},
         {"condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 60}, "policy": "DeleteSelf"}]}}},
     "DeleteSelf TTL (60) must be >= DeleteCluster TTL (600)"),
    ("legacy-DeleteCluster-with-clusterSelector", "RayJob",
     {"spec": {"deletionStrategy": {"onSuccess": {"policy": "DeleteSelf"}, "onFailure": {"policy": "DeleteCluster"}}}},
     "doesn't support DeletionStrategy=DeleteCluster on failure"),
    ("legacy-one-side-only", ON_CLUSTER_SPEC,
     {"spec": {"deletionStrategy": {"onSuccess": {"policy": "DeleteSelf"}}}}, "must be set"),
    # RayJob controller: accepted, then never acted on (behaviour)
    ("deletionRules-inert-with-clusterSelector", "RayJob", {"spec": RULES_SPEC}, "never act on a RayJob"),
    ("shutdown-inert-with-clusterSelector", "RayJob", {"spec": {"shutdownAfterJobFinishes": True}},
     "never act on a RayJob"),
    # RayCronJob: ValidateRayCronJobSpec, and its runs' names
    ("raycronjob-name-37-chars", "RayCronJob", {"metadata": {"name": "a" * 37}}, "no more than 36 characters"),
    ("raycronjob-name-leading-digit", "RayCronJob", {"metadata": {"name": "2am-nightly"}},
     "the RayJob name of a run"),
    ("raycronjob-schedule-4-fields", "RayCronJob", {"spec": {"schedule": "0 2 * *"}}, "expected exactly 5 fields"),
    ("raycronjob-schedule-minute-60", "RayCronJob", {"spec": {"schedule": "60 2 * * *"}}, "above maximum"),
    ("raycronjob-schedule-bad-descriptor", "RayCronJob", {"spec": {"schedule": "@nightly"}},
     "unrecognized descriptor"),
    ("raycronjob-schedule-TZ", "RayCronJob", {"spec": {"schedule": "CRON_TZ=UTC 0 2 * * *"}},
     "use timeZone field instead"),
    ("raycronjob-timeZone-unknown", "RayCronJob", {"spec": {"timeZone": "Mars/Olympus_Mons"}}, "invalid time zone"),
    ("raycronjob-timeZone-empty", "RayCronJob", {"spec": {"timeZone": ""}}, "must not be empty"),
    ("raycronjob-template-backoffLimit", "RayCronJob", {"spec": {"jobTemplate": {"backoffLimit": 1}}},
     "invalid RayJob template: BackoffLimit is incompatible with ClusterSelector mode"),
    ("raycronjob-template-ttl", "RayCronJob", {"spec": {"jobTemplate": {"ttlSecondsAfterFinished": 60}}},
     "invalid RayJob template: a RayJob with shutdownAfterJobFinishes set to false"),
    # the fallback's RayJob, kept in a ConfigMap
    ("fallback-rayjob-backoffLimit", "ConfigMap", {"spec": {"backoffLimit": 1}}, "BackoffLimit is incompatible"),
    ("fallback-rayjob-generatename-42", "ConfigMap", {"metadata": {"generateName": "s" * 42 + "-"}},
     "no more than 47 characters"),
    # RayCluster: ValidateRayClusterMetadata and ValidateRayClusterSpec
    ("raycluster-name-54-chars", "RayCluster", {"metadata": {"name": "a" * 54}}, "no more than 53 characters"),
    ("raycluster-name-leading-digit", "RayCluster", {"metadata": {"name": "0sonosynth"}}, "valid DNS1035 label"),
    ("head-without-containers", "RayCluster", {"spec": {"headGroupSpec": {"template": {"spec": {"containers": []}}}}},
     "at least one container"),
    ("head-num-cpus-and-group-resources", "RayCluster", {"spec": {"headGroupSpec": {"resources": {"CPU": "1"}}}},
     "both rayStartParams and Resources"),
    ("rayStartParams-labels", "RayCluster", {"spec": {"headGroupSpec": {"rayStartParams": {"labels": "a=b"}}}},
     "rayStartParams['labels'] is not supported"),
    ("worker-min-over-max", "RayCluster", {"spec": {"workerGroupSpecs": {0: {"minReplicas": 9}}}},
     "greater than maxReplicas"),
    ("worker-replicas-unset-without-autoscaling", "RayCluster",
     {"spec": {"enableInTreeAutoscaling": False, "workerGroupSpecs": {0: {"minReplicas": None}}}},
     "must set both minReplicas and maxReplicas"),
    ("worker-idleTimeout-needs-autoscaler-v2", "RayCluster", {"spec": {"autoscalerOptions": {"version": "v1"}}},
     "autoscaler v2 is not enabled"),
    ("worker-idleTimeout-negative", "RayCluster", {"spec": {"workerGroupSpecs": {0: {"idleTimeoutSeconds": -1}}}},
     "idleTimeoutSeconds must be non-negative"),
    ("autoscaler-version-and-env", "RayCluster",
     {"spec": {"headGroupSpec": {"template": {"spec": {"containers": {0: {
         "env": [{"name": "RAY_enable_autoscaler_v2", "value": "1"}]}}}}}}}, "please only use the former"),
    ("autoscaler-v2-env-without-autoscaling", "RayCluster",
     {"spec": {"enableInTreeAutoscaling": False, "headGroupSpec": {"template": {"spec": {"containers": {0: {
         "env": [{"name": "RAY_enable_autoscaler_v2", "value": "true"}]}}}}}}}, "cannot be set to 'true'"),
    ("autoscaler-v2-head-restartPolicy", "RayCluster",
     {"spec": {"headGroupSpec": {"template": {"spec": {"restartPolicy": "Always"}}}}},
     "restartPolicy for head Pod should be Never"),
    ("autoscaler-idleTimeout-negative", "RayCluster", {"spec": {"autoscalerOptions": {"idleTimeoutSeconds": -5}}},
     "autoscalerOptions.idleTimeoutSeconds must be non-negative"),
    ("autoscaler-env-start-cmd", "RayCluster",
     {"spec": {"autoscalerOptions": {"env": [{"name": "KUBERAY_GEN_AUTOSCALER_START_CMD", "value": "x"}]}}},
     "must not contain KUBERAY_GEN_AUTOSCALER_START_CMD"),
    ("token-auth-old-ray", "RayCluster", {"spec": {"rayVersion": "2.51.0"}}, "minimum Ray version is 2.52.0"),
    ("token-auth-no-rayVersion", "RayCluster", {"spec": {"rayVersion": None}}, "RayVersion was not specified"),
    ("token-auth-bad-rayVersion", "RayCluster", {"spec": {"rayVersion": "latest"}}, "RayVersion format is invalid"),
    ("k8s-token-auth-with-secretName", "RayCluster", {"spec": {"authOptions": {"enableK8sTokenAuth": True}}},
     "secretName is also set"),
    # common/pod.go: the volume the autoscaler sidecar shares (behaviour)
    ("head-tmp-ray-not-ray-logs", "RayCluster",
     {"spec": {"headGroupSpec": {"template": {"spec": {
         "containers": {0: {"volumeMounts": {0: {"name": "ray-tmp"}}}}, "volumes": {0: {"name": "ray-tmp"}}}}}}},
     "name the volume 'ray-logs'"),
]


def violate(sample: dict, kind: str, patch: dict) -> dict:
    if kind != "ConfigMap":
        return merged(sample, patch)
    inner = merged(yaml.safe_load(sample["data"]["rayjob.yaml"]), patch)
    return merged(sample, {"data": {"rayjob.yaml": yaml.safe_dump(inner)}})


@pytest.mark.parametrize("kind, patch, expected", [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS])
def test_each_rule_reports_its_violation_with_a_citation(samples, rules, kind, patch, expected):
    problems = rules.operator_problems(violate(samples[kind], kind, patch))
    hits = [p for p in problems if expected in p]
    assert hits, f"expected {expected!r} among {problems}"
    assert all(f"[KubeRay {rules.KUBERAY} ray-operator/" in p for p in hits), hits


def test_names_at_the_limits_pass(samples, rules):
    assert rules.operator_problems(merged(samples["RayJob"], {"metadata": {"name": "a" * 47}})) == []
    assert rules.operator_problems(merged(samples["RayCronJob"], {"metadata": {"name": "a" * 36}})) == []
    fallback = violate(samples["ConfigMap"], "ConfigMap", {"metadata": {"generateName": "s" * 41 + "-"}})
    assert rules.operator_problems(fallback) == []
    assert (rules.MAX_RAYJOB_NAME, rules.MAX_RAYCRONJOB_NAME) == (47, 36)


def test_the_cron_parser_accepts_what_robfig_cron_accepts(rules):
    for ok in ("0 2 * * *", "*/15 0-6,22-23 * jan-mar MON-FRI", "30 1 1,15 * ?", "0 0 * * 0", "5/10 * * * *",
               "@daily", "@every 1h30m"):
        assert rules.cron_error(ok) is None, ok
    for bad in ("", "0 2 * * * *", "0 24 * * *", "0 2 0 * *", "0 2 * 13 *", "0 2 * * 7", "5-1 * * * *",
                "*/0 * * * *", "0 2 * * funday", "@every tomorrow", "1-2-3 * * * *", "1/2/3 * * * *"):
        assert rules.cron_error(bad), bad


# -- sonosynth k8s render keeps to the rules ----------------------------------------------------

@pytest.mark.parametrize("name, schedule, cronjob, expected", [
    ("a" * 48, None, False, "48 characters, over KubeRay's 47 for a RayJob name"),
    ("a" * 37, "0 2 * * *", False, "37 characters, over KubeRay's 36 for a RayCronJob name"),
    ("a" * 42, "0 2 * * *", True, "42 characters, over KubeRay's 41 for the CronJob's name"),
    ("2am-nightly", None, False, "not a DNS-1035 label"),
    ("Nightly", "0 2 * * *", False, "not a DNS-1035 label"),
    ("nightly-", None, False, "not a DNS-1035 label"),
], ids=["rayjob-48", "raycronjob-37", "cronjob-fallback-42", "leading-digit", "uppercase", "trailing-dash"])
def test_render_refuses_a_name_kuberay_refuses(name, schedule, cronjob, expected):
    from sonosynth.infra.config import ConfigError
    from sonosynth.launch.cluster.k8s_render import render

    with pytest.raises(ConfigError, match=expected) as err:
        render("generate_tiny", "generate", name=name, schedule=schedule, cronjob=cronjob)
    assert "Pass a --name of at most" in str(err.value)


@pytest.mark.parametrize("schedule, cronjob, limit", [(None, False, 47), ("0 2 * * *", False, 36),
                                                      ("0 2 * * *", True, 41)],
                         ids=["rayjob", "raycronjob", "cronjob-fallback"])
def test_render_shortens_automatic_names_to_fit(tmp_path, rules, schedule, cronjob, limit):
    from sonosynth.launch.cluster.k8s_render import render

    recipe = tmp_path / "a_recipe_whose_name_goes_on_and_on_well_past_any_limit.yaml"
    recipe.write_text("extends: generate_tiny\nout: s3://sonosynth/synthetic\n")
    docs, _ = render(str(recipe), "generate", schedule=schedule, cronjob=cronjob)
    name = docs[-1]["metadata"]["name"]
    assert len(name) <= limit and name.startswith("generate-a-recipe")
    assert [p for d in docs for p in rules.operator_problems(d)] == []


def test_render_refuses_an_unknown_time_zone_and_an_empty_cluster():
    from sonosynth.infra.config import ConfigError
    from sonosynth.launch.cluster.k8s_render import render

    for cronjob in (False, True):
        with pytest.raises(ConfigError, match="--time-zone 'Mars/Olympus_Mons' is not in the tz database"):
            render("generate_tiny", "generate", schedule="0 2 * * *", time_zone="Mars/Olympus_Mons", cronjob=cronjob)
    with pytest.raises(ConfigError, match="--cluster is empty"):
        render("generate_tiny", "generate", cluster="")


def test_render_cli_exits_2_on_a_bad_name():
    from typer.testing import CliRunner

    from sonosynth.launch.cli.app import app

    res = CliRunner().invoke(app, ["k8s", "render", "generate_tiny", "generate", "--name", "1-bad"])
    assert res.exit_code == 2
    assert "not a DNS-1035 label" in res.output + getattr(res, "stderr", "")
