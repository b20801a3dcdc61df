"""What ``Sam3Segmenter`` does with the mask decoder's output: upsampled logits cut to
each object's part of the image, as :class:`ObjectMask` (NumPy out; torch lazily).

On the CPU the kept low-resolution masks are upsampled there. On CUDA/MPS they are
upsampled on the device, each object's box found there, and only that crop is copied
to the host (a 1008 px tile of float32 logits is 4 MB; a cell is a few KB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checks import cleanup_areas, label_ids, labels_shape
from .postprocess import mask_box
from .prompts import as_prompts


@dataclass
class ObjectMask:
    """One object's result on a large image: logits over ``region`` of the image."""

    region: tuple[slice, slice]
    logits: np.ndarray  # float32, shape of the region; the mask is logits > 0
    iou_score: float
    object_score: float
    tile: tuple[int, int, int, int] | None = None  # (r0, c0, r1, c1) decoded in; None: untiled

    def shifted(self, row0: int, col0: int, tile=None) -> ObjectMask:
        """The same object with its region moved by (row0, col0), e.g. tile -> image."""
        rows, cols = self.region
        return ObjectMask((slice(rows.start + row0, rows.stop + row0),
                           slice(cols.start + col0, cols.stop + col0)),
                          self.logits, self.iou_score, self.object_score,
                          self.tile if tile is None else tuple(tile))


def upsample(processor, masks, shape):
    """(N, 1, h, w) low-resolution logits -> (N, H, W) float32 at ``shape``, by the
    processor's ``post_process_masks`` (bilinear), on the tensor's device."""
    import torch

    with torch.inference_mode():
        return processor.post_process_masks([masks.float()], [list(shape)], binarize=False
                                            )[0][:, 0]


def host_crops(up, valid, crop: bool) -> list:
    """``(region, logits)`` per object of an (N, H, W) CPU batch, cut to the ``valid``
    (h, w) part and with ``crop`` to the mask's box. Copies, so the batch can be freed;
    a batch of one object whole is its own result (no copy)."""
    h, w = valid
    logits = up.numpy()
    out = []
    for lg in logits[:, :h, :w]:
        region = mask_box(lg > 0) if crop else (slice(0, h), slice(0, w))
        whole = len(logits) == 1 and lg[region].shape == logits.shape[1:]
        out.append((region, lg[region] if whole else np.array(lg[region], dtype=np.float32)))
    return out


def device_crops(up, valid, crop: bool) -> list:
    """:func:`host_crops` for a batch on a CUDA/MPS device: the boxes are found there
    and only each object's crop is copied to the host (the same values)."""
    h, w = valid
    up = up[:, :h, :w]
    out = []
    for lg in up:
        if crop:  # only the rows and columns that hold the mask come to the host
            fg = lg > 0
            rows = np.flatnonzero(fg.any(dim=1).cpu().numpy())
            if rows.size == 0:
                out.append(((slice(0, 0), slice(0, 0)), np.zeros((0, 0), np.float32)))
                continue
            cols = np.flatnonzero(fg.any(dim=0).cpu().numpy())
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            c0, c1 = int(cols[0]), int(cols[-1]) + 1
        else:
            r0, r1, c0, c1 = 0, h, 0, w
        region = (slice(r0, r1), slice(c0, c1))
        out.append((region, lg[r0:r1, c0:c1].cpu().numpy()))
    return out


def crops(up, valid, crop: bool) -> list:
    """``(region, logits)`` per object of an upsampled batch, wherever it lies."""
    return (host_crops if up.device.type == "cpu" else device_crops)(up, valid, crop)


def checked_objects(prompts, shape, ids, out, max_hole_area, max_sprinkle_area):
    """``segment``'s arguments checked: (ObjectPrompts inside ``shape``, ids or None)."""
    prompts = list(prompts)
    ids = None if ids is None else label_ids(ids, len(prompts))
    if out is not None:
        labels_shape("out", out, shape)
    cleanup_areas(max_hole_area, max_sprinkle_area)
    return as_prompts(prompts, shape, ids), ids
