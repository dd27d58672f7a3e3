"""Nothing unpickles untrusted data: every ``torch.load`` passes ``weights_only=True``, nothing
calls ``pickle.load(s)`` (but the one reviewed place below), and YAML is read with ``safe_load``
only. An AST scan of every Python file of the package folders and bench/ names file:line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("src", "datasets", "trainers", "launch", "infra", "bench")

TORCH_LOADS = {"torch.load", "torch.serialization.load"}
PICKLE_LOADS = {f"{m}.{f}" for m in ("pickle", "cPickle", "_pickle", "cloudpickle", "ray.cloudpickle", "dill", "joblib")
                for f in ("load", "loads", "Unpickler")} | {"pandas.read_pickle"}
YAML_UNSAFE = {f"yaml.{n}" for n in ("load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all",
                                    "Loader", "UnsafeLoader", "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader")}
ALLOWED = {
    ("trainers/tasks.py", "pickle.loads"):
        "unpack_job: the (config class, task class, values) the driver itself pickled for its Ray workers "
        "(pack_job), never bytes read from storage or a download",
}
"""(file, call) pairs reviewed as safe, each with its reason."""


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from every import (``import torch as T``, ``from torch import load``)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def _is_true(call: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords)


def unsafe_uses(source: str, filename: str) -> list[str]:
    """'file:line: what' for each unsafe load in ``source``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            if name in TORCH_LOADS and not _is_true(node, "weights_only"):
                found.append((node.lineno, f"{name}(...) without weights_only=True (it would unpickle the file)"))
            elif name in PICKLE_LOADS and (filename, name) not in ALLOWED:
                found.append((node.lineno, f"{name}(...) unpickles its input; load safetensors, JSON or "
                                           "torch.load(..., weights_only=True)"))
            elif name in ("numpy.load", "np.load") and _is_true(node, "allow_pickle"):
                found.append((node.lineno, "numpy.load(..., allow_pickle=True) unpickles its input"))
        if isinstance(node, (ast.Attribute, ast.Name)) and isinstance(getattr(node, "ctx", None), ast.Load):
            name = _dotted(node, aliases)
            if name in YAML_UNSAFE:
                found.append((node.lineno, f"{name}: read YAML with yaml.safe_load (or SafeLoader) only"))
        if isinstance(node, ast.ImportFrom) and node.module == "yaml":
            for a in node.names:
                if f"yaml.{a.name}" in YAML_UNSAFE:
                    found.append((node.lineno, f"from yaml import {a.name}: read YAML with yaml.safe_load only"))
    return [f"{filename}:{line}: {what}" for line, what in sorted(set(found))]


def python_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py") if ".venv" not in p.parts)


def test_no_code_unpickles_untrusted_data():
    files = python_files()
    assert len(files) > 50, f"found only {len(files)} Python files under {FOLDERS}: is the scan looking in the repo?"
    problems = [p for f in files for p in unsafe_uses(f.read_text(), f.relative_to(REPO).as_posix())]
    assert not problems, "unsafe loading (pass weights_only=True, or load safetensors / yaml.safe_load):\n" + \
        "\n".join(problems)


def test_the_allowed_places_still_exist():
    for (file, call), why in ALLOWED.items():
        assert call.rsplit(".", 1)[-1] in (REPO / file).read_text(), f"{file} no longer calls {call}: drop it ({why})"


BAD = '''
import torch, yaml, pickle
import torch as T
from torch import load as tload
from yaml import Loader
torch.load(path)
T.load(path, map_location="cpu")
tload(path, weights_only=False)
torch.load(path, weights_only=flag)
torch.serialization.load(path, **kw)
pickle.loads(blob)
yaml.load(text)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.unsafe_load(text)
yaml.load_all(text, yaml.FullLoader)
'''
GOOD = '''
import torch, yaml, json
torch.load(path, map_location="cpu", weights_only=True)
yaml.safe_load(text)
yaml.safe_dump(data)
yaml.load = None
json.loads(text)
model.load(path)
'''


def test_the_scan_finds_every_kind_of_unsafe_load():
    found = unsafe_uses(BAD, "x.py")
    lines = sorted({int(p.split(":")[1]) for p in found})
    assert lines == list(range(5, 16)), "\n".join(found)
    assert "x.py:6: torch.load(...) without weights_only=True (it would unpickle the file)" in found
    assert any(p.startswith("x.py:5:") and "from yaml import Loader" in p for p in found)
    assert any(p.startswith("x.py:15:") and "yaml.FullLoader" in p for p in found)
    assert unsafe_uses(GOOD, "y.py") == []


@pytest.mark.parametrize("file, call", list(ALLOWED))
def test_an_allowed_call_is_flagged_anywhere_else(file, call):
    source = f"import {call.rsplit('.', 1)[0]}\n{call}(blob)\n"
    assert unsafe_uses(source, file) == [] and len(unsafe_uses(source, "elsewhere.py")) == 1
