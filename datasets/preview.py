"""A contact sheet of samples with their masks drawn over them, for people to look at."""

from __future__ import annotations

from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from sonosynth.datasets.records import Sample


def overlay(sample: Sample, size: int = 160) -> np.ndarray:
    """RGB tile: the image, the mask's edge in red, its area tinted, the key in the corner."""
    rgb = np.repeat(sample.image[..., None], 3, axis=2).astype(np.float32)
    if sample.mask is not None:
        inside = sample.mask > 127
        rgb[inside] = 0.75 * rgb[inside] + 0.25 * np.array([40, 120, 255])
        edge = inside & ~ndimage.binary_erosion(inside, iterations=max(1, sample.image.shape[0] // 150))
        rgb[edge] = [255, 40, 40]
    tile = Image.fromarray(rgb.astype(np.uint8))
    scale = size / max(tile.size)
    tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))),
                       Image.NEAREST if scale > 1 else Image.BILINEAR)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(tile, ((size - tile.width) // 2, (size - tile.height) // 2))
    label = f"{sample.meta.get('plane') or ''} {sample.meta.get('split') or ''}".strip()
    ImageDraw.Draw(canvas).text((3, 2), label, fill=(255, 255, 0))
    return np.asarray(canvas)


def tile_images(images: list[np.ndarray], cols: int = 8) -> np.ndarray:
    """Equal-sized HxWx3 uint8 images laid out row by row, ``cols`` per row."""
    if not images:
        raise ValueError("no images to tile")
    h, w, _ = images[0].shape
    rows = -(-len(images) // cols)
    sheet = np.zeros((rows * h, min(cols, len(images)) * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    return sheet


def contact_sheet(samples: Iterable[Sample], cols: int = 8, size: int = 160) -> Image.Image:
    tiles = [overlay(s, size) for s in samples]
    if not tiles:
        raise ValueError("no samples to show")
    return Image.fromarray(tile_images(tiles, cols))
