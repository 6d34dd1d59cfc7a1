"""The picture grid of the quality task: seams are judged by eye, not by a number.

One row per seed: the single-device image, each variant's image, then each variant's absolute
difference from the single-device image (mean over colour channels), multiplied by `amplify`
so that a one-step-stale error is visible; small images are enlarged (nearest neighbour) so
that a patch boundary stays a sharp line.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

MIN_TILE = 192  # pixels: small images are enlarged to at least this width
LABEL_HEIGHT = 16


def save_grid(path: Path, references: list[torch.Tensor], variants: dict[str, list[torch.Tensor]],
              amplify: float) -> Path:
    """Write the grid of (1, 3, H, W) images in [0, 1] to `path` (PNG) and return it."""
    labels = ["single device", *variants, *(f"|{name} - single| x{amplify:g}" for name in variants)]
    rows = []
    for i, ref in enumerate(references):
        ref = ref.float().cpu()
        images = [variants[name][i].float().cpu() for name in variants]
        diffs = [((image - ref).abs().mean(dim=1, keepdim=True) * amplify).clamp(0, 1).expand_as(ref)
                 for image in images]
        rows.append([ref, *images, *diffs])
    height, width = references[0].shape[-2:]
    scale = max(1, -(-MIN_TILE // width))
    tile_h, tile_w = height * scale, width * scale
    grid = Image.new("RGB", (tile_w * len(labels), LABEL_HEIGHT + tile_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(labels):
        draw.text((c * tile_w + 2, 2), label, fill="black")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            pixels = (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(pixels).resize((tile_w, tile_h), Image.NEAREST)
            grid.paste(tile, (c * tile_w, LABEL_HEIGHT + r * tile_h))
    grid.save(path)
    return path
