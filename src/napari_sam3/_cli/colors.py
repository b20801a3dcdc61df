"""napari's colours of label values, for the NGFF ``image-label`` ``colors``.

napari's Labels layers colour ids with ``label_colormap(49, seed=0.5)`` (0 transparent);
the colours are taken from napari itself, so a label image looks the same in napari and
in any NGFF viewer that reads ``colors``. Outside the core: the core never imports napari.
"""

from __future__ import annotations

#: What ``napari.layers.Labels`` uses by default.
NUM_COLORS, SEED = 49, 0.5


def napari_colors(values) -> dict[int, tuple[float, ...]]:
    """``{value: (r, g, b, a)}`` (0-1) for the nonzero label ``values`` (ids or a
    ``{id: ...}`` dict), as a default napari Labels layer shows them."""
    import numpy as np
    from napari.utils.colormaps import label_colormap

    ids = sorted(int(v) for v in values if int(v) != 0)
    if not ids:
        return {}
    cmap = label_colormap(NUM_COLORS, SEED, background_value=0)
    rgba = np.asarray(cmap.map(np.asarray(ids, dtype=np.int64)), dtype=float)
    return {i: tuple(float(c) for c in row) for i, row in zip(ids, rgba, strict=True)}
