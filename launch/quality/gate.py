"""The quality gate: the recipe's limits checked against the figures, and the decision in one sentence.

The stage reports the gate (summary.json ``gate``) and exits 0 either way; a pipeline acts on a
failed gate (``launch/pipeline/gate.py``). A limit whose figure was not measured (e.g. no
segmenter for label fidelity) fails with that reason.
"""

from __future__ import annotations

from typing import Any

from sonosynth.launch.quality.config import GateConfig

LIMITS = (
    # (limit field, figure, passes when the figure is ..., what is missing when it is None)
    ("label_fidelity_dice_min", "label_fidelity_dice_mean", "min", "no synthetic pair was scored for label fidelity"),
    ("fid_ratio_max", "fid_ratio", "max", "the FID ratio could not be computed (real-vs-real FID is 0)"),
)
ACTIONS = {"skip_synthetic": "the pipeline skips the sections that read the synthetic set",
           "train_without": "the pipeline trains without the synthetic source"}


def evaluate_gate(gate: GateConfig, figures: dict[str, Any]) -> dict[str, Any]:
    """``{"passed", "checks": [{"name", "value", "limit", "passed", "reason"}], "on_fail", "decision"}``."""
    checks = []
    for name, figure, kind, missing in LIMITS:
        limit = getattr(gate, name)
        if limit is None:
            continue
        value = figures.get(figure)
        if value is None:
            if figure == "label_fidelity_dice_mean" and figures.get("label_fidelity") in (None, "skipped"):
                missing = "label fidelity was not measured (no fidelity.model or fidelity.predictions)"
            checks.append({"name": name, "value": None, "limit": limit, "passed": False, "reason": missing})
            continue
        ok = value >= limit if kind == "min" else value <= limit
        sign = (">=" if ok else "<") if kind == "min" else ("<=" if ok else ">")
        checks.append({"name": name, "value": value, "limit": limit, "passed": bool(ok),
                       "reason": f"{figure} {value:.4g} {sign} {limit:g}"})
    passed = all(c["passed"] for c in checks)
    if not checks:
        decision = "no gate limits are set: the synthetic set passes"
    elif passed:
        decision = f"the synthetic set passes ({'; '.join(c['reason'] for c in checks)})"
    else:
        failed = "; ".join(c["reason"] for c in checks if not c["passed"])
        decision = f"the synthetic set fails ({failed}): {ACTIONS[gate.on_fail]}"
    return {"passed": passed, "checks": checks, "on_fail": gate.on_fail, "decision": decision}
