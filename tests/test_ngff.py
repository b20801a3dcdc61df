"""OME-NGFF labels beside the image: ``segment --out IMAGE.zarr/labels/NAME`` into images
written by ome-zarr-py (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3), read back by ome-zarr-py
and by napari-ome-zarr; the image's own files stay byte-identical; an existing NAME is
refused, and ``--overwrite`` replaces only a label image napari-sam3 wrote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_sam3 import cli
from napari_sam3.core import io, ngff
from napari_sam3.core.provenance import Provenance

H, W = 80, 120
OBJECTS = [{"points": [[20, 30]]}, {"box": [40, 60, 70, 110]}, {"points": [[60, 20]]}]


def _image() -> np.ndarray:
    rng = np.random.default_rng(2)
    rows, cols = np.mgrid[0:H, 0:W]
    base = 1000 + 800 * np.sin(rows / 6.0) * np.cos(cols / 9.0) + 3 * cols
    return (base + rng.normal(0, 60, base.shape)).astype(np.uint16)


def _write_image(path: Path, version: str, data=None, axes="yx") -> Path:
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    group = zarr.open_group(path, mode="w", zarr_format=fmt.zarr_format)
    write_image(_image() if data is None else data, group, scale_factors=(2, 4), axes=axes,
                fmt=fmt)
    return path


def _files(root: Path, skip: str = "labels") -> dict[str, str]:
    """sha256 of every file of ``root`` outside ``skip``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != skip}


def _segment(image, out, model, *extra) -> list[str]:
    return ["segment", str(image), "--out", str(out), "--model", str(model), "--device", "cpu",
            *map(str, extra)]


def _nodes(path: Path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    nodes = list(Reader(parse_url(str(path)))())
    images = [n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs)
              and not any(isinstance(s, Label) for s in n.specs)]
    labels = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    return images, labels


def _validate(img: Path, version: str) -> None:
    """ome-zarr-models (the NGFF spec as pydantic models) accepts the image with its labels
    group and the label image."""
    if version == "0.4":
        from ome_zarr_models.v04 import Image, ImageLabel, Labels
    else:
        from ome_zarr_models.v05 import Image, ImageLabel, Labels
    Image.from_zarr(zarr.open_group(img, mode="r"))
    Labels.from_zarr(zarr.open_group(img / "labels", mode="r"))
    ImageLabel.from_zarr(zarr.open_group(img / "labels" / "cells", mode="r"))


@pytest.fixture
def work(tmp_path):
    (tmp_path / "prompts.json").write_text(json.dumps(OBJECTS))
    return tmp_path


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_labels_beside_an_ome_zarr_image(work, tiny_tracker_dir, capsys, version):
    img = _write_image(work / "img.zarr", version)
    before = _files(img)
    flat = work / "flat.tif"  # the same run into a plain TIFF: the level-0 reference
    assert cli.main(_segment(img, flat, tiny_tracker_dir, "--prompts",
                             work / "prompts.json")) == 0
    want = io.read_labels(flat)
    assert set(np.unique(want).tolist()) == {0, 1, 2, 3}
    out = img / "labels" / "cells"
    rc = cli.main(_segment(img, out, tiny_tracker_dir, "--prompts", work / "prompts.json"))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert _files(img) == before  # the image's arrays and metadata: byte-identical
    assert not list(work.glob(".*partial"))  # no staging left

    images, labels = _nodes(img)
    (image,), (label,) = images, labels
    assert len(label.data) == len(image.data) == 3  # one level per image level
    assert [tuple(a.shape) for a in label.data] == [tuple(a.shape) for a in image.data]
    np.testing.assert_array_equal(np.asarray(label.data[0]), want)
    for level, f in zip(label.data[1:], (2, 4), strict=True):
        np.testing.assert_array_equal(np.asarray(level), want[::f, ::f])  # nearest
    meta = label.zarr.root_attrs
    meta = meta.get("ome", meta)
    il = meta["image-label"]
    assert il["version"] == version and il["source"] == {"image": "../../"}
    assert [c["label-value"] for c in il["colors"]] == [1, 2, 3]
    assert all(len(c["rgba"]) == 4 and all(0 <= v <= 255 for v in c["rgba"])
               for c in il["colors"])
    props = {p["label-value"]: p for p in il["properties"]}
    assert sorted(props) == [1, 2, 3]
    for v, p in props.items():
        assert p["area"] == int((want == v).sum())
        assert isinstance(p["score"], float)
    assert props[2]["prompt kind"] == "box" and props[1]["prompt kind"] == "points"
    ms = meta["multiscales"][0]
    img_meta = image.zarr.root_attrs
    img_ms = img_meta.get("ome", img_meta)["multiscales"][0]
    assert ms["axes"] == img_ms["axes"]
    assert [d["coordinateTransformations"] for d in ms["datasets"]] == [
        d["coordinateTransformations"] for d in img_ms["datasets"]]
    root = zarr.open_group(img / "labels", mode="r")
    listed = dict(root.attrs)
    assert listed.get("ome", listed)["labels"] == ["cells"]
    _validate(img, version)
    assert zarr.open_group(out, mode="r").info._zarr_format == (2 if version == "0.4" else 3)
    record = Provenance.from_dict(ngff.read_provenance(out))
    assert [o["points"] for o in record.operations[0]["objects"]] == [
        o.get("points", []) for o in OBJECTS]

    # replay from the NGFF labels gives the same labels
    assert cli.main(["replay", str(out), "--out", str(work / "again.tif")]) == 0
    np.testing.assert_array_equal(io.read_labels(work / "again.tif"), want)


def test_existing_name_refused_and_overwrite_replaces_only_ours(work, tiny_tracker_dir,
                                                                capsys):
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_labels

    img = _write_image(work / "img.zarr", "0.5")
    args = _segment(img, img / "labels" / "cells", tiny_tracker_dir, "--prompts",
                    work / "prompts.json")
    assert cli.main(args) == 0
    capsys.readouterr()
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "already exists" in err
    assert cli.main([*args, "--overwrite"]) == 0
    listed = zarr.open_group(img / "labels", mode="r").attrs["ome"]["labels"]
    assert listed == ["cells"]  # listed once

    # a label image someone else wrote is never replaced
    group = zarr.open_group(img, mode="r+")
    write_labels(np.ones((H, W), np.int32), group, name="theirs", fmt=FormatV05(),
                 axes="yx", scale_factors=(2, 4))
    theirs = _files(img / "labels" / "theirs", skip="")
    capsys.readouterr()
    other = _segment(img, img / "labels" / "theirs", tiny_tracker_dir, "--prompts",
                     work / "prompts.json", "--overwrite")
    rc = cli.main(other)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not a label image napari-sam3 wrote" in err
    assert _files(img / "labels" / "theirs", skip="") == theirs
    assert sorted(zarr.open_group(img / "labels", mode="r").attrs["ome"]["labels"]) == [
        "cells", "theirs"]

    # labels of another image's shape: one line, exit 2, nothing written
    import tifffile

    tifffile.imwrite(work / "small.tif", np.pad(_image(), ((0, 20), (0, 0))))
    before = _files(img, skip="")
    rc = cli.main(_segment(work / "small.tif", img / "labels" / "small", tiny_tracker_dir,
                           "--prompts", work / "prompts.json"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "do not fit the image" in err
    assert _files(img, skip="") == before and not list(work.glob(".*partial"))


def test_write_ngff_labels_api_on_a_stack(tmp_path):
    """The core function the widget calls: a (Z, Y, X) image with units and a z scale."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image

    stack = np.stack([_image()] * 3)
    group = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=2)
    write_image(stack, group, scale_factors=(2,), axes="zyx", fmt=FormatV04(),
                scale={"z": 2.0, "y": 0.5, "x": 0.5},
                axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"})
    axes = group.attrs["multiscales"][0]["axes"]
    assert [a.get("unit") for a in axes] == ["micrometer"] * 3
    before = _files(tmp_path / "s.zarr")
    labels = np.zeros(stack.shape, np.int32)
    labels[1, 10:30, 20:50] = 4
    labels[2, 50:60, 5:9] = 9
    assert ngff.labels_shape(tmp_path / "s.zarr") == stack.shape
    path = ngff.write_ngff_labels(tmp_path / "s.zarr", "seg", labels,
                                  {"schema": "napari-sam3/provenance", "version": 1},
                                  colors={4: (1.0, 0.0, 0.0, 1.0)})
    assert _files(tmp_path / "s.zarr") == before
    images, (label,) = _nodes(tmp_path / "s.zarr")
    np.testing.assert_array_equal(np.asarray(label.data[0]), labels)
    np.testing.assert_array_equal(np.asarray(label.data[1]), labels[:, ::2, ::2])
    ms = label.zarr.root_attrs["multiscales"][0]
    assert ms["axes"] == axes and ms["version"] == "0.4"
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [2.0, 1.0, 1.0]
    colors = label.zarr.root_attrs["image-label"]["colors"]
    assert colors == [{"label-value": 4, "rgba": [255, 0, 0, 255]}]
    assert ngff.is_ours(path)
    # levels given (e.g. the widget's labels pyramid) are written as they are
    levels = [labels, labels[:, ::2, ::2] + 1]
    ngff.write_ngff_labels(tmp_path / "s.zarr", "seg", levels, {"schema": "x"}, overwrite=True)
    _, (label,) = _nodes(tmp_path / "s.zarr")
    np.testing.assert_array_equal(np.asarray(label.data[1]), levels[1])
    assert _files(tmp_path / "s.zarr") == before
    with pytest.raises(ngff.NgffError, match="do not fit"):
        ngff.write_ngff_labels(tmp_path / "s.zarr", "bad", labels[0], {}, overwrite=True)
    assert not (tmp_path / "s.zarr" / "labels" / "bad").exists()


def test_napari_ome_zarr_reads_labels_aligned(make_napari_viewer, work, tiny_tracker_dir):
    """napari (napari-ome-zarr) opens the image with its labels as a Labels layer over it."""
    pytest.importorskip("napari_ome_zarr")
    img = _write_image(work / "img.zarr", "0.4")
    assert cli.main(_segment(img, img / "labels" / "cells", tiny_tracker_dir, "--prompts",
                             work / "prompts.json")) == 0
    viewer = make_napari_viewer()
    layers = viewer.open(str(img), plugin="napari-ome-zarr")
    kinds = {type(layer).__name__ for layer in layers}
    assert kinds == {"Image", "Labels"}
    (image,) = [layer for layer in layers if type(layer).__name__ == "Image"]
    (labels,) = [layer for layer in layers if type(layer).__name__ == "Labels"]
    assert labels.multiscale and len(labels.data) == len(image.data) == 3
    assert [tuple(a.shape) for a in labels.data] == [tuple(a.shape) for a in image.data]
    np.testing.assert_array_equal(labels.scale, image.scale)
    np.testing.assert_array_equal(labels.translate, image.translate)
    np.testing.assert_array_equal(np.asarray(labels.data[0]),
                                  io.read_labels(_flat(work, img, tiny_tracker_dir)))


def _flat(work: Path, img: Path, model) -> Path:
    out = work / "flat.tif"
    if not out.exists():
        assert cli.main(_segment(img, out, model, "--prompts", work / "prompts.json")) == 0
    return out


def test_a_failed_replace_keeps_the_previous_label_image(tmp_path, monkeypatch):
    import os

    img = _write_image(tmp_path / "img.zarr", "0.5")
    first = np.zeros((H, W), np.int32)
    first[10:20, 10:30] = 3
    ngff.write_ngff_labels(img, "seg", first, {"schema": "napari-sam3/provenance"})
    real, target = os.replace, img / "labels" / "seg"

    def flaky(src, dst):  # the old one is moved aside; then neither comes back into place
        if Path(dst) == target:
            raise PermissionError("in use")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(ngff.NgffError, match="previous one is kept at") as err:
        ngff.write_ngff_labels(img, "seg", first + 1, {"schema": "x"}, overwrite=True)
    monkeypatch.setattr(os, "replace", real)
    kept = Path(str(err.value).rsplit(" at ", 1)[1])
    assert kept.name == "old" and kept.is_dir()  # the previous label image, not deleted
    group = zarr.open_group(kept, mode="r")
    level0 = group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]
    np.testing.assert_array_equal(np.asarray(group[level0]), first)
    assert ngff.read_provenance(kept)["schema"] == "napari-sam3/provenance"
