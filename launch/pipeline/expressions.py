"""``${...}`` expressions: references to sections, built-ins, and what a reference to a section
that is not run drops."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable


from sonosynth.infra.config import ConfigError

_REF = re.compile(r"\$\{([^}]*)\}")
BUILTINS = ("out", "shared_data")



class _Drop:
    """A reference to a section that is not run."""


DROP = _Drop()
KEEP = object()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return _REF.findall(node) if isinstance(node, str) else []


def _walk(node: Any, lookup: Callable[[str, str], Any], path: str = "") -> Any:
    """Substitute every ${ref} (``lookup(ref, path)`` -> value, KEEP or DROP), with the DROP rules
    of the module docstring."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            new = _walk(v, lookup, f"{path}.{k}" if path else str(k))
            if new is DROP:
                if isinstance(v, dict):
                    continue
                return DROP
            out[k] = new
        return out
    if isinstance(node, list):
        items = [_walk(v, lookup, f"{path}[{i}]") for i, v in enumerate(node)]
        return [v for v in items if v is not DROP]
    if not isinstance(node, str) or "${" not in node:
        return node
    whole = _REF.fullmatch(node)
    if whole:
        value = lookup(whole.group(1), path)
        return node if value is KEEP else value
    dropped = False

    def repl(m: re.Match) -> str:
        nonlocal dropped
        value = lookup(m.group(1), path)
        if value is DROP:
            dropped = True
            return ""
        return m.group(0) if value is KEEP else str(value)

    text = _REF.sub(repl, node)
    return DROP if dropped else text


def shared_data_dir() -> Path:
    """$SONOSYNTH_SHARED_DATA, else the first existing ../shared/data beside the working folder
    or the checkout (what tests/conftest.py uses)."""
    env = os.environ.get("SONOSYNTH_SHARED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    checkout = next((p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()), None)
    candidates = [Path.cwd().parent / "shared" / "data"]
    if checkout is not None:
        candidates.append(checkout.parent / "shared" / "data")
    return next((c.resolve() for c in candidates if c.is_dir()), candidates[0].resolve())


def _builtin(ref: str, root: str) -> Any:
    if ref == "out":
        return root
    if ref == "shared_data":
        return str(shared_data_dir())
    if ref.startswith("env:"):
        name, _, default = ref[4:].partition("|")
        value = os.environ.get(name)
        if value is None and not _:
            raise ConfigError(f"${{{ref}}}: ${name} is not set; set it, or give a default as ${{env:{name}|value}}")
        return value if value is not None else default
    return KEEP
