"""The task registry: a task's name -> its ``TrainTask`` class, and how a job ships to workers.

A stage config names its task by a class variable (``task: ClassVar[str] = "lora"``), and
the config refuses to build when no task of that name is registered, listing the ones that
are. A task registers itself where it is defined::

    @register_task("toy")
    class ToyTask(TrainTask): ...

The built-in tasks register when their module is imported (``sonosynth.trainers.diffusion.train``
registers "lora"; importing a stage config imports its task too).

``pack_job`` turns (config class, task class, config values) into bytes for the Ray workers.
Classes from ``sonosynth`` travel by reference (the workers have the package); classes from
any other module (a test, a notebook, a plugin not installed on the cluster) travel by value
with cloudpickle, so a task defined in a test file trains on real workers.
"""

from __future__ import annotations

from typing import Any, Callable

_TASKS: dict[str, type] = {}


def register_task(name: str, task_cls: type | None = None) -> Callable[[type], type] | type:
    """Register ``task_cls`` under ``name``; without ``task_cls``, a class decorator.

    Registering the same class again (or a copy of it: the same name from the same source
    file, e.g. a test module loaded twice under two names) is a no-op; a different class
    under a taken name is an error."""

    def add(cls: type) -> type:
        old = _TASKS.get(name)
        if old is not None and old is not cls and _origin(old) != _origin(cls):
            raise ValueError(f"task {name!r} is already registered as {_qualname(old)}; "
                             f"pick another name for {_qualname(cls)}")
        _TASKS[name] = cls
        return cls

    return add if task_cls is None else add(task_cls)


def get_task(name: str) -> type:
    """The task class registered under ``name``; the error lists the registered names."""
    if name not in _TASKS:
        raise KeyError(unknown_task_message(name))
    return _TASKS[name]


def registered_tasks() -> list[str]:
    return sorted(_TASKS)


def unknown_task_message(name: str) -> str:
    known = ", ".join(registered_tasks()) or "none"
    return (f"no training task is registered as {name!r} (registered: {known}); import the module that "
            f"defines it (its class is decorated with @register_task({name!r})) before building the config")


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _origin(cls: type) -> tuple[str, str]:
    """(source file, qualified name): what makes two class objects the same class. The file
    comes from the class's own functions, since a module loaded from a path under another
    name (tests do this) may not be in ``sys.modules``."""
    for value in vars(cls).values():
        code = getattr(value, "__code__", None) or getattr(getattr(value, "__func__", None), "__code__", None)
        if code is not None:
            return code.co_filename, cls.__qualname__
    return cls.__module__, cls.__qualname__


def pack_job(cfg: Any) -> bytes:
    """(config class, task class, config values) as bytes, for ``unpack_job`` on a worker."""
    import sys

    from ray import cloudpickle

    task_cls = get_task(type(cfg).task)
    by_value = []
    for cls in (type(cfg), task_cls):
        module = sys.modules.get(cls.__module__)
        if (module is not None and cls.__module__ != "__main__" and not cls.__module__.startswith("sonosynth.")
                and cls.__module__ not in cloudpickle.list_registry_pickle_by_value()):
            cloudpickle.register_pickle_by_value(module)
            by_value.append(module)
    try:
        return cloudpickle.dumps((type(cfg), task_cls, cfg.to_dict()))
    finally:
        for module in by_value:
            cloudpickle.unregister_pickle_by_value(module)


def unpack_job(blob: bytes) -> tuple[Any, type]:
    """(config, task class) from ``pack_job``'s bytes; registers the task in this process."""
    import pickle

    config_cls, task_cls, values = pickle.loads(blob)
    register_task(config_cls.task, task_cls)
    return config_cls.model_validate(values), task_cls
