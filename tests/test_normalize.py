"""Intensity mapping to the processor's 8-bit RGB."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam3.core.normalize import robust_limits, to_rgb_uint8


def test_uint8_rgb_unchanged():
    img = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = to_rgb_uint8(img)
    assert out is not img
    np.testing.assert_array_equal(out, img)
    rgba = np.concatenate([img, np.full((7, 9, 1), 9, np.uint8)], axis=-1)
    np.testing.assert_array_equal(to_rgb_uint8(rgba), img)


def test_gray_with_limits_is_linear_and_clipped():
    img = np.array([[0, 100, 200, 300, 400]], dtype=np.uint16)
    out = to_rgb_uint8(img, limits=(100, 300))
    np.testing.assert_array_equal(out[..., 0], [[0, 0, 128, 255, 255]])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_robust_limits_ignore_outliers():
    img = np.full((100, 100), 1000.0)
    img[:50] = 2000.0
    img[0, 0] = 1e9
    lo, hi = robust_limits(img)
    assert lo == 1000.0 and hi == 2000.0


def test_two_channels_and_float():
    img = np.zeros((4, 4, 2), np.float32)
    img[..., 0] = 1.0
    out = to_rgb_uint8(img, limits=(0.0, 1.0))
    assert (out[..., 0] == 255).all() and (out[..., 1] == 0).all() and (out[..., 2] == 0).all()


def test_rejects_stacks():
    with pytest.raises(ValueError, match="2D"):
        to_rgb_uint8(np.zeros((5, 6, 7)))
