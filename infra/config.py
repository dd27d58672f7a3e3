"""Typed configuration: one class per component, composed into stage configs.

Every config is a pydantic model whose field docstrings are its documentation
(``sonosynth <stage> --help-config`` prints them). Recipes are YAML files that fill a
stage config; ``--set a.b=value`` overrides any field. Errors name the bad key, where it
came from, and what to write instead.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A recipe, override or flag does not fit the config; the message says the fix."""


OPERATIONAL_FIELDS = ("out", "tracking", "progress", "ray", "storage", "workers", "overwrite",
                      "engine.progress", "engine.loader_workers", "engine.prefetch")
"""Fields that say how or where a job runs, never what it delivers: a pipeline section's key
leaves them out, and a resumed job may change them."""


def is_under(key: str, fields: Iterable[str] = OPERATIONAL_FIELDS) -> bool:
    """Whether the dotted ``key`` is, or lies under, one of ``fields`` (default: the operational ones)."""
    return any(key == f or key.startswith(f + ".") for f in fields)


class Config(BaseModel):
    """Base of every sonosynth config: unknown keys are errors, fields document themselves."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        protected_namespaces=(),
    )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """``{"a.b": value}`` for every leaf: what experiment trackers take as params."""
        return flatten(self.to_dict())

    def content(self) -> dict[str, Any]:
        """``flat()`` without the operational fields: what decides the job's result."""
        return {k: v for k, v in self.flat().items() if not is_under(k)}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _known_keys(cls: type[BaseModel], path: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model at ``path``, for did-you-mean hints."""
    model: Any = cls
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _explain(cls: type[BaseModel], err: ValidationError, source: str) -> ConfigError:
    lines = [f"invalid {cls.__name__} from {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_keys(cls, loc[:-1])
            guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {guess[0]!r}?" if guess else f"known keys: {', '.join(known)}"
            lines.append(f"  {key}: unknown key; {hint}")
        else:
            msg = e["msg"]
            if e["type"].startswith("value_error"):
                msg = msg.removeprefix("Value error, ")
            lines.append(f"  {key}: {msg} (got {e.get('input')!r})")
    return ConfigError("\n".join(lines))


def build(cls: type[C], data: dict[str, Any], source: str = "arguments") -> C:
    """Validate ``data`` into ``cls``; a ConfigError names every bad key and the fix."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise _explain(cls, err, source) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; pass a YAML file path or a recipe name")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"recipe {path}{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values, not {type(data).__name__}")
    return data


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (values parsed as YAML: 1, 0.5, true, [a, b], null)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set shards.max_samples=512")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(tree, key.strip(), value)
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: ``extra`` wins; nested mappings merge key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def describe(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per field: dotted name, type, default and its docstring."""
    lines = []
    for name, field in cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(describe(ann, f"{prefix}{name}."))
            continue
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        default = field.get_default(call_default_factory=True)
        lines.append(f"{prefix}{name} ({type_name}, default {default!r}): {field.description or ''}")
    return lines
