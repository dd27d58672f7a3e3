"""The stage's two pictures: a t-SNE map of real and synthetic features (as FU-LoRA shows), and the
pairs with the worst label fidelity (mask green, prediction red, box prompt yellow).

Plain matplotlib Figures rendered by Agg: no pyplot, no global backend switch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WorstEntry = tuple[float, int, str, str, np.ndarray]
"""(-dice, order, key, set name, overlay RGB): a heap entry, the lowest Dice on top of a max-heap."""


def tsne_perplexity(n: int) -> float:
    """scikit-learn's default (30) where n allows, else about n / 3 (it must stay below n)."""
    return float(max(1.0, min(30.0, (n - 1) / 3)))


def features_tsne(groups: dict[str, np.ndarray], path: Path, seed: int = 0) -> Path:
    """A 2-D t-SNE of the features of every group ({label: [n, d]}), one colour per group."""
    from matplotlib.figure import Figure
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    groups = {label: f for label, f in groups.items() if len(f)}
    features = np.concatenate(list(groups.values()))
    n = len(features)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    if n >= 3:
        scaled = StandardScaler().fit_transform(features)
        # exact gradients are faster than Barnes-Hut for a few hundred points
        xy = TSNE(n_components=2, perplexity=tsne_perplexity(n), init="pca", random_state=seed,
                  method="exact" if n <= 300 else "barnes_hut").fit_transform(scaled)
        start = 0
        for (label, f), marker in zip(groups.items(), ("o", "s", "^", "D")):
            ax.scatter(xy[start:start + len(f), 0], xy[start:start + len(f), 1], s=14, alpha=0.7, marker=marker,
                       label=f"{label} ({len(f)})")
            start += len(f)
        ax.legend(loc="best", fontsize=8)
        ax.set_title(f"t-SNE of the features (perplexity {tsne_perplexity(n):.1f})", fontsize=9)
    else:
        ax.text(0.5, 0.5, f"{n} feature vectors: too few for t-SNE", ha="center", va="center")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def worst_fidelity(worst: list[WorstEntry], path: Path) -> Path:
    """A grid of the lowest-Dice pairs (lowest first) with the key, the set and the Dice."""
    from sonosynth.trainers.evaluation.segmentation import overlay_grid

    worst = sorted(worst, key=lambda w: -w[0])
    return overlay_grid([(rgb, f"{key} ({which})\nDice {-neg:.3f}") for neg, _, key, which, rgb in worst],
                        "lowest label fidelity: mask green, segmenter red, box prompt yellow", path,
                        empty="no pair was scored")
