"""The contract between ``train-controlnet`` and ``generate`` in mask mode.

A ControlNet sees its mask as diffusers expects a conditioning image: float32 in [0, 1],
three identical channels, 1 inside the filled head and 0 outside, at the sampling
resolution. The trainer and the sampler both call ``mask_to_condition``, so what the model
was trained on is exactly what it is given. The exported folder is what
``ControlNetModel.from_pretrained`` reads (``config.json`` and the safetensors weights)
plus ``lineage.json`` (``LINEAGE_KIND`` under "kind", the base model, resolution, prompt).
"""

from __future__ import annotations

import numpy as np

LINEAGE_KIND = "controlnet"
"""``lineage.json["kind"]`` of an exported ControlNet folder."""
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
"""The weights file ``ControlNetModel.save_pretrained`` writes (safetensors only)."""
CONDITIONING = "filled mask, 1 inside and 0 outside, the same in all three channels"
"""What the conditioning image holds, written to lineage.json."""


def mask_to_condition(mask: np.ndarray, threshold: int = 127) -> np.ndarray:
    """An HxW mask (uint8 0/255, or bool) -> HxWx3 float32 in {0, 1}: the conditioning image.

    Resize the mask to the sampling resolution first (nearest neighbour keeps it binary)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a conditioning mask is HxW; got shape {mask.shape}")
    binary = mask > threshold if mask.dtype != bool else mask
    return np.repeat(binary.astype(np.float32)[:, :, None], 3, axis=2)
