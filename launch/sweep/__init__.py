"""``sonosynth sweep``: one stage over a grid of labelled overrides and seeds, its statistics and its plot."""
