"""The quality gate's decisions (launch/quality/gate.py) and the config's errors."""

from __future__ import annotations

import pytest

from sonosynth.infra.config import ConfigError, build
from sonosynth.launch.quality.config import GateConfig, QualityConfig
from sonosynth.launch.quality.gate import evaluate_gate

FIGURES = {"label_fidelity": "model", "label_fidelity_dice_mean": 0.85, "fid_ratio": 1.4}


def test_no_limits_pass():
    gate = evaluate_gate(GateConfig(), {})
    assert gate == {"passed": True, "checks": [], "on_fail": "skip_synthetic",
                    "decision": "no gate limits are set: the synthetic set passes"}


def test_both_limits_met_pass():
    gate = evaluate_gate(GateConfig(label_fidelity_dice_min=0.8, fid_ratio_max=2.0), FIGURES)
    assert gate["passed"] and [c["name"] for c in gate["checks"]] == ["label_fidelity_dice_min", "fid_ratio_max"]
    assert all(c["passed"] for c in gate["checks"]) and gate["decision"].startswith("the synthetic set passes")


def test_low_label_fidelity_fails():
    gate = evaluate_gate(GateConfig(label_fidelity_dice_min=0.9, fid_ratio_max=2.0, on_fail="train_without"),
                         FIGURES)
    assert not gate["passed"] and gate["on_fail"] == "train_without"
    dice, fid = gate["checks"]
    assert not dice["passed"] and dice["value"] == 0.85 and dice["limit"] == 0.9 and fid["passed"]
    assert "label_fidelity_dice_mean 0.85 < 0.9" in gate["decision"]
    assert gate["decision"].endswith("the pipeline trains without the synthetic source")


def test_high_fid_ratio_fails():
    gate = evaluate_gate(GateConfig(fid_ratio_max=1.2), FIGURES)
    assert not gate["passed"] and gate["checks"][0]["value"] == 1.4
    assert "fid_ratio 1.4 > 1.2" in gate["decision"] and "skips the sections" in gate["decision"]


def test_a_limit_on_a_missing_figure_fails_with_the_reason():
    gate = evaluate_gate(GateConfig(label_fidelity_dice_min=0.5), {"label_fidelity": "skipped",
                                                                    "label_fidelity_dice_mean": None})
    assert not gate["passed"] and gate["checks"][0]["value"] is None
    assert "no fidelity.model or fidelity.predictions" in gate["checks"][0]["reason"]
    gate = evaluate_gate(GateConfig(label_fidelity_dice_min=0.5, fid_ratio_max=3.0),
                         {"label_fidelity": "predictions", "label_fidelity_dice_mean": None, "fid_ratio": None})
    assert [c["passed"] for c in gate["checks"]] == [False, False]
    assert "no synthetic pair was scored" in gate["decision"] and "real-vs-real FID is 0" in gate["decision"]


def test_gate_and_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="label_fidelity_dice_min must be in"):
        build(GateConfig, {"label_fidelity_dice_min": 1.5})
    with pytest.raises(ConfigError, match="skip_synthetic"):
        build(GateConfig, {"on_fail": "ignore"})
    with pytest.raises(ConfigError, match="needs features.weights"):
        build(QualityConfig, {"real": {"dataset": "r"}, "synthetic": {"dataset": "s"}, "features": {"kind": "sam"}})
    with pytest.raises(ConfigError, match="not both"):
        build(QualityConfig, {"real": {"dataset": "r"}, "synthetic": {"dataset": "s"},
                              "fidelity": {"model": "m", "predictions": "p"}})
