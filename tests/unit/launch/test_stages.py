from sonosynth.infra.config import Config
from sonosynth.infra.stage import Report
from sonosynth.launch.stages import STAGES, training_report


def test_every_stage_resolves_to_a_config_class_and_a_run_function():
    for name, stage in STAGES.items():
        cls, run = stage.load()
        assert issubclass(cls, Config) and callable(run), name
        assert cls.model_fields["out"].description, f"{name}: out has no docstring"


def test_ingest_stage_returns_a_report_with_outputs_and_figures(tmp_path):
    stage = STAGES["ingest"]
    cfg = stage.config_class.model_validate({"cohort": {"name": "phantom", "phantom": {"num": 3}},
                                             "out": str(tmp_path / "ds"), "progress": False})
    report = stage.run(cfg)
    assert isinstance(report, Report) and report.failed is None
    assert report.figures["ingested"] == 3 and report.outputs["manifest"].endswith("manifest.parquet")
    assert "ingested 3 samples" in report.render()


def test_training_report_reads_a_summary():
    summary = {"steps": 10, "examples": 4, "workers": 2, "eval_start": {"eval/loss": 1.0},
               "eval_end": {"eval/loss": 0.5}, "model": "/x/out/model", "best": {"metric": "val/dice",
               "value": 0.9, "step": 5}, "mlflow": {"run_id": "r", "uri": "u", "registered_model": "m",
                                                   "version": "3"}}
    r = training_report("train-lora", summary)
    assert r.out == "/x/out" and r.outputs["model"] == "/x/out/model"
    text = r.render()
    assert "eval/loss: 1.0000 -> 0.5000" in text and "best val/dice = 0.9000 at step 5" in text
    assert "registered: m version 3" in text


def test_demo_is_the_demo_pipeline_recipe(tmp_path):
    from sonosynth.launch.pipeline import resolve_pipeline
    from sonosynth.launch.stages import get_stage

    cfg = resolve_pipeline("demo", {"out": str(tmp_path)}, ["real.cohort.phantom.num=5"])
    assert get_stage("pipeline").config_class is type(cfg) and cfg.out == str(tmp_path)
    assert list(cfg.stages)[:4] == ["real", "hc18", "lora", "synthetic"]
    assert cfg.stages["real"]["cohort"]["phantom"]["num"] == 5
    assert cfg.stages["lora"]["data"]["dataset"] == "${real.out}"
    assert cfg.stages["synthetic"]["sampler"]["lora"] == "${lora.outputs.model}"
