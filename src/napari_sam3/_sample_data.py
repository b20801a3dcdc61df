"""Synthetic fluorescence-like cell images (numpy + scikit-image only, no downloads)."""

from __future__ import annotations

import numpy as np
from skimage.draw import ellipse
from skimage.filters import gaussian

BACKGROUND = 100.0  # camera offset, in counts


def make_cells_image(
    shape: tuple[int, int] = (512, 768), n_cells: int = 40, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Make a noisy 2D image of elliptical cells and its ground-truth labels.

    Each cell is a dim textured cytoplasm with a brighter off-centre nucleus; the image
    is blurred, shot noise (Poisson) is added on top of a background offset. Cells do
    not overlap; fewer than ``n_cells`` are placed if the image is too crowded.
    Same ``seed`` -> identical output. Returns ``(image uint16, labels int32)`` with
    labels ``1..n`` (0 = background).
    """
    h, w = (int(s) for s in shape)
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.int32)
    signal = np.zeros((h, w), np.float64)
    # cell size scales with the image so small test images still get cells
    r_mean = max(3.0, 0.035 * min(h, w))
    texture = gaussian(rng.standard_normal((h, w)), sigma=2.0)
    texture /= texture.std() or 1.0

    n = 0
    for _ in range(n_cells * 50):
        if n == n_cells:
            break
        ry = r_mean * rng.uniform(0.7, 1.3)
        rx = ry * rng.uniform(1.0, 1.8)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        rot = rng.uniform(-np.pi, np.pi)
        rr, cc = ellipse(cy, cx, ry, rx, shape=(h, w), rotation=rot)
        # keep a one-pixel gap so neighbouring cells never touch
        grown_r, grown_c = ellipse(cy, cx, ry + 2, rx + 2, shape=(h, w), rotation=rot)
        if rr.size < 10 or labels[grown_r, grown_c].any():
            continue
        n += 1
        labels[rr, cc] = n
        brightness = rng.uniform(300, 900)
        signal[rr, cc] = brightness * (1.0 + 0.25 * texture[rr, cc])
        # nucleus: smaller ellipse shifted from the centre, about twice as bright
        shift = 0.2 * ry
        ny, nx = cy + rng.uniform(-shift, shift), cx + rng.uniform(-shift, shift)
        nr, nc = ellipse(ny, nx, 0.5 * ry, 0.5 * rx, shape=(h, w), rotation=rot)
        inside = labels[nr, nc] == n
        signal[nr[inside], nc[inside]] += brightness * rng.uniform(0.8, 1.2)

    signal = gaussian(signal, sigma=1.5, preserve_range=True)
    # uneven illumination: a gentle tilt plus vignetting, within about +-20% of the offset
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    tilt_y, tilt_x = rng.uniform(-0.1, 0.1, 2)
    illumination = 1.0 + tilt_y * yy + tilt_x * xx - 0.05 * (yy**2 + xx**2)
    background = BACKGROUND * illumination
    expected = signal * illumination + background
    image = rng.poisson(expected).astype(np.float64) + rng.normal(0.0, 3.0, (h, w))
    image = np.clip(np.rint(image), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    return image, labels


def sample_cells() -> list[tuple]:
    """npe2 sample data: a synthetic 512 x 768 fluorescence image of cells."""
    image, _ = make_cells_image()
    lo, hi = np.percentile(image, (0.5, 99.9))
    return [(image, {"name": "cells", "contrast_limits": [float(lo), float(hi)]}, "image")]
