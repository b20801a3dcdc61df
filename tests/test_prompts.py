"""Prompt validation and the single (row, col) -> (x, y) conversion."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam3 import ObjectPrompt, PromptError
from napari_sam3.core.prompts import box_to_xyxy, rowcol_to_xy


def test_rowcol_to_xy_swaps():
    assert rowcol_to_xy([[10, 100], [3, 4]]) == [[100.0, 10.0], [4.0, 3.0]]
    assert box_to_xyxy([10, 60, 50, 115]) == [60.0, 10.0, 115.0, 50.0]


def test_box_corners_are_ordered():
    p = ObjectPrompt(box=(50, 115, 10, 60))
    np.testing.assert_array_equal(p.box, [10, 60, 50, 115])


def test_processor_points_follow_columns_on_asymmetric_image(tiny_segmenter):
    """On a 72x120 image a point at (row 10, col 100) lands at x=100*s/120, y=10*s/72."""
    p = ObjectPrompt(points=[(10, 100)])
    t = tiny_segmenter._prompt_tensors((72, 120), [p])
    s = tiny_segmenter.input_size
    np.testing.assert_allclose(t["input_points"][0, 0, 0].numpy(), [100 * s / 120, 10 * s / 72],
                               rtol=1e-6)


@pytest.mark.parametrize("bad", [
    dict(), dict(points=[(1, 2)], point_labels=[1, 0]), dict(points=[(1, 2)], point_labels=[2]),
    dict(box=(1, 2, 3)),
])
def test_invalid_prompts(bad):
    with pytest.raises(PromptError):
        ObjectPrompt(**bad)


def test_check_inside():
    ObjectPrompt(points=[(0, 0), (71, 119)]).check_inside((72, 120))
    with pytest.raises(PromptError, match="outside"):
        ObjectPrompt(points=[(0, 120)]).check_inside((72, 120))


def test_from_dict():
    p = ObjectPrompt.from_dict({"points": [[1, 2]], "labels": [0], "box": [0, 0, 5, 5]})
    assert p.point_labels.tolist() == [0] and p.box.tolist() == [0, 0, 5, 5]
    with pytest.raises(PromptError, match="unknown"):
        ObjectPrompt.from_dict({"point": [[1, 2]]})
    with pytest.raises(PromptError):
        ObjectPrompt.from_dict({})
