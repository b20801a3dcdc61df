"""Loading SAM3 checkpoints through transformers (safetensors only, never remote code).

Which model a ``--model`` / ``model=`` argument means is one rule (:func:`resolve_model`):
an existing folder is a local checkpoint (a note says so when its name also looks like a
hub id); otherwise a name of the form ``owner/name`` is a Hugging Face hub id, tried
once with a short timeout (``HF_HUB_OFFLINE`` honoured; offline, the local hub cache
serves it); anything else (``./x``, ``x\\y``, absolute paths) is a folder that does not
exist. Both are checked before torch is imported.

A checkpoint that lacks weights the model needs is refused with one ModelLoadError,
never run with random weights; transformers' own load reports stay quiet.

torch and transformers are imported inside the functions, so importing this
module (and napari's start-up) stays light.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from .defaults import DEFAULT_MODEL

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to do."""


def resolve_device(device: str = "auto") -> str:
    """'auto' -> CUDA, then Apple MPS, then CPU. Other names are checked.

    The first torch import of every model load happens here, made safe first.
    """
    from .torch_import import prepare_torch_import

    device = check_device_name(device)
    prepare_torch_import()
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' was asked for but CUDA is not available")
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ModelLoadError("device 'mps' was asked for but Apple MPS is not available")
    return device


def check_device_name(device: str | None) -> str:
    """The device name, lower case, if it is one of auto, cpu, cuda, cuda:N, mps (no torch)."""
    name = (device or "auto").strip().lower()
    if not _DEVICE.fullmatch(name):
        raise ModelLoadError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    return name


def resolve_dtype(dtype, device: str):
    """None -> bfloat16 on CUDA, float32 elsewhere (bf16 is slower than fp32 on CPUs)."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        try:
            return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
        except KeyError:
            raise ModelLoadError(f"unknown dtype '{dtype}' (use float32, bfloat16 or float16)") from None
    return dtype


# -- which model an argument means (no torch, no network) ------------------------------------
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
HUB_TIMEOUT_S = 5.0  # one request to the hub; HF_HUB_ETAG_TIMEOUT overrides it


def looks_like_hub_id(name: str) -> bool:
    """``owner/name``: one slash, letters, digits, ``._-``; no ``./``, ``\\``, ``~`` or ``..``."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


@dataclass(frozen=True)
class ModelSource:
    """What a model argument points at: a local folder (absolute path) or a hub id."""

    name: str  # the argument as given
    location: str  # the absolute folder, or the hub id
    local: bool
    offline: bool | None = None  # hub only: None not checked yet, True: the local cache only

    def __str__(self) -> str:
        return self.name

    @property
    def note(self) -> str | None:
        """Said when a folder is used for a name that is also a hub id's."""
        if self.local and looks_like_hub_id(self.name):
            return (f"using the local folder {self.location} for '{self.name}' "
                    "(an existing folder comes before the hub model of that name)")
        return None

    def hub_options(self) -> dict:
        """Extra ``from_pretrained`` arguments: the local cache only when offline."""
        return {"local_files_only": True} if self.offline else {}


def resolve_model(model) -> ModelSource:
    """The rule for ``--model`` / ``model=``, without torch or the network.

    An existing folder is a local checkpoint (it must hold ``config.json``); else a name
    of the form ``owner/name`` is a hub id; anything else (``./x``, ``x\\y``, absolute
    paths, a bare name) is a folder that does not exist: ModelLoadError.
    """
    if isinstance(model, ModelSource):
        return model
    name = str(model)
    if not name.strip():
        raise ModelLoadError("no model given: pass a hub id (owner/name) or a checkpoint folder")
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"cannot load model '{name}': the folder has no config.json "
                                 "(it holds no saved checkpoint)")
        return ModelSource(name, str(folder.resolve()), local=True)
    if folder.exists():
        raise ModelLoadError(f"cannot load model '{name}': it is a file; give the folder that "
                             "holds the checkpoint")
    if looks_like_hub_id(name):
        return ModelSource(name, name, local=False)
    raise ModelLoadError(f"cannot load model '{name}': no such folder")


def prepare_model(model) -> ModelSource:
    """:func:`resolve_model`, then for a hub id one short request (no retries) to see
    whether the hub answers; offline, a model in the local Hugging Face cache is used
    from there. A hub id that can be neither fetched nor found in the cache is one
    ModelLoadError. Imports no torch: the command line calls it before loading. A folder
    used for a name that is also a hub id's is logged (info)."""
    if isinstance(model, ModelSource) and (model.local or model.offline is not None):
        return model  # prepared already
    source = resolve_model(model)
    if source.note:
        log.info(source.note)
    return source if source.local else replace(source, offline=_hub_unreachable(source))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or HUB_TIMEOUT_S)
    except ValueError:
        return HUB_TIMEOUT_S


def _hub_failure(source: ModelSource, why: str) -> str:
    return (f"cannot load model '{source.name}': no such folder, and no such model on the hub "
            f"(or offline: {why}); check the name, or go online (for a gated model, accept its "
            f"licence at https://huggingface.co/{source.location} and run `hf auth login`)")


def _hub_unreachable(source: ModelSource) -> bool:
    """False: the hub serves the model; True: it does not, but the local cache holds it."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError

    repo = source.location
    cached = isinstance(try_to_load_from_cache(repo, "config.json"), str)
    if constants.is_offline_mode() or _env_true("HF_HUB_OFFLINE"):
        if cached:
            return True
        raise ModelLoadError(_hub_failure(source, "HF_HUB_OFFLINE is set and it is not in the "
                                                  "local Hugging Face cache"))
    try:
        get_hf_file_metadata(hf_hub_url(repo, "config.json"), timeout=_hub_timeout())
    except Exception as e:  # noqa: BLE001 - gated, not found, no network, timeout: one try
        if cached:
            return True
        if isinstance(e, GatedRepoError):
            raise ModelLoadError(
                f"cannot load model '{source.name}': no such folder, and the hub model is gated: "
                f"accept its licence at https://huggingface.co/{repo}, log in with "
                "`hf auth login` and retry") from None
        raise ModelLoadError(_hub_failure(source, type(e).__name__)) from None
    return False


def checkpoint_type(source: ModelSource) -> str | None:
    """``model_type`` of the checkpoint's config.json (sam3, sam3_tracker, sam3_video, ...)."""
    try:
        if source.local:
            path = Path(source.location) / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source.location, "config.json", **source.hub_options())
        return json.loads(Path(path).read_text(encoding="utf-8")).get("model_type")
    except Exception:  # noqa: BLE001 - unreadable: the load itself will say what is wrong
        return None


# -- loading, quietly, all or nothing ---------------------------------------------------------
_QUIET = {"depth": 0, "saved": None}  # quiet loads running now, and what they replaced
_QUIET_LOCK = threading.Lock()


def _set_tqdm_hook(hf_logging, hook):
    """transformers' tqdm hook (None: none); returns the previous one."""
    setter = getattr(hf_logging, "set_tqdm_hook", None)  # not in every transformers 5.x
    return setter(hook) if setter else None


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own output off during the loads we make on purpose: its warnings (load
    reports of unexpected weights, "You are using a model of type ...") and its "Loading
    weights" bar. Hub download bars stay. Real problems become one ModelLoadError of ours."""
    from transformers.utils import logging as hf_logging

    def no_bar(_tqdm, args, kwargs):
        return hf_logging.EmptyTqdm(*args, **kwargs)

    with _QUIET_LOCK:  # loads in several threads: the first in saves, the last out restores
        if _QUIET["depth"] == 0:
            _QUIET["saved"] = (hf_logging.get_verbosity(), _set_tqdm_hook(hf_logging, no_bar))
            hf_logging.set_verbosity_error()
        _QUIET["depth"] += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET["depth"] -= 1
            if _QUIET["depth"] == 0:
                level, hook = _QUIET["saved"]
                hf_logging.set_verbosity(level)
                _set_tqdm_hook(hf_logging, hook)


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_checkpoint(cls, source: ModelSource, what: str, missing_message, *,
                    needed=lambda key: True, **kwargs):
    """``cls.from_pretrained`` (safetensors only, no remote code, quiet) from a prepared
    source. Every weight the model needs (``needed(key)``) must be in the checkpoint:
    otherwise ``missing_message(missing_keys, n_tensors)`` is the ModelLoadError. Weights
    the model does not use (a fuller checkpoint) are fine."""
    try:
        with quiet_transformers():
            net, info = cls.from_pretrained(
                source.location, use_safetensors=True, trust_remote_code=False,
                output_loading_info=True, ignore_mismatched_sizes=True,  # checked below
                **source.hub_options(), **kwargs)
    except OSError as e:
        if source.local:
            raise ModelLoadError(f"cannot load model '{source.name}': {first_line(e)}") from e
        raise ModelLoadError(
            f"cannot load model '{source.name}': it is not (completely) in the local Hugging "
            f"Face cache and could not be downloaded ({type(e).__name__}). Accept the licence at "
            f"https://huggingface.co/{source.location}, log in with `hf auth login` and retry "
            "online, or pass a local folder holding the checkpoint") from e
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load '{source.name}' as {what}: {first_line(e)}") from e
    mismatched = sorted(m for m in info.get("mismatched_keys", ()) if needed(m[0]))
    if mismatched:
        key, stored, wanted = mismatched[0]
        raise ModelLoadError(
            f"'{source.name}' does not match its config.json: {len(mismatched)} weights have "
            f"other shapes (e.g. {key}: {tuple(stored)} in the checkpoint, {tuple(wanted)} "
            "by the config); the checkpoint or its config.json was changed"
        )
    missing = sorted(k for k in info.get("missing_keys", ()) if needed(k))
    if missing:
        raise ModelLoadError(missing_message(missing, len(net.state_dict())))
    return net


def load_processor(cls, source: ModelSource):
    """``cls.from_pretrained`` of the checkpoint's processor, quietly."""
    with quiet_transformers():
        return cls.from_pretrained(source.location, **source.hub_options())


def _concept_checkpoint_message(name: str) -> str:
    return (f"'{name}' is a SAM3 concept checkpoint (Sam3Model): it finds objects from text or "
            "exemplar boxes (--text/--exemplars, ConceptSegmenter); points and boxes need "
            f"{DEFAULT_MODEL} or a Sam3Tracker checkpoint")


# facebook/sam3 is a Sam3Video checkpoint: the tracker's weights sit under
# ``tracker_model.``, its neck under ``tracker_neck.``, and the ViT it shares with the
# detector under ``detector_model.vision_encoder.backbone.``; transformers renames these
# when it loads a Sam3TrackerModel. A Sam3Video checkpoint saved by transformers 5.24
# itself holds ``tracker_model.tracker_model.``: loading that as Sam3TrackerModel leaves
# its prompt encoder and mask decoder (147 tensors) random. This mapping, applied before
# transformers' own, loads both layouts whole; on a tracker checkpoint it matches nothing.
TRACKER_KEY_MAPPING = {
    r"^tracker_model\.": "",
    r"^tracker_neck\.": "vision_encoder.neck.",
    r"^detector_model\.vision_encoder\.backbone\.": "vision_encoder.backbone.",
}


def load_tracker(model: str = DEFAULT_MODEL, device: str = "cpu", dtype=None):
    """Load ``(Sam3TrackerModel, Sam3TrackerProcessor)`` from a hub id or a local folder.

    A checkpoint without all the tracker's weights is refused (ModelLoadError), never
    run with random ones. Weights are read from safetensors only; remote code is never
    trusted.
    """
    source = prepare_model(model)
    from transformers import Sam3ImageProcessor, Sam3TrackerModel, Sam3TrackerProcessor

    def missing_message(missing, total):
        if checkpoint_type(source) == "sam3":
            return _concept_checkpoint_message(source.name)
        return (f"'{source.name}' is not a complete SAM3 tracker checkpoint: {len(missing)} of "
                f"{total} weights are missing (e.g. {missing[0]}); points and boxes need "
                f"{DEFAULT_MODEL} or a Sam3Tracker checkpoint")

    net = load_checkpoint(Sam3TrackerModel, source, "a SAM3 tracker", missing_message,
                          dtype=resolve_dtype(dtype, device), key_mapping=TRACKER_KEY_MAPPING)
    net = net.to(device).eval()
    try:
        processor = load_processor(Sam3TrackerProcessor, source)
    except (OSError, ValueError, TypeError):
        side = net.config.vision_config.backbone_config.image_size
        processor = Sam3TrackerProcessor(
            image_processor=Sam3ImageProcessor(size={"height": side, "width": side})
        )
    return net, processor


# -- identity for the embedding cache ---------------------------------------------------------
_WEIGHT_HASHES: dict[tuple, str] = {}
_CONFIG_NOISE = frozenset({"_name_or_path", "name_or_path", "transformers_version",
                           "_commit_hash", "dtype", "torch_dtype", "_attn_implementation_autoset"})


def _file_hash(path: Path) -> str:
    """blake2b of a weights file, memoised per (path, size, mtime) in this process."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _WEIGHT_HASHES:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _WEIGHT_HASHES[memo] = h.hexdigest()
    return _WEIGHT_HASHES[memo]


def _hub_revision(repo: str) -> str | None:
    """The commit of a hub model as loaded: its snapshot folder in the local hub cache."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, "config.json")
    return Path(path).parent.name if isinstance(path, str) else None


def _settings(value):
    """A config dict without what does not change results (paths, versions, dtype)."""
    if isinstance(value, dict):
        return {k: _settings(v) for k, v in value.items() if k not in _CONFIG_NOISE}
    if isinstance(value, list | tuple):
        return [_settings(v) for v in value]
    return value


def settings_hash(settings: dict) -> str:
    text = json.dumps(_settings(settings), sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def model_fingerprint(source, net, processor=None) -> dict:
    """What identifies the model's output, for cache keys: the model class, its config,
    the image processor's settings (resize, rescale, normalisation) and the weights: for
    a hub id its id and revision, for a local folder the hashes of its safetensors files.
    A folder's path is not part of it: ``tiny``, ``./tiny`` and ``/abs/tiny`` are one model.
    """
    src = resolve_model(source)
    fp = {"class": type(net).__name__, "config": settings_hash(net.config.to_dict())}
    if src.local:
        fp["id"] = "local folder"
        folder = Path(src.location)
        fp["weights"] = {p.name: _file_hash(p) for p in sorted(folder.glob("*.safetensors"))}
    else:
        fp["id"] = src.location
        fp["revision"] = _hub_revision(src.location)
    if processor is not None:
        image_processor = getattr(processor, "image_processor", processor)
        fp["processor"] = settings_hash(image_processor.to_dict())
    return fp


def load_video_tracker(model: str, device: str = "cpu", dtype=None):
    """Load ``(Sam3TrackerVideoModel, Sam3TrackerVideoProcessor)`` for propagation.

    The video model is built without its vision encoder: frames come from the image
    tracker's embeddings (cached), so the big ViT is held once.
    """
    source = prepare_model(model)
    from transformers import Sam3TrackerVideoModel, Sam3TrackerVideoProcessor

    def missing_message(missing, total):
        return (f"'{source.name}' has no video-tracker memory weights ({len(missing)} of {total} "
                f"missing, e.g. {missing[0]}): propagation needs {DEFAULT_MODEL} or a "
                "Sam3TrackerVideo checkpoint")

    net = load_checkpoint(Sam3TrackerVideoModel, source, "a SAM3 video tracker for propagation",
                          missing_message, needed=lambda key: "vision_encoder" not in key,
                          dtype=resolve_dtype(dtype, device), remove_vision_encoder=True)
    try:
        processor = load_processor(Sam3TrackerVideoProcessor, source)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot load the video processor of '{source.name}': "
                             f"{first_line(e)}") from e
    return net.to(device).eval(), processor


# -- checking where tensors enter the model -----------------------------------------------------
class BoundaryError(AssertionError):
    """A tensor entered a model module on another device, or in another floating dtype."""


def _tensors(value, path="input"):
    import torch

    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{path}.{k}")
    elif hasattr(value, "__dataclass_fields__") or hasattr(value, "to_tuple"):  # model outputs
        for k, v in vars(value).items():
            yield from _tensors(v, f"{path}.{k}")


@contextlib.contextmanager
def device_guard(model, dtype_depth: int = 1):
    """While inside, every tensor entering any module of ``model`` must lie on the
    model's device, and every floating tensor entering the model or a module at most
    ``dtype_depth`` levels below it must have the model's dtype; else BoundaryError names
    the module and the input. For tests and GPU checks (hooks cost a little per call)."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    handles = []

    def check(name, depth):
        def hook(_module, args, kwargs):
            for where, t in _tensors((args, kwargs), "args"):
                if t.device != device and t.dim() > 0:
                    raise BoundaryError(f"{name}: {where} is on {t.device}, the model on {device}")
                if depth <= dtype_depth and t.is_floating_point() and t.dtype != dtype:
                    raise BoundaryError(f"{name}: {where} is {t.dtype}, the model {dtype}")
        return hook

    for name, module in model.named_modules():
        depth = 0 if not name else name.count(".") + 1
        handles.append(module.register_forward_pre_hook(check(name or type(model).__name__,
                                                              depth), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
