"""``sonosynth quality``: feature-space figures and label fidelity of a synthetic set against real data."""
