"""Channel composites: 1-3 layers with their own limits as the model's RGB, read lazily."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam3 import ObjectPrompt, Sam3Segmenter
from napari_sam3.core.channels import ChannelView, composite_from
from napari_sam3.core.normalize import to_rgb_uint8


class Recording:
    """An array-like that records every index it is read with; reading it whole fails."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.data[key]

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the whole array was read")


def channels(shape, seed=0):
    """Two structured float channels (nuclei-like blobs, membrane-like stripes)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:shape[-2], 0:shape[-1]]
    blobs = 500 + 3000 * (np.sin(rows / 6.0) * np.cos(cols / 9.0) > 0.3)
    stripes = 0.2 + 0.6 * (np.sin((rows + 2 * cols) / 5.0) > 0)
    nuclei = np.broadcast_to(blobs, shape) + rng.normal(0, 150, shape)
    membrane = np.broadcast_to(stripes, shape) + rng.normal(0, 0.05, shape)
    return nuclei.astype(np.uint16), membrane.astype(np.float32)


def test_exact_values_of_a_two_channel_composite():
    nuclei = np.array([[0, 10, 20], [35, 60, 70]], dtype=np.uint16)
    membrane = np.array([[-1, 0, 1], [0.5, -0.5, 2]], dtype=np.float32)
    comp = composite_from([nuclei, membrane], [(10, 60), (-1, 1)], ["nuclei", "membrane"])
    assert comp.shape == (2, 3, 3) and comp.dtype == np.uint8 and comp.ndim == 3
    expected = np.zeros((2, 3, 3), dtype=np.uint8)
    expected[..., 0] = [[0, 0, 51], [128, 255, 255]]  # (v - 10) * 255 / 50, clipped
    expected[..., 1] = [[0, 128, 255], [191, 64, 255]]  # (v + 1) * 255 / 2
    np.testing.assert_array_equal(np.asarray(comp), expected)
    np.testing.assert_array_equal(comp[1, 1:], expected[1, 1:])
    np.testing.assert_array_equal(comp[..., 1], expected[..., 1])
    assert comp[0, 2, 0] == 51 and comp[1, 0, 2] == 0
    # one channel alone is grey: the same pixels as that layer segmented on its own
    grey = composite_from([nuclei], [(10, 60)])
    np.testing.assert_array_equal(np.asarray(grey), np.repeat(expected[..., :1], 3, axis=-1))
    np.testing.assert_array_equal(np.asarray(grey), to_rgb_uint8(nuclei, (10, 60)))
    # None is a channel of zeros: the membrane in green only
    green = composite_from([None, membrane], [None, (-1, 1)])
    np.testing.assert_array_equal(green[..., 1], expected[..., 1])
    assert not green[..., 0].any() and not green[..., 2].any()


def test_planes_stay_lazy_and_reads_touch_only_the_region():
    nuclei, membrane = (Recording(a) for a in channels((4, 50, 60)))
    comp = composite_from([nuclei, membrane], [(500, 3500), (0.2, 0.8)])
    plane = comp[2]
    assert plane.shape == (50, 60, 3) and nuclei.reads == [] and membrane.reads == []
    assert comp[-2].lead == (2,)
    part = plane[10:20, 5:15]
    assert part.shape == (10, 10, 3)
    for src in (nuclei, membrane):
        assert src.reads == [(2, slice(10, 20), slice(5, 15))]
    whole = composite_from([nuclei.data, membrane.data], [(500, 3500), (0.2, 0.8)])
    np.testing.assert_array_equal(part, np.asarray(whole)[2, 10:20, 5:15])
    with pytest.raises(IndexError, match="index 4 is out of bounds"):
        comp[4]


def test_a_tiled_segmenter_reads_only_the_tiles_it_needs(tiny_tracker_dir):
    seg = Sam3Segmenter.from_pretrained(str(tiny_tracker_dir), device="cpu", tile_size=112,
                                        overlap=28)
    nuclei, membrane = (Recording(a) for a in channels((180, 180)))
    comp = composite_from([nuclei, membrane], [(500, 3500), (0.2, 0.8)])
    grid = seg.tiles(comp)
    assert len(grid) == 4
    assert list(seg.precompute(comp, region=(0, 0, 10, 10))) == [(1, 1, True)]
    labels = seg.segment(comp, [ObjectPrompt(points=[(20, 20)])])
    assert seg.encoder_calls == 1  # the click's tile is the precomputed one
    # read once, by the precompute: the click finds the tile's remembered cache key
    assert nuclei.reads == membrane.reads == [grid.tiles[0].slices]
    rgb = np.asarray(composite_from([nuclei.data, membrane.data], [(500, 3500), (0.2, 0.8)]))
    np.testing.assert_array_equal(labels, seg.segment(rgb, [ObjectPrompt(points=[(20, 20)])]))
    assert seg.encoder_calls == 1


def test_segmenting_a_composite_equals_segmenting_its_pixels(tiny_segmenter):
    seg = tiny_segmenter
    nuclei, membrane = channels((72, 120), seed=3)
    comp = composite_from([nuclei, membrane], [(500, 3500), (0.2, 0.8)])
    rgb = np.asarray(comp)
    assert rgb.dtype == np.uint8 and rgb.shape == (72, 120, 3) and rgb[..., 2].max() == 0
    prompts = [ObjectPrompt(points=[(20, 95)]), ObjectPrompt(box=(10, 10, 50, 60))]
    key = seg.embedding_key(seg.prepare(rgb))
    assert seg.embedding_key(seg.prepare(comp)) == key
    before = seg.encoder_calls
    expected = seg.segment(rgb, prompts)
    assert seg.encoder_calls == before + 1 and expected.max() > 0
    np.testing.assert_array_equal(seg.segment(comp, prompts), expected)
    assert seg.encoder_calls == before + 1  # the same cache entry
    assert seg.cached_embedding(comp).key == key
    for a, b in zip(seg.predict_objects(comp, prompts), seg.predict_objects(rgb, prompts),
                    strict=True):
        np.testing.assert_array_equal(a.logits, b.logits)
        assert a.region == b.region and a.iou_score == b.iou_score
    # one layer alone shares the cache with that layer given directly with its limits
    grey = composite_from([nuclei], [(500, 3500)])
    assert seg.embedding_key(seg.prepare(grey)) == seg.embedding_key(
        seg.prepare(nuclei, (500, 3500)))


def test_the_cache_key_follows_each_channels_limits(tiny_segmenter):
    seg = tiny_segmenter
    nuclei, membrane = channels((72, 120), seed=4)
    keys = {seg.embedding_key(seg.prepare(composite_from([nuclei, membrane], lims)))
            for lims in ([(500, 3500), (0.2, 0.8)], [(500, 3500), (0.2, 0.9)],
                         [(400, 3500), (0.2, 0.8)])}
    keys.add(seg.embedding_key(seg.prepare(composite_from([membrane, nuclei],
                                                          [(0.2, 0.8), (500, 3500)]))))
    assert len(keys) == 4
    comp = composite_from([nuclei, membrane], [(500, 3500), (0.2, 0.8)])
    before = seg.encoder_calls
    seg.segment(comp, [ObjectPrompt(points=[(30, 30)])])
    seg.segment(composite_from([nuclei, membrane], [(500, 3500), (0.2, 0.9)]),
                [ObjectPrompt(points=[(30, 30)])])
    assert seg.encoder_calls == before + 2


def test_concept_detection_on_a_composite_equals_its_pixels(tmp_path_factory):
    from napari_sam3.core.concept import ConceptSegmenter
    from napari_sam3.testing_concept import save_random_concept_model

    folder = save_random_concept_model(tmp_path_factory.mktemp("tiny_concept"), seed=0)
    concept = ConceptSegmenter.from_pretrained(str(folder), device="cpu", tile_size=112,
                                               overlap=28)
    nuclei, membrane = channels((150, 130), seed=5)
    comp = composite_from([nuclei, membrane], [(500, 3500), (0.2, 0.8)])
    a = concept.detect(comp, "nucleus", min_score=0.0)
    calls = concept.encoder_calls
    b = concept.detect(np.asarray(comp), "nucleus", min_score=0.0)
    assert concept.encoder_calls == calls and len(a.candidates) == len(b.candidates) > 0
    np.testing.assert_array_equal(a.paint(), b.paint())


def test_a_stack_composite_propagates_like_its_pixels(tmp_path_factory):
    from napari_sam3.testing import save_random_video_tracker

    folder = save_random_video_tracker(tmp_path_factory.mktemp("tiny_video"), seed=0)
    seg = Sam3Segmenter.from_pretrained(str(folder), device="cpu", tile_size=1024)
    nuclei, membrane = channels((5, 64, 64), seed=6)
    comp = composite_from([nuclei, membrane], [(500, 3500), (0.2, 0.8)])
    stack = np.asarray(comp)
    assert stack.shape == (5, 64, 64, 3)
    prompts = {2: {4: ObjectPrompt(points=[(30, 30)])}}
    mine = list(seg.iter_propagate(comp, prompts, direction="both", stop_after=10 ** 6))
    calls = seg.encoder_calls
    theirs = list(seg.iter_propagate(stack, prompts, direction="both", stop_after=10 ** 6))
    assert seg.encoder_calls == calls  # every slice's features came from the cache
    assert [r.index for r in mine] == [r.index for r in theirs] and len(mine) == 5
    for r, s in zip(mine, theirs, strict=True):
        assert r.ids == s.ids == [4]
        np.testing.assert_array_equal(r.logits[0], s.logits[0])


def test_channels_of_one_layer():
    nuclei, membrane = channels((40, 50), seed=7)
    cyx = np.stack([nuclei.astype(np.float32), membrane])
    view = ChannelView(Recording(cyx), 1, axis=0)
    assert view.shape == (40, 50) and view.dtype == np.float32
    np.testing.assert_array_equal(view[3:5, ...], membrane[3:5])
    assert view.data.reads == [(1, slice(3, 5), slice(None))]
    yxc = np.moveaxis(cyx, 0, -1)
    comp = composite_from([ChannelView(yxc, 0), ChannelView(yxc, 1, axis=-1)],
                          [(500, 3500), (0.2, 0.8)])
    np.testing.assert_array_equal(
        np.asarray(comp), np.asarray(composite_from([cyx[0], membrane], comp.limits)))
    with pytest.raises(ValueError, match=r"^channel 2 is not in axis 0 of shape \(2, 40, 50\)$"):
        ChannelView(cyx, 2, axis=0)


BAD = {
    "shapes differ": (dict(arrays=[np.zeros((64, 64)), np.zeros((64, 65))]),
                      "channel 2 'membrane' has shape (64, 65), channel 1 'nuclei' is (64, 64)"),
    "stack and plane": (dict(arrays=[np.zeros((3, 64, 64)), np.zeros((64, 64))]),
                        "channel 2 'membrane' has shape (64, 64), channel 1 'nuclei' is "
                        "(3, 64, 64)"),
    "four channels": (dict(arrays=[np.zeros((4, 4))] * 4, limits=[(0, 1)] * 4),
                      "choose 1 to 3 channels, got 4"),
    "no channel": (dict(arrays=[None, None], limits=[None, None]),
                   "choose at least one image for the channels"),
    "not an image": (dict(arrays=[np.zeros(5)], limits=[(0, 1)]),
                     "channel 1 'nuclei' is not an image: shape (5,)"),
    "limits missing": (dict(arrays=[np.zeros((4, 4))] * 2, limits=[(0, 1)]),
                       "give one (low, high) pair per channel: 2 channels, 1 limits"),
    "low above high": (dict(limits=[(0, 1), (5, 2)]),
                       "channel 2 'membrane': limits (5, 2): low must be below high"),
    "not finite": (dict(limits=[(0, np.nan), (0, 1)]),
                   "channel 1 'nuclei': limits must be finite numbers, got (0, nan)"),
    "not a pair": (dict(limits=[(0, 1), None]),
                   "channel 2 'membrane': limits must be one (low, high) pair, got None"),
    "text": (dict(arrays=[np.zeros((4, 4)), np.array([["a"] * 4] * 4)]),
             "channel 2 'membrane' has data type <U1, not numbers"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_choices_give_one_line_errors(case):
    given, message = BAD[case]
    args = {"arrays": [np.zeros((4, 4))] * 2, "limits": [(0, 1)] * 2, **given}
    with pytest.raises(ValueError) as err:
        composite_from(args["arrays"], args["limits"], ["nuclei", "membrane", "third"])
    assert str(err.value) == message
