"""Loading SAM3 tracker weights through transformers (safetensors only).

torch and transformers are imported inside the functions, so importing this
module (and napari's start-up) stays light.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DEFAULT_MODEL = "facebook/sam3"


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to do."""


def resolve_device(device: str = "auto") -> str:
    """'auto' -> CUDA, then Apple MPS, then CPU. Other names are checked."""
    import torch

    device = (device or "auto").lower()
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
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    return device


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


def _offline_message(model: str, err: Exception) -> str:
    return (
        f"cannot load model '{model}': it is not in the local Hugging Face cache and could not "
        f"be downloaded ({type(err).__name__}). Accept the licence at "
        f"https://huggingface.co/{model}, log in with `hf auth login` and retry online, "
        "or pass a local folder holding the checkpoint"
    )


def load_tracker(model: str = DEFAULT_MODEL, device: str = "cpu", dtype=None):
    """Load ``(Sam3TrackerModel, Sam3TrackerProcessor)`` from a hub id or a local folder.

    Weights are read from safetensors only; remote code is never trusted.
    """
    import torch  # noqa: F401
    from transformers import Sam3ImageProcessor, Sam3TrackerModel, Sam3TrackerProcessor

    model = str(model)
    local = Path(model).expanduser()
    is_local = local.exists()
    if not is_local and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise ModelLoadError(f"cannot load model '{model}': no such folder")
    if is_local and not (local / "config.json").is_file():
        raise ModelLoadError(f"cannot load model '{model}': the folder has no config.json")
    source = str(local) if is_local else model
    torch_dtype = resolve_dtype(dtype, device)
    try:
        net = Sam3TrackerModel.from_pretrained(
            source, dtype=torch_dtype, use_safetensors=True, trust_remote_code=False
        )
    except OSError as e:
        if is_local:
            raise ModelLoadError(f"cannot load model '{model}': {str(e).splitlines()[0]}") from e
        raise ModelLoadError(_offline_message(model, e)) from e
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(
            f"cannot load model '{model}' as a SAM3 tracker: {str(e).splitlines()[0]}"
        ) from e
    net = net.to(device).eval()
    try:
        processor = Sam3TrackerProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        side = net.config.vision_config.backbone_config.image_size
        processor = Sam3TrackerProcessor(
            image_processor=Sam3ImageProcessor(size={"height": side, "width": side})
        )
    return net, processor


_WEIGHT_HASHES: dict[tuple, str] = {}


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


def model_fingerprint(source: str, net) -> dict:
    """What identifies the weights: id, hub revision, config hash, weights hash (local)."""
    config_json = net.config.to_json_string(use_diff=False)
    fp = {
        "id": str(source),
        "revision": getattr(net.config, "_commit_hash", None),
        "config": hashlib.blake2b(config_json.encode(), digest_size=16).hexdigest(),
        "class": type(net).__name__,
    }
    local = Path(str(source)).expanduser()
    if local.is_dir():
        fp["weights"] = {p.name: _file_hash(p) for p in sorted(local.glob("*.safetensors"))}
    return fp


def load_video_tracker(model: str, device: str = "cpu", dtype=None):
    """Load ``(Sam3TrackerVideoModel, Sam3TrackerVideoProcessor)`` for propagation.

    The video model is built without its vision encoder: frames come from the image
    tracker's embeddings (cached), so the big ViT is held once.
    """
    from transformers import Sam3TrackerVideoModel, Sam3TrackerVideoProcessor

    model = str(model)
    local = Path(model).expanduser()
    source = str(local) if local.exists() else model
    try:
        net, info = Sam3TrackerVideoModel.from_pretrained(
            source, dtype=resolve_dtype(dtype, device), use_safetensors=True,
            trust_remote_code=False, remove_vision_encoder=True, output_loading_info=True)
    except OSError as e:
        if local.exists():
            raise ModelLoadError(f"cannot load model '{model}': {str(e).splitlines()[0]}") from e
        raise ModelLoadError(_offline_message(model, e)) from e
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load '{model}' as a SAM3 video tracker for propagation: "
                             f"{str(e).splitlines()[0]}") from e
    missing = [k for k in info.get("missing_keys", []) if "vision_encoder" not in k]
    if missing:
        raise ModelLoadError(f"'{model}' has no video-tracker memory weights ({missing[0]}, ...): "
                             "propagation needs facebook/sam3 or a Sam3TrackerVideo checkpoint")
    try:
        processor = Sam3TrackerVideoProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"cannot load the video processor of '{model}': "
                             f"{str(e).splitlines()[0]}") from e
    return net.to(device).eval(), processor
