"""Propagating objects through z or t with transformers' SAM3 video tracker.

Frames never go through the video model's own encoder: each slice is encoded
by the image tracker (or read from the embedding cache) and its features are
handed to the inference session, so a stack is encoded once for clicks and
propagation alike. Memory stays bounded: the session sees a frame count, not
the frames, and the per-frame memories of slices the tracker can no longer
attend to are dropped as propagation moves on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from .checks import is_whole, whole_number
from .defaults import DEFAULT_DIRECTION, DEFAULT_STOP_AFTER, MAX_ID
from .heap import trim_heap
from .normalize import _sample, check_limits, robust_limits
from .planes import PlaneView
from .postprocess import paste_objects
from .prompts import ObjectPrompt, PromptError, as_prompts, box_to_xyxy, rowcol_to_xy
from .tiling import Tile

# what later slices read of a tracked one: its object pointer and score (small, kept
# longest) and its mask memory; never its masks
_POINTER_KEYS = ("object_pointer", "object_score_logits")
_MEMORY_KEYS = ("maskmem_features", "maskmem_pos_enc")
TRIM_EVERY = 32  # slices between returns of freed heap memory to the system


@dataclass
class SliceResult:
    """The tracked objects on one slice: logits over ``region`` of the slice, per id."""

    index: int
    region: tuple[slice, slice]
    ids: list[int]
    logits: list[np.ndarray]
    object_scores: list[float]


class StackFrames:
    """Slices of an nD array-like along ``axis``, other non-spatial axes fixed.

    ``stack`` is (..., Y, X) or (..., Y, X, C) for RGB; ``fixed`` maps the other
    leading axes to an index (e.g. z in a TZYX series propagated along t).
    """

    def __init__(self, stack, axis: int = 0, fixed: Mapping[int, int] | None = None,
                 rgb: bool | None = None):
        self.stack = stack
        shape = tuple(stack.shape)
        self.rgb = (shape[-1] in (3, 4)) if rgb is None else bool(rgb)
        n_lead = len(shape) - (3 if self.rgb else 2)
        if n_lead < 1:
            raise ValueError(f"a stack needs a z or t axis; got shape {shape}")
        axis = whole_number("axis", axis)
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis {axis} is out of range for data of shape {shape}")
        axis %= len(shape)  # NumPy's negative axes; never wrapped past the end
        if axis >= n_lead:
            raise ValueError(f"axis {axis} is a spatial axis of shape {shape}")
        fixed = dict(fixed or {})
        missing = [a for a in range(n_lead) if a != axis and a not in fixed]
        if missing:
            raise ValueError(f"fix the index of axes {missing} (e.g. the z of a TZYX series)")
        for a, k in fixed.items():
            if a not in range(n_lead) or a == axis:
                raise ValueError(f"fixed axis {a!r} is not another leading axis of shape {shape}")
            whole_number(f"the fixed index of axis {a}", k, 0, shape[a] - 1)
        self.axis, self.fixed, self.n_lead = axis, fixed, n_lead
        self.depth = shape[axis]
        self.shape = shape[n_lead:]  # one slice: (Y, X) or (Y, X, C)

    def __len__(self) -> int:
        return self.depth

    def index(self, k: int) -> tuple:
        return tuple(k if a == self.axis else self.fixed[a] for a in range(self.n_lead))

    def __getitem__(self, k: int):
        """Slice ``k`` lazily: a view that reads only what is indexed from it."""
        return PlaneView(self.stack, self.index(k))


class _FrameCount(dict):
    """Stands in for the session's frame store: the length of the stack, no pixels."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __missing__(self, key):
        raise RuntimeError(f"slice {key} has no features in the session")


def normalize_prompts(prompts_by_slice, plane=None) -> dict[int, dict[int, ObjectPrompt]]:
    """{slice: {id: ObjectPrompt}}; a list per slice gives ids 1, 2, ... in order.

    Slices and ids must be whole numbers (ids from 1); with ``plane`` (Y, X), prompts
    must lie inside it. Errors name the slice and the object."""
    if not isinstance(prompts_by_slice, Mapping):
        raise PromptError("prompts_by_slice must be a dict {slice: prompts}, got "
                          f"{type(prompts_by_slice).__name__}")
    out: dict[int, dict[int, ObjectPrompt]] = {}
    for k, objs in prompts_by_slice.items():
        try:
            k = whole_number("a slice index", k)
            items = list(objs.items() if isinstance(objs, Mapping) else enumerate(objs, 1))
            ids = [whole_number("a label id", i, 1, MAX_ID) for i, _ in items]
        except TypeError:
            raise PromptError(f"slice {k}: give a list of prompts or a dict {{id: prompt}}, "
                              f"got {type(objs).__name__}") from None
        except ValueError as e:
            raise PromptError(f"slice {k}: {e}" if is_whole(k) else str(e)) from None
        try:
            out[k] = dict(zip(ids, as_prompts([p for _, p in items], plane, ids), strict=True))
        except PromptError as e:
            raise PromptError(f"slice {k}, {e}") from None
    return out


class Propagator:
    """Tracks the objects of one tile (or whole slices) through a stack."""

    def __init__(self, segmenter, video_model, video_processor):
        self.seg = segmenter
        self.model = video_model
        self.processor = video_processor
        cfg = video_model.config
        # how far back the tracker looks from the slice it tracks: the mask memories of the
        # last num_maskmem - 1 slices and the object pointers of the last
        # max_object_pointers_in_encoder - 1 (transformers' _gather_memory_frame_outputs and
        # _get_object_pointers read nothing else of a tracked slice)
        self.memory_reach = cfg.num_maskmem - 1
        self.pointer_reach = cfg.max_object_pointers_in_encoder - 1
        self._pos = None

    def position_embeddings(self, raw):
        """The sine position encodings of the three levels (the same for every frame)."""
        if self._pos is None:
            neck = self.seg.model.vision_encoder.neck
            channels = self.seg.model.config.vision_config.fpn_hidden_size
            self._pos = [neck.position_encoding((1, channels, *f.shape[-2:]), f.device, f.dtype)
                         .flatten(2).permute(2, 0, 1) for f in raw]
        return self._pos

    def run(self, frames: StackFrames, prompts: dict[int, dict[int, ObjectPrompt]], *,
            tile: Tile, padded_shape, limits, direction: str = DEFAULT_DIRECTION, start: int = 0,
            stop: int | None = None, score_threshold: float = 0.0, stop_after: int = DEFAULT_STOP_AFTER,
            ) -> Iterator[SliceResult]:
        """Yield each slice's result as it is computed (prompted slices included)."""
        import torch

        stop = len(frames) if stop is None else stop
        prompted = sorted(prompts)
        in_range = [k for k in prompted if start <= k < stop]
        if not in_range:
            raise PromptError(f"no prompted slice between {start} and {stop - 1}")
        session = self.processor.init_video_session(
            inference_device=self.seg.device, dtype=self.seg.dtype,
            max_vision_features_cache_size=1)
        session.processed_frames = _FrameCount(len(frames))
        self.last_session = session  # for inspection (tests, benchmarks)
        session.video_height, session.video_width = padded_shape
        # "both" runs backward from the slice before the first prompted one after the forward
        # pass: that slice reads the forward pass's outputs just after it
        anchor = in_range[0] - 1 if direction == "both" and in_range[0] > start else None

        def step(k: int, reverse: bool = False):
            emb = self.seg.embed_rgb(self.seg.tile_rgb(frames[k], _Grid(tile, padded_shape),
                                                       tile, limits), {"slice": k})
            session.cache.cache_vision_features(k, {
                "vision_feats": [f.flatten(2).permute(2, 0, 1) for f in emb.raw],
                "vision_pos_embeds": self.position_embeddings(emb.raw)})
            with torch.inference_mode():
                return self.model(inference_session=session, frame_idx=k, reverse=reverse)

        def prune(k: int, reverse: bool):
            # after slice k the next one is k + 1 (k - 1 in reverse); of every slice behind it,
            # keep what a later slice still reads: its mask memory and pointer within the
            # mask-memory reach, only its pointer within the pointer reach, nothing beyond
            # (memory flat in depth)
            for per_obj in session.output_dict_per_obj.values():
                tracked = per_obj["non_cond_frame_outputs"]
                for f in list(tracked):
                    need = self._need((f - k if reverse else k - f) + 1)
                    if anchor is not None and not reverse:
                        need = max(need, self._need(f - anchor))
                    if need == 0:
                        del tracked[f]
                        continue
                    keep = _POINTER_KEYS if need == 1 else _POINTER_KEYS + _MEMORY_KEYS
                    for key in [key for key in tracked[f] if key not in keep]:
                        del tracked[f][key]  # its masks (high-res: 4 MB a slice) are never read

        # conditioning: every prompted slice in order, one object at a time (transformers
        # keeps only the objects of the latest add_inputs call as "new"). The step for one
        # object tracks the others at k too; an object prompted at k after that would be
        # taken as a correction of a tracked slice (not a conditioning one) and its prompt
        # lost to the pass, so what that step tracked of it is forgotten first
        for k in prompted:
            for obj_id, p in prompts[k].items():
                self._add_inputs(session, k, obj_id, p, tile, padded_shape)
                idx = session.obj_id_to_idx(obj_id)
                session.frames_tracked_per_obj[idx].pop(k, None)
                session.output_dict_per_obj[idx]["non_cond_frame_outputs"].pop(k, None)
                step(k)
        # "both": forward from the first prompted slice, then backward from the slice
        # before it, so every slice is tracked (and reported) once
        passes = []
        if direction in ("forward", "both"):
            passes.append((in_range[0], False))
        if direction in ("backward", "both"):
            passes.append((in_range[0] - 1 if direction == "both" else in_range[-1], True))
        for first, reverse in passes:
            gone: dict[int, int] = {}
            order = range(first, start - 1, -1) if reverse else range(first, stop)
            for k in order:
                out = step(k, reverse)
                ids = [int(i) for i in out.object_ids]
                scores = out.object_score_logits.float().reshape(-1).cpu().numpy()
                for i, s in zip(ids, scores, strict=True):
                    gone[i] = gone.get(i, 0) + 1 if s < score_threshold else 0
                yield self._result(k, out, ids, scores, tile, padded_shape, gone, stop_after)
                prune(k, reverse)
                if k % TRIM_EVERY == 0:
                    trim_heap()
                if k not in prompted and all(gone.get(i, 0) >= stop_after for i in ids):
                    break

    def _need(self, distance: int) -> int:
        """What a slice ``distance`` slices behind the next one tracked is still read for:
        2 its mask memory and object pointer, 1 its object pointer only, 0 nothing. Slices
        ahead (distance < 1, tracked while conditioning) keep both until a pass redoes them."""
        if distance < 1 or distance <= self.memory_reach:
            return 2
        return 1 if distance <= self.pointer_reach else 0

    def _add_inputs(self, session, k, obj_id, p: ObjectPrompt, tile, padded_shape):
        local = p.shifted(tile.r0, tile.c0)
        if p.mask is not None:
            mask = np.zeros(padded_shape, dtype=bool)
            mask[:tile.shape[0], :tile.shape[1]] = p.mask[tile.slices]
            self.processor.add_inputs_to_inference_session(
                session, frame_idx=k, obj_ids=[obj_id], input_masks=mask.astype(np.float32))
            return
        kwargs = {}
        if len(local.points):
            kwargs["input_points"] = [[rowcol_to_xy(local.points)]]
            kwargs["input_labels"] = [[local.point_labels.tolist()]]
        if local.box is not None:
            kwargs["input_boxes"] = [[box_to_xyxy(local.box)]]
        self.processor.add_inputs_to_inference_session(session, frame_idx=k, obj_ids=[obj_id],
                                                       **kwargs)

    def _result(self, k, out, ids, scores, tile, padded_shape, gone, stop_after) -> SliceResult:
        masks = out.pred_masks.float()  # (n_obj, 1, h, w), upsampled where it lies (GPU)
        logits = self.processor.post_process_masks([masks], [list(padded_shape)],
                                                   binarize=False)[0][:, 0].cpu().numpy()
        h, w = tile.shape
        keep = [j for j, i in enumerate(ids) if gone.get(i, 0) < stop_after]
        return SliceResult(index=k, region=tile.slices, ids=[ids[j] for j in keep],
                           logits=[logits[j, :h, :w] for j in keep],
                           object_scores=[float(scores[j]) for j in keep])


class _Grid:
    """The bits of a TileGrid that ``Sam3Segmenter.tile_rgb`` needs for one tile."""

    def __init__(self, tile: Tile, padded_shape):
        self.tile, self._padded = tile, tuple(padded_shape)

    def read(self, image, tile):
        return np.asarray(image[tile.slices])

    def padded_shape(self, tile):
        return self._padded


def write_slice(out, result, max_hole_area: int = 0, max_sprinkle_area: int = 0) -> None:
    """Write one ``SliceResult`` into ``out[index]``: its ids are replaced in the region,
    other labels are kept."""
    window = (result.index,) + tuple(result.region)
    region = np.array(out[window])
    region[np.isin(region, result.ids)] = 0
    whole = (slice(0, region.shape[0]), slice(0, region.shape[1]))
    paste_objects(region, [(whole, lg) for lg in result.logits], result.ids,
                  max_hole_area, max_sprinkle_area, overwrite=False)
    out[window] = region


def stack_limits(frames: StackFrames, limits=None):
    """One normalisation for the whole stack: ``limits`` as given, or percentiles of a
    sample of up to 8 slices (windows of large ones), never per-slice min/max."""
    if limits is not None:
        return check_limits(limits)
    if frames.rgb and frames.stack.dtype == np.uint8 and frames.shape[-1] in (3, 4):
        return None
    picks = np.unique(np.linspace(0, len(frames) - 1, min(8, len(frames))).astype(int))
    channels = frames.shape[2:]
    sample = np.concatenate([_sample(frames[k]).reshape((-1,) + channels) for k in picks])
    if not channels:
        return robust_limits(sample)
    return [robust_limits(sample[:, i]) for i in range(min(3, channels[0]))]
