"""Recipes: YAML files that fill a stage config, found by path or by name in configs/.

A recipe holds plain values (strings, numbers, booleans, lists, mappings): it is read with
YAML's safe loader, and a YAML tag (``!!python/object/apply:...``, ``!custom``) is refused
with an error naming the file and line before anything is built from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from sonosynth.infra.config import Config, ConfigError, apply_overrides, build, load_yaml, merge

C = TypeVar("C", bound=Config)


def packaged_recipes() -> Path | None:
    """The recipes installed with the package (the repo's configs/ in an editable install)."""
    from importlib import resources

    try:
        folder = resources.files("sonosynth.configs")
    except ModuleNotFoundError:
        return None
    path = Path(str(folder))
    return path if path.is_dir() else None


def recipe_names() -> list[str]:
    folder = packaged_recipes()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for folder in (Path.cwd() / "configs", packaged_recipes()):
        if folder is None:
            continue
        for candidate in (folder / name_or_path, folder / f"{name_or_path}.yaml"):
            if candidate.is_file():
                return candidate
    known = recipe_names()
    raise ConfigError(f"no recipe {name_or_path!r}: pass a YAML path or one of {', '.join(known) or '(none)'}")


def refuse_tags(path: Path) -> None:
    """A ConfigError naming the file and line of the first YAML tag in recipe ``path``, if any."""
    try:
        tokens = list(yaml.scan(path.read_text(), Loader=yaml.SafeLoader))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # load_yaml says what is wrong with the file
    for token in tokens:
        if isinstance(token, yaml.TagToken):
            handle, suffix = token.value
            raise ConfigError(f"recipe {path}, line {token.start_mark.line + 1}: the YAML tag {handle or ''}{suffix} "
                              "is not allowed; a recipe holds plain values (strings, numbers, booleans, lists, "
                              "mappings): remove the tag")


def load_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's mapping, with ``extends: other_recipe`` merged underneath it."""
    if path.resolve() in seen:
        raise ConfigError(f"recipe {path} extends itself (through {' -> '.join(str(p) for p in seen)})")
    if path.is_file():
        refuse_tags(path)
    data = load_yaml(path)
    parent = data.pop("extends", None)
    if parent:
        base = find_recipe(str(parent)) if not (path.parent / str(parent)).is_file() else path.parent / str(parent)
        data = merge(load_recipe(base, seen + (path.resolve(),)), data)
    return data


def prune(tree: dict[str, Any]) -> dict[str, Any]:
    """Drop unset (None) flags at every depth, and sections left empty."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = prune(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def resolve(cls: type[C], recipe: str | None, flags: dict[str, Any], overrides: Iterable[str]) -> C:
    """defaults < recipe < command-line flags < --set overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if recipe:
        path = find_recipe(recipe)
        data, source = load_recipe(path), str(path)
    data = merge(data, prune(flags))
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + --set " + " ".join(overrides)
    return build(cls, data, source)
