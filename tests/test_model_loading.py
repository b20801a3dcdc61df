"""Model loading: the hub/local rule, wrong or partial checkpoints refused, quiet loads,
and a model identity (cache keys) made of content, not of the path it was given by."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_sam3 import Sam3Segmenter, cli
from napari_sam3.core.concept import load_concept_model
from napari_sam3.core.model import ModelLoadError, load_tracker, prepare_model, resolve_model

BOTH = ("no such folder", "no such model on the hub (or offline")


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    from napari_sam3.testing import save_random_video_tracker

    return save_random_video_tracker(tmp_path_factory.mktemp("tiny_video"), seed=0)


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    from napari_sam3.testing_concept import save_random_concept_model

    return save_random_concept_model(tmp_path_factory.mktemp("tiny_concept"), seed=0)


def _without_weights(src: Path, dst: Path, n: int) -> Path:
    """A copy of checkpoint ``src`` with its first ``n`` tensors deleted."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    for key in sorted(weights)[:n]:
        del weights[key]
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def work(tmp_path):
    """An image and a prompts file for the command line."""
    rows, cols = np.mgrid[0:40, 0:50]
    tifffile.imwrite(tmp_path / "img.tif", (rows * 3 + cols).astype(np.uint16))
    (tmp_path / "prompts.json").write_text(json.dumps([{"points": [[20, 25]]}]))
    return tmp_path


def _segment(work: Path, model, *extra) -> list[str]:
    return ["segment", str(work / "img.tif"), "--prompts", str(work / "prompts.json"),
            "--out", str(work / "out.tif"), "--model", str(model), "--device", "cpu", *extra]


def _one_error_line(rc, err, *words):
    assert rc == 2, err
    assert err.startswith("napari-sam3: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err


# -- the hub/local rule -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["no_such_folder", "./x", "x\\y", "/abs/missing", "a/b/c"])
def test_names_that_are_not_hub_ids_are_missing_folders(name):
    with pytest.raises(ModelLoadError, match="no such folder") as err:
        Sam3Segmenter.from_pretrained(name, device="cpu")
    assert "hub" not in str(err.value) and "licence" not in str(err.value)


def test_hub_id_offline_says_both(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        Sam3Segmenter.from_pretrained("owner/name", device="cpu")
    assert all(w in str(err.value) for w in BOTH), err.value
    assert len(str(err.value).splitlines()) == 1
    assert resolve_model("owner/name").local is False  # a hub id: no network needed to say so


def test_hub_id_without_network_fails_in_one_attempt(monkeypatch):
    """Online mode but no network: one short request, then the message (no retries)."""
    import huggingface_hub

    calls = []

    def no_network(url, timeout=None, **_):
        calls.append((url, timeout))
        raise ConnectionError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(ModelLoadError) as err:
        Sam3Segmenter.from_pretrained("owner/name", device="cpu")
    assert all(w in str(err.value) for w in BOTH) and "ConnectionError" in str(err.value)
    assert len(calls) == 1 and calls[0][1] <= 10, calls


def test_existing_folder_named_like_a_hub_id_is_local(tiny_tracker_dir, tmp_path, monkeypatch,
                                                      caplog, capsys, work):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_tracker_dir, tmp_path / "owner" / "name")
    rc = cli.main(_segment(work, "owner/name"))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert err.startswith("napari-sam3: note: using the local folder"), err
    with caplog.at_level(logging.INFO, logger="napari_sam3.core.model"):
        seg = Sam3Segmenter.from_pretrained("owner/name", device="cpu")
    assert "using the local folder" in caplog.text
    assert seg.fingerprint["weights"]  # the folder's weights, not a hub model
    source = resolve_model("owner/name")
    assert source.local and source.location == str((tmp_path / "owner" / "name").resolve())


def test_mistyped_folder_fails_before_torch_is_imported(work):
    """The command line checks --model and --device before the heavy import."""
    code = ("import sys; from napari_sam3 import cli; rc = cli.main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cases = {"no_such_folder": ("no such folder",), "owner/name": BOTH}
    for model, words in cases.items():
        res = subprocess.run([sys.executable, "-c", code, *_segment(work, model)],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.stdout.split() == ["2", "False", "False"], (model, res.stdout, res.stderr)
        _one_error_line(2, res.stderr, *words)
    res = subprocess.run([sys.executable, "-c", code, *_segment(work, "x", "--device", "tpu")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.stdout.split() == ["2", "False", "False"], res.stderr
    _one_error_line(2, res.stderr, "unknown device 'tpu'")
    assert not (work / "out.tif").exists()


# -- wrong or partial checkpoints -------------------------------------------------------------
def test_partial_tracker_checkpoint_is_refused(tiny_tracker_dir, tmp_path, work, capsys):
    partial = _without_weights(tiny_tracker_dir, tmp_path / "partial", 131)
    with pytest.raises(ModelLoadError, match="131 of 205 weights are missing"):
        load_tracker(str(partial))
    rc = cli.main(_segment(work, partial))
    _one_error_line(rc, capsys.readouterr().err, "not a complete SAM3 tracker checkpoint",
                    "131 of 205")
    assert not (work / "out.tif").exists()


def test_partial_concept_checkpoint_is_refused(concept_dir, tmp_path):
    partial = _without_weights(concept_dir, tmp_path / "partial", 10)
    with pytest.raises(ModelLoadError, match="10 of 294 detector weights are missing"):
        load_concept_model(str(partial))


def test_concept_checkpoint_with_prompts_says_what_it_is(concept_dir, work, capsys):
    rc = cli.main(_segment(work, concept_dir))
    _one_error_line(rc, capsys.readouterr().err, "is a SAM3 concept checkpoint (Sam3Model)",
                    "--text/--exemplars", "points and boxes need facebook/sam3")
    assert not (work / "out.tif").exists()


def test_loads_are_quiet(video_dir, tiny_tracker_dir, tmp_path):
    """A tracker from a video-tracker checkpoint, or from a fuller checkpoint (unused
    weights), loads without transformers' reports and bars; its verbosity is restored."""
    from safetensors.torch import load_file, save_file

    fuller = shutil.copytree(tiny_tracker_dir, tmp_path / "fuller")
    weights = load_file(fuller / "model.safetensors")
    weights["detector_model.extra.weight"] = weights[sorted(weights)[0]].clone()
    save_file(weights, fuller / "model.safetensors", metadata={"format": "pt"})
    code = ("import sys; from transformers.utils import logging as l; before = l.get_verbosity(); "
            "from napari_sam3 import Sam3Segmenter; "
            "[Sam3Segmenter.from_pretrained(m, device='cpu') for m in sys.argv[1:]]; "
            "print('loaded', l.get_verbosity() == before)")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    res = subprocess.run([sys.executable, "-c", code, str(video_dir), str(fuller)],
                         capture_output=True, text=True, env=dict(env, HF_HUB_OFFLINE="1"),
                         timeout=300)
    assert res.stdout.split() == ["loaded", "True"], res.stderr
    for noise in ("UNEXPECTED", "LOAD REPORT", "You are using a model of type", "Loading weights"):
        assert noise not in res.stderr, res.stderr


# -- identity ---------------------------------------------------------------------------------
def test_one_folder_is_one_model_whatever_its_path(tiny_tracker_dir, monkeypatch):
    monkeypatch.chdir(tiny_tracker_dir.parent)
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    names = [tiny_tracker_dir.name, f"./{tiny_tracker_dir.name}", str(tiny_tracker_dir)]
    keys = {Sam3Segmenter.from_pretrained(n, device="cpu").embedding_key(rgb) for n in names}
    assert len(keys) == 1


def test_processor_settings_are_part_of_the_key(tiny_tracker_dir, tmp_path):
    folder = shutil.copytree(tiny_tracker_dir, tmp_path / "model")
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    before = Sam3Segmenter.from_pretrained(str(folder), device="cpu").embedding_key(rgb)
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"]["image_mean"] = [0.4, 0.4, 0.4]
    (folder / "processor_config.json").write_text(json.dumps(config))
    after = Sam3Segmenter.from_pretrained(str(folder), device="cpu")
    assert list(after.processor.image_processor.image_mean) == [0.4] * 3  # the edit was read
    assert after.embedding_key(rgb) != before


def test_prepare_model_is_idempotent(tiny_tracker_dir):
    source = prepare_model(str(tiny_tracker_dir))
    assert prepare_model(source) is source and str(source) == str(tiny_tracker_dir)


def test_hub_id_offline_is_served_from_the_local_cache(tiny_tracker_dir, tmp_path):
    """HF_HUB_OFFLINE=1 and a model in the hub cache: it loads from there, quietly, and its
    identity is the hub id and the cached revision."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--owner--tiny"
    shutil.copytree(tiny_tracker_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    code = ("import json; from napari_sam3 import Sam3Segmenter; "
            "print(json.dumps(Sam3Segmenter.from_pretrained('owner/tiny', device='cpu')"
            ".fingerprint))")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    fingerprint = json.loads(res.stdout)
    assert fingerprint["id"] == "owner/tiny" and fingerprint["revision"] == revision
    for noise in ("[transformers]", "Loading weights", "Traceback"):
        assert noise not in res.stderr, res.stderr


@pytest.mark.parametrize("layout", ["hub", "saved by transformers"])
def test_a_checkpoint_laid_out_like_facebook_sam3_loads_every_tracker_weight(tmp_path, layout):
    """facebook/sam3 is a Sam3Video checkpoint (``tracker_model.*``); transformers' own
    save_pretrained writes ``tracker_model.tracker_model.*``, which transformers alone
    loads as a Sam3TrackerModel with a random prompt encoder and mask decoder."""
    import safetensors.torch
    import torch
    from transformers import Sam3TrackerModel

    from napari_sam3.core.concept import ConceptSegmenter
    from napari_sam3.testing_concept import save_random_sam3

    folder = save_random_sam3(tmp_path / "sam3")
    weights = next(folder.glob("*.safetensors"))
    saved = safetensors.torch.load_file(weights)
    if layout == "hub":
        saved = {k.replace("tracker_model.tracker_model.", "tracker_model."): v
                 for k, v in saved.items()}
        safetensors.torch.save_file(saved, weights, metadata={"format": "pt"})
    else:
        _, info = Sam3TrackerModel.from_pretrained(folder, output_loading_info=True)
        assert len(info["missing_keys"]) > 100  # the transformers defect guarded against

    net, _ = load_tracker(str(folder), "cpu")
    state = net.state_dict()
    renamed = {"tracker_neck.": "vision_encoder.neck.",
               "detector_model.vision_encoder.backbone.": "vision_encoder.backbone."}
    compared = 0
    for key, value in saved.items():
        name = key.replace("tracker_model.", "")
        for prefix, to in renamed.items():
            if name.startswith(prefix):
                name = to + name[len(prefix):]
        if name in state and not key.startswith("detector_model.vision_encoder.neck"):
            assert torch.equal(state[name], value), key
            compared += 1
    assert compared == len(state)  # every tracker tensor came from the checkpoint

    seg = Sam3Segmenter.from_pretrained(str(folder), device="cpu")
    assert seg.video_tracker() is not None  # propagation loads from the same folder
    assert ConceptSegmenter.for_segmenter(seg, str(folder)) is not None  # and concepts


def test_weights_of_another_shape_are_one_error_naming_a_tensor(tiny_tracker_dir, tmp_path,
                                                               work, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "shape"
    shutil.copytree(tiny_tracker_dir, bad)
    weights = load_file(bad / "model.safetensors")
    key = "mask_decoder.conv_s0.bias"
    stored = next(k for k in weights if k.endswith(key))  # saved as tracker_model.<key>
    weights[stored] = weights[stored][:-1].clone()
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"does not match its config.json.*{key}"):
        load_tracker(str(bad), "cpu")
    rc = cli.main(_segment(work, bad))
    _one_error_line(rc, capsys.readouterr().err, "does not match its config.json", key)
    assert not (work / "out.tif").exists()
