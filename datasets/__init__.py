"""Cohort adapters, phantom data, mask geometry, WebDataset shards, manifests and splits.

This folder is importable only as ``sonosynth.datasets``. A top-level folder named
``datasets`` would otherwise shadow HuggingFace ``datasets`` whenever the repository root
is first on ``sys.path`` (running from the checkout, or a Ray job's working dir), so a
plain ``import datasets`` from here hands over to the installed package of that name.
"""

if __name__ != "sonosynth.datasets":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _repo_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _fix = (
        "sonosynth's data code is the package `sonosynth.datasets`: install the project "
        "(`make install`, or `pip install -e .`) and import `sonosynth.datasets`."
    )
    if "." in __name__:
        raise ImportError(f"{__file__} was imported as {__name__!r}. {_fix}")
    _elsewhere = [
        p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _repo_root
    ]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ImportError(
            f"`import {__name__}` found sonosynth's folder {_os.path.dirname(__file__)} and "
            f"no installed package of that name. {_fix}"
        )
    _module = _util.module_from_spec(_spec)
    # The import statement returns whatever sys.modules holds once this file finishes.
    _sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
