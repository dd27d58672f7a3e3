"""Every job of every manifest runs a CLI verb that exists with a recipe that exists.

A RayJob's entrypoint is checked nowhere before it runs on the cluster: a renamed verb or a
recipe missing from the image fails only at 2 a.m. Here every entrypoint (the overlays'
RayCronJob, the fallback's RayJob kept in a ConfigMap, k8s/jobs/, `k8s render` outputs) must
name a job verb (`sonosynth.launch.cluster.submit.job_verbs()`, the pipeline included) and a recipe
shipped in configs/ (or, for `python -m sonosynth.launch.cluster.submit`, one embedded in the job's
runtime env), and a pipeline's recipe must resolve with the job's overrides as `sonosynth
pipeline` resolves it.
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

SUBMIT = ["python", "-m", "sonosynth.launch.cluster.submit"]


def job_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, RayJob spec) of every job in DOC."""
    where = f"{doc['kind']} {doc['metadata'].get('name') or doc['metadata'].get('generateName')}"
    if doc["kind"] == "RayJob":
        yield where, doc["spec"]
    elif doc["kind"] == "RayCronJob":
        yield where, doc["spec"]["jobTemplate"]
    elif doc["kind"] == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            for inner in yaml.safe_load_all(text) if key.endswith(".yaml") else []:
                yield from ((f"{where} {key}: {w}", s) for w, s in job_specs(inner))


def entrypoint_problems(spec: dict[str, Any]) -> list[str]:
    from sonosynth.launch.recipes import recipe_names
    from sonosynth.launch.cluster.submit import RECIPE_ENV, job_verbs

    argv = shlex.split(spec.get("entrypoint", ""))
    if argv[:1] == ["sonosynth"]:
        args, embedded = argv[1:], None
    elif argv[:3] == SUBMIT:
        args = argv[3:]
        env = (yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}).get("env_vars") or {}
        embedded = env.get(RECIPE_ENV, "")
    else:
        return [f"{spec.get('entrypoint')!r} runs neither `sonosynth VERB` nor `{shlex.join(SUBMIT)} VERB`"]
    if len(args) < 2:
        return [f"{spec['entrypoint']!r} names no verb and recipe"]
    verb, recipe, rest = args[0], args[1], args[2:]
    overrides = [rest[i + 1] for i in range(len(rest) - 1) if rest[i] == "--set"]
    problems = []
    if verb not in set(job_verbs()) | {"pipeline"}:
        problems.append(f"verb {verb!r} is not one a job can run ({', '.join(job_verbs())})")
    if embedded is None and recipe not in recipe_names():
        problems.append(f"recipe {recipe!r} is not shipped in configs/ (the image has {len(recipe_names())})")
    if embedded is not None and not isinstance(yaml.safe_load(embedded or "null"), dict):
        problems.append(f"recipe {recipe!r} is not embedded in the job's runtimeEnvYAML ({RECIPE_ENV})")
    if verb == "pipeline" and not problems:
        problems += pipeline_problems(recipe, embedded, overrides)
    return problems


def pipeline_problems(recipe: str, embedded: str | None, overrides: list[str]) -> list[str]:
    from sonosynth.infra.config import ConfigError
    from sonosynth.launch.pipeline import resolve_pipeline

    with tempfile.TemporaryDirectory() as folder:
        if embedded is not None:
            recipe = str(Path(folder) / Path(recipe).name)
            Path(recipe).write_text(embedded)
        try:
            resolve_pipeline(recipe, {}, overrides)
        except ConfigError as err:
            return [f"the pipeline does not resolve: {err}"]
    return []


def test_every_entrypoint_names_a_verb_and_a_recipe_that_exist(manifests):
    problems, seen = {}, 0
    for label, docs in manifests.items():
        for doc in docs:
            for where, spec in job_specs(doc):
                seen += 1
                problems.update({f"{label}: {where}": p for p in [entrypoint_problems(spec)] if p})
    assert problems == {}
    assert seen >= len(manifests)  # every source holds at least one job


@pytest.mark.parametrize("entrypoint, expected", [
    ("sonosynth generate no_such_recipe", "recipe 'no_such_recipe' is not shipped"),
    ("sonosynth generat generate_cluster", "verb 'generat' is not one a job can run"),
    ("sonosynth pipeline nightly_heads --set nope=1", "the pipeline does not resolve"),
    ("sonosynth pipeline nightly_heads --set from_stage=nope", "the pipeline does not resolve"),
    ("python -m sonosynth.launch.cluster.submit train-lora my_lora.yaml", "is not embedded"),
    ("bash -c 'sonosynth generate generate_cluster'", "runs neither"),
], ids=["unknown-recipe", "unknown-verb", "pipeline-bad-key", "pipeline-bad-from-stage", "recipe-not-embedded",
        "not-a-sonosynth-verb"])
def test_a_broken_entrypoint_is_reported(entrypoint, expected):
    spec = {"clusterSelector": {"ray.io/cluster": "sonosynth"}, "entrypoint": entrypoint}
    problems = entrypoint_problems(spec)
    assert any(expected in p for p in problems), problems


def test_an_embedded_recipe_is_checked_as_the_job_would_read_it(tmp_path):
    from sonosynth.launch.cluster.k8s_render import render

    recipe = tmp_path / "my_nightly.yaml"
    recipe.write_text("extends: nightly_heads_tiny\nout: s3://sonosynth/nightly-mine\n")
    (doc,), _ = render(str(recipe), "pipeline", ["lora.engine.max_steps=5"])
    assert shlex.split(doc["spec"]["entrypoint"])[:5] == [*SUBMIT, "pipeline", "my_nightly.yaml"]
    assert entrypoint_problems(doc["spec"]) == []
    broken = {**doc["spec"], "entrypoint": doc["spec"]["entrypoint"] + " --set only=nope"}
    assert any("does not resolve" in p for p in entrypoint_problems(broken))
