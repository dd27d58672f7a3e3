"""Mask-conditioned generation: a diffusers ControlNet trained on filled head masks.

``conditioning`` holds the one contract the trainer and the sampler share: how a mask
becomes the ControlNet's conditioning image, and the names of the exported files. The
``train-controlnet`` stage lives in ``train``. Imports are lazy: importing this package
does not load torch."""
