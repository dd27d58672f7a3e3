import subprocess
import sys

import pytest

from sonosynth.trainers.task import TrainTask
from sonosynth.trainers.tasks import get_task, pack_job, register_task, registered_tasks

PLUGIN = '''
from typing import ClassVar
from sonosynth.trainers.config import TrainStageConfig
from sonosynth.trainers.task import TrainTask
from sonosynth.trainers.tasks import register_task


class PluginConfig(TrainStageConfig):
    task: ClassVar[str] = "plugin-test"
    width: int = 3


@register_task("plugin-test")
class PluginTask(TrainTask):
    def describe(self):
        return f"plugin of width {self.cfg.width}"
'''


def test_register_and_find_a_task():
    import sonosynth.trainers.diffusion.train  # noqa: F401 - registers "lora"

    @register_task("unit-a")
    class A(TrainTask):
        pass

    assert get_task("unit-a") is A and "unit-a" in registered_tasks()
    register_task("unit-a", A)  # the same class again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_task("unit-a", type("B", (TrainTask,), {}))
    with pytest.raises(KeyError, match=r"registered: .*lora.*unit-a"):
        get_task("unit-nope")


def test_a_task_from_a_module_the_workers_cannot_import_travels_by_value(tmp_path):
    """What a Ray worker does with the job of a task defined in a test file or a notebook."""
    import importlib.util

    path = tmp_path / "plugin_mod.py"
    path.write_text(PLUGIN)
    spec = importlib.util.spec_from_file_location("plugin_mod", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["plugin_mod"] = module
    try:
        spec.loader.exec_module(module)
        cfg = module.PluginConfig(out="o", width=7)
        (tmp_path / "job.bin").write_bytes(pack_job(cfg))
    finally:
        del sys.modules["plugin_mod"]
    code = ("import sys\n"
            "from sonosynth.trainers.tasks import unpack_job, get_task\n"
            "cfg, task = unpack_job(open(sys.argv[1], 'rb').read())\n"
            "print(type(cfg).__name__, cfg.width, get_task('plugin-test') is task, task(cfg, None).describe())\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "job.bin")], cwd=tmp_path / "..",
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[-2] == "PluginConfig 7 True plugin of width 7"


def test_the_same_task_file_loaded_under_two_module_names_registers_once(tmp_path):
    """A test module imported by two test files (under two names) is still one task."""
    import importlib.util

    path = tmp_path / "twice_mod.py"
    path.write_text(PLUGIN.replace("plugin-test", "twice-test"))
    classes = []
    for name in ("twice_a", "twice_b"):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        classes.append(module.PluginTask)
    assert classes[0] is not classes[1] and get_task("twice-test") is classes[1]
