"""The ``quality`` stage: score a synthetic set against real data before anything trains on it.

The real set is shuffled (seeded) into two disjoint halves A and B of n = min(len(real) // 2,
len(synthetic)) images; n synthetic images are chosen (seeded). The comparison is A vs the n
synthetic images, the baseline A vs B: the same figures at the same size, so a figure is read
against what two real samples of that size give. Every figure gets a 95% bootstrap interval
(``distances.compare``); ``fid_ratio`` = FID / real-vs-real FID. Label fidelity and mask-shape
statistics come from every pair of both sets (``fidelity``), the gate from the recipe's limits
(``gate``). OUT gets config.yaml, summary.json, per_image.parquet, features_tsne.png and
worst_fidelity.png, all logged to one MLflow run (experiment sonosynth-quality). docs/quality.md
says how to read them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sonosynth.infra.jobdir import claim_output
from sonosynth.infra.seeds import derive_seed
from sonosynth.infra.serialize import json_safe
from sonosynth.infra.stage import Report, UsageError
from sonosynth.infra.storage import open_storage
from sonosynth.launch.quality.config import QualityConfig, QualitySet

EXPERIMENT = "sonosynth-quality"
BULKY = ("shape_stats", "label_fidelity_missing_keys")
"""Summary parts left out of the Report's figures (they stay in summary.json)."""


def _keys(side: QualitySet, name: str, seed: int, storage) -> list[str]:
    from sonosynth.datasets.mix import Manifests, choose

    keys = [row["key"] for row in Manifests(storage).split(side.dataset, side.split)]
    if side.limit is not None and side.limit < len(keys):
        keys = choose(keys, side.limit, seed, f"quality-{name}-limit")
    return sorted(keys)


def _choose(cfg: QualityConfig, real: list[str], synthetic: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(real half A, real half B, synthetic): n each, seeded."""
    from sonosynth.datasets.mix import seeded_order

    n = min(len(real) // 2, len(synthetic))
    if n < 2:
        raise UsageError(f"too few images to compare: {len(real)} real (split {cfg.real.split or 'all'}) and "
                         f"{len(synthetic)} synthetic; the comparison needs at least 4 real and 2 synthetic "
                         "images (n = min(real // 2, synthetic) >= 2); check the datasets and their split")
    order = seeded_order(real, cfg.seed, "quality-real-halves")
    return order[:n], order[n:2 * n], seeded_order(synthetic, cfg.seed, "quality-synthetic")[:n]


def _seed(cfg: QualityConfig, *what: str) -> int:
    return derive_seed("quality", cfg.seed, *what) % 2**32


def feature_figures(cfg: QualityConfig, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> dict[str, Any]:
    """The comparison (A vs synthetic) and the baseline (A vs B), named as summary.json names them."""
    from sonosynth.launch.quality.distances import compare

    boot = {"bootstrap": cfg.bootstrap, "method": cfg.bootstrap_method}
    main = compare(a, s, cfg.metrics, seed=_seed(cfg, "synthetic"), **boot)
    base = compare(a, b, cfg.metrics, seed=_seed(cfg, "real-vs-real"), **boot)
    out: dict[str, Any] = {"nearest_k": main.pop("nearest_k")}
    base.pop("nearest_k")
    out.update(main)
    for name, value in base.items():
        stem, _, rest = name.partition("_")
        if name.startswith("kid_"):  # kid_mean -> kid_real_vs_real_mean, kid_ci -> kid_real_vs_real_ci
            out[f"kid_real_vs_real_{name.removeprefix('kid_')}"] = value
        elif rest == "ci":
            out[f"{stem}_real_vs_real_ci"] = value
        else:
            out[f"{name}_real_vs_real"] = value
    base_fid = out["fid_real_vs_real"]
    out["fid_ratio"] = out["fid"] / base_fid if base_fid and base_fid > 0 else None
    return out


def _warnings(n: int, dim: int, fidelity: dict[str, Any]) -> list[str]:
    notes = []
    if n < dim:
        notes.append(f"n = {n} images per side is below the feature dimension {dim}: the covariances are singular "
                     "and FID is dominated by its small-sample bias; read it only against fid_real_vs_real (the "
                     "ratio), and prefer KID and precision/recall at this size")
    if fidelity["label_fidelity_n"] == 0 and fidelity["label_fidelity"] != "skipped":
        notes.append("label fidelity scored no synthetic pair (no masks, or no prediction for any)")
    if fidelity["label_fidelity_missing"]:
        notes.append(f"{fidelity['label_fidelity_missing']} pairs have no prediction (expected <sample key>.png)")
    return notes


def run(cfg: QualityConfig) -> Report:
    """Score ``cfg.synthetic`` against ``cfg.real``; see the module docstring."""
    from sonosynth.infra.model_registry import is_mlflow_uri
    from sonosynth.launch.quality.collect import read_set
    from sonosynth.launch.quality.distances import bootstrap_mean
    from sonosynth.launch.quality.features import build_extractor
    from sonosynth.launch.quality.fidelity import build_predictor, shape_distances
    from sonosynth.launch.quality.gate import evaluate_gate

    storage = open_storage(cfg.out, cfg.storage)
    claim_output(storage, stage="quality", identity=cfg.job_identity(), config_yaml=cfg.to_yaml(),
                 overwrite=cfg.overwrite)
    real_keys = _keys(cfg.real, "real", cfg.seed, cfg.storage)
    synthetic_keys = _keys(cfg.synthetic, "synthetic", cfg.seed, cfg.storage)
    half_a, half_b, chosen = _choose(cfg, real_keys, synthetic_keys)
    needs_mlflow = any(is_mlflow_uri(u or "") for u in (cfg.features.weights, cfg.fidelity.model))
    tracking_uri = cfg.tracking.resolved_uri() if needs_mlflow else None
    extractor = build_extractor(cfg.features, tracking_uri, cfg.storage)
    built = build_predictor(cfg.fidelity, cfg.storage, tracking_uri, cfg.features.device)
    predictor, fidelity_identity = built if built is not None else (None, None)
    common = dict(worst_cases=cfg.worst_cases, jitter_px=cfg.fidelity.jitter_px, seed=cfg.seed,
                  storage=cfg.storage, progress=cfg.progress)
    real = read_set("real", cfg.real.dataset, real_keys, {**{k: "real_a" for k in half_a},
                                                            **{k: "real_b" for k in half_b}},
                    extractor, predictor, **common)
    synthetic = read_set("synthetic", cfg.synthetic.dataset, synthetic_keys, {k: "synthetic" for k in chosen},
                         extractor, predictor, **common)
    a = np.stack([real.features[k] for k in half_a])
    summary: dict[str, Any] = {"n_real": len(real.rows), "n_synthetic": len(synthetic.rows), "n_compared": len(a),
                               "feature_dim": int(a.shape[1])}
    summary.update(feature_figures(cfg, a, np.stack([real.features[k] for k in half_b]),
                                   np.stack([synthetic.features[k] for k in chosen])))
    summary["fid_reliable"] = len(a) >= a.shape[1]
    dice, dice_ci = bootstrap_mean(synthetic.dice, cfg.bootstrap, _seed(cfg, "dice-synthetic"), cfg.bootstrap_method)
    dice_real, dice_real_ci = bootstrap_mean(real.dice, cfg.bootstrap, _seed(cfg, "dice-real"), cfg.bootstrap_method)
    fidelity = {"label_fidelity": ("skipped" if predictor is None else
                                   "predictions" if cfg.fidelity.predictions else "model"),
                "label_fidelity_dice_mean": dice, "label_fidelity_dice_ci": dice_ci,
                "label_fidelity_dice_mean_real": dice_real, "label_fidelity_dice_real_ci": dice_real_ci,
                "label_fidelity_n": len(synthetic.dice), "label_fidelity_n_real": len(real.dice),
                "label_fidelity_missing": len(synthetic.missing) + len(real.missing),
                "label_fidelity_missing_keys": synthetic.missing + real.missing,
                "label_fidelity_empty_masks": synthetic.empty_masks + real.empty_masks}
    summary.update(fidelity)
    summary.update(shape_distances([r for r in real.rows if r["has_mask"]],
                                   [r for r in synthetic.rows if r["has_mask"]]))
    summary["warnings"] = _warnings(len(a), int(a.shape[1]), fidelity)
    summary.update(features={**extractor.identity, "dim": int(a.shape[1])}, segmenter=fidelity_identity,
                   real=cfg.real.dataset, synthetic=cfg.synthetic.dataset, bootstrap=cfg.bootstrap,
                   bootstrap_method=cfg.bootstrap_method, seed=cfg.seed)
    summary["gate"] = evaluate_gate(cfg.gate, summary)
    summary = json_safe(summary)
    with tempfile.TemporaryDirectory(prefix="sonosynth-quality-") as tmp:
        files = _write(cfg, summary, real, synthetic, (a, half_b, chosen), Path(tmp))
        for path in files:
            storage.put_file(path.name, path)
        tracking = _track(cfg, summary, files)
    return _report(cfg, storage.url("").rstrip("/"), summary, [p.name for p in files], tracking)


def _write(cfg: QualityConfig, summary: dict[str, Any], real, synthetic, compared, folder: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sonosynth.launch.quality.plots import features_tsne, worst_fidelity

    a, half_b, chosen = compared
    files = [folder / "summary.json", folder / "per_image.parquet"]
    files[0].write_text(json.dumps(summary, indent=1, allow_nan=False))
    pq.write_table(pa.Table.from_pylist([json_safe(r) for r in real.rows + synthetic.rows]), files[1])
    files.append(features_tsne({"real A": a, "real B": np.stack([real.features[k] for k in half_b]),
                                "synthetic": np.stack([synthetic.features[k] for k in chosen])},
                               folder / "features_tsne.png", seed=cfg.seed))
    if summary["label_fidelity"] != "skipped" and cfg.worst_cases:
        # the synthetic pairs; the real ones when no synthetic pair was scored
        files.append(worst_fidelity(synthetic.worst or real.worst, folder / "worst_fidelity.png"))
    return files


def _track(cfg: QualityConfig, summary: dict[str, Any], files: list[Path]) -> dict[str, Any]:
    from sonosynth.launch.evaluate.tracking import track

    metrics: dict[str, float] = {}
    for name, value in summary.items():
        if isinstance(value, bool):
            metrics[name] = float(value)
        elif isinstance(value, (int, float)):
            metrics[name] = float(value)
        elif name.endswith("_ci") and isinstance(value, list):
            metrics[f"{name}_low"], metrics[f"{name}_high"] = float(value[0]), float(value[1])
    metrics["gate_passed"] = float(summary["gate"]["passed"])
    tags = {"sonosynth.real": cfg.real.dataset, "sonosynth.synthetic": cfg.synthetic.dataset,
            "sonosynth.gate": "passed" if summary["gate"]["passed"] else "failed"}
    return track(cfg, metrics, files, tags, stage="quality", experiment=EXPERIMENT)


def _fmt(value: Any, ci: Any = None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.4g}"
    return text + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")


def _report(cfg: QualityConfig, out: str, summary: dict[str, Any], names: list[str],
            tracking: dict[str, Any]) -> Report:
    s = summary
    lines = [f"compared {s['n_compared']} synthetic with {s['n_compared']} real images ({s['n_real']} real, "
             f"{s['n_synthetic']} synthetic read; baseline: two real halves of {s['n_compared']}), "
             f"features {s['features']['kind']} (d = {s['feature_dim']})",
             f"  FID {_fmt(s['fid'], s['fid_ci'])} vs real-vs-real "
             f"{_fmt(s['fid_real_vs_real'], s['fid_real_vs_real_ci'])}: ratio {_fmt(s['fid_ratio'])}",
             f"  KID {_fmt(s['kid_mean'], s['kid_ci'])} vs real-vs-real "
             f"{_fmt(s['kid_real_vs_real_mean'], s['kid_real_vs_real_ci'])}",
             "  " + ", ".join(f"{n} {_fmt(s[n])} (real {_fmt(s[n + '_real_vs_real'])})"
                              for n in ("precision", "recall", "density", "coverage"))]
    if s["label_fidelity"] == "skipped":
        lines.append("  label fidelity: skipped (no fidelity.model or fidelity.predictions)")
    else:
        lines.append(f"  label fidelity Dice {_fmt(s['label_fidelity_dice_mean'], s['label_fidelity_dice_ci'])} "
                     f"over {s['label_fidelity_n']} synthetic pairs (real pairs "
                     f"{_fmt(s['label_fidelity_dice_mean_real'])} over {s['label_fidelity_n_real']})")
    lines.append(f"  shape distance {_fmt(s['shape_distance'])}")
    lines += [f"  WARNING: {note}" for note in s["warnings"]]
    if tracking.get("offline"):
        lines.append("warning: MLflow was unreachable; see tracking-offline/ and `sonosynth tracking-replay`")
    lines.append(f"gate {'passed' if s['gate']['passed'] else 'failed'}: {s['gate']['decision']}")
    outputs = {"summary": f"{out}/summary.json", "per_image": f"{out}/per_image.parquet",
               "tsne": f"{out}/features_tsne.png"}
    if "worst_fidelity.png" in names:
        outputs["worst"] = f"{out}/worst_fidelity.png"
    outputs["config"] = f"{out}/config.yaml"
    return Report(stage="quality", out=out, text="\n".join(lines), tracking=tracking,
                  figures={k: v for k, v in summary.items() if k not in BULKY}, outputs=outputs)


__all__ = ["QualityConfig", "run"]
