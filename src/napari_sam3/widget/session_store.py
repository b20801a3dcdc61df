"""Save session, Open session and autosave of one dock widget, off the GUI thread.

Everything that reads or writes a session folder (:mod:`napari_sam3.core.session_folder`)
or fingerprints an image runs in one background thread, in the order it was asked
for, so an autosave never races a save into the same folder. The GUI thread only takes
snapshots (prompts, settings, the provenance: small) and applies what was read.

Autosave: after each recorded write into the labels layer (``session.labels_recorded``
and napari's paint events of the layer) the written region, and only it, goes into the
session folder at every level; into an autosave folder under the user's data folder
(``core.session_folder.autosave_root``) until a session is saved or opened. When an
image is chosen, an autosave of it (same path or name, same pixels) is offered:
``offer`` is emitted and a notification with *Restore* / *Discard* shown.
"""

from __future__ import annotations

import json
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from qtpy.QtCore import QObject, QTimer, Signal

from ..core import session_folder as sf
from .errors import UserError, guarded, log, qt_deleted, user_message
from .image_source import level0, same, unwrap
from .session_snapshot import (
    WidgetSettings,
    boxes_record,
    distinct_regions,
    find_channels,
    find_image,
    image_ref,
    paint_regions,
    points_record,
    restore_channels,
    restore_contrast,
    restore_prompts,
)


@dataclass
class Track:
    """Where one labels layer's session goes: its folder (None until the first
    autosave), whether that folder holds the layer's labels, the regions not yet written."""

    image: object
    labels: object
    folder: Path | None = None
    ready: bool = False
    autosave: bool = True  # the folder is an autosave (removed once saved elsewhere)
    created: bool = False  # this process wrote the folder (else it was opened)
    pending: list = field(default_factory=list)
    queued: bool = False
    snapshot: dict | None = None


class SessionStore(QObject):
    """Saves, opens and autosaves the session of a dock widget (see the module doc)."""

    autosaved = Signal(str)  # the folder an autosave landed in
    saved = Signal(str)
    opened = Signal(str)
    offer = Signal(object)  # an autosave folder found for the image (None: no offer)
    _done = Signal(object)  # (callback, result, error) from the worker thread

    def __init__(self, session, binder, settings: WidgetSettings, parent=None):
        super().__init__(parent)
        self.session, self.binder, self.settings = session, binder, settings
        self.viewer = binder.viewer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="napari-sam3-session")
        self._lock = threading.Lock()
        self._jobs = 0
        self._tracks: dict[int, Track] = {}
        self._watched: dict[int, object] = {}
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.offered: Path | None = None
        self.last_autosave: Path | None = None  # the folder the last autosave went to
        self.last_opened: Path | None = None  # the session opened last
        self.restoring = False
        self._opening: Path | None = None  # the session folder being opened
        self._unflushed: dict[int, tuple[Track, list]] = {}  # regions written, not yet queued
        self._flush_queued = False
        self._done.connect(self._on_done)
        session.labels_recorded.connect(self._on_recorded)
        binder.role_changed.connect(self._on_role_changed)
        session.on_close(self.close)
        self._watch(binder.labels_layer)
        self.check_autosaves()

    # -- the worker thread --------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Jobs are queued or running (their results not yet applied)."""
        return (self._jobs > 0 or self._flush_queued) and not self.session.closed

    def _submit(self, fn, on_done=None, on_error=None) -> None:
        self._jobs += 1
        ref = weakref.ref(self)

        def run():
            try:
                result, error = fn(), None
            except Exception as exc:  # noqa: BLE001 - reported on the GUI thread
                log.debug("SAM3: session job failed", exc_info=True)
                result, error = None, exc
            store = ref()
            if store is None or qt_deleted(store):
                return
            try:
                store._done.emit((on_done, on_error, result, error))
            except RuntimeError:  # the widget is gone
                pass

        self._pool.submit(run)

    @guarded
    def _on_done(self, item) -> None:
        self._jobs -= 1
        on_done, on_error, result, error = item
        if error is not None:
            if on_error is not None:
                on_error(error)
            else:
                self.session.report(f"SAM3: {user_message(error)}")
        elif on_done is not None:
            on_done(result)

    def wait(self) -> None:
        """Block until every queued job has run (their GUI callbacks may still follow)."""
        self._pool.submit(lambda: None).result()

    def close(self) -> None:
        """Let the queued writes land, then stop the thread."""
        for raw, callback in list(self._watched.values()):
            try:
                raw.events.paint.disconnect(callback)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._watched.clear()
        self._pool.shutdown(wait=True)

    def _fingerprint(self, image) -> dict:
        """The image's content fingerprint (worker thread; once per layer and data)."""
        from ..core.provenance import image_fingerprint

        raw = unwrap(image)
        data = level0(raw)
        hit = self._fingerprints.get(raw)
        if hit is not None and hit[0] is data:
            return hit[1]
        fp = image_fingerprint(data)
        self._fingerprints[raw] = (data, fp)
        return fp

    # -- snapshots (GUI thread) ---------------------------------------------------------------------
    def _target(self, labels):
        return self.binder.targets.of(labels)

    def _snapshot(self, image, labels) -> dict:
        from .._writers import PROVENANCE_KEY

        target = self._target(labels)
        shape = [int(s) for s in target.shape]
        raw = unwrap(labels)
        prov = raw.metadata.get(PROVENANCE_KEY)
        if hasattr(prov, "to_dict"):  # its fingerprint may still be computed: in the worker
            prov = (prov, list(prov.operations))
        elif prov is not None:
            prov = json.loads(json.dumps(prov))
        pyramid = getattr(target, "pyramid", None)
        return {"image": image_ref(image),
                "labels": {"name": raw.name, "shape": shape, "n_lead": len(shape) - 2},
                "settings": dict(self.settings.read(self.session), channels=[
                    image_ref(ly) for ly in (self.binder.channels or [])[1:]]),
                "object_id": int(self.session.object_id),
                "points": points_record(self.binder.points_layer),
                "boxes": boxes_record(self.binder.shapes_layer),
                "provenance": prov,
                "levels": None if pyramid is None else [tuple(lv.shape) for lv in
                                                        pyramid.levels],
                "source": target.data}

    def _record(self, snap: dict, image) -> tuple[dict, dict]:
        """(the record, the snapshot with the provenance as a dict) with the image's
        fingerprint (worker)."""
        prov = snap["provenance"]
        if isinstance(prov, tuple):  # (Provenance, its operations when the snapshot was taken)
            log_, ops = prov
            prov = {**log_.to_dict(), "operations": ops}
            snap = dict(snap, provenance=json.loads(json.dumps(prov)))
        ref = dict(snap["image"], fingerprint=self._fingerprint(image))
        record = sf.new_record(image=ref, labels=snap["labels"], settings=snap["settings"],
                               object_id=snap["object_id"], points=snap["points"],
                               boxes=snap["boxes"])
        return record, snap

    # -- autosave ----------------------------------------------------------------------------------
    def _watch(self, labels) -> None:
        if labels is None:
            return
        raw = unwrap(labels)
        if id(raw) in self._watched:
            return

        ref = weakref.ref(raw)

        def on_paint(event):
            layer = ref()
            if layer is not None:
                for region in paint_regions(event, layer.ndim):
                    self._on_recorded(layer, region)

        raw.events.paint.connect(on_paint)
        self._watched[id(raw)] = (raw, on_paint)

    @guarded
    def _on_role_changed(self, role: str) -> None:
        if role == "labels":
            self._watch(self.binder.labels_layer)
        elif role == "image":
            self.check_autosaves()

    def _track(self, labels) -> Track | None:
        raw = unwrap(labels)
        track = self._tracks.get(id(raw))
        if track is not None and track.labels is raw:
            return track
        image = self.binder.image_layer
        if image is None or not same(labels, self.binder.labels_layer):
            return None
        track = Track(unwrap(image), raw)
        self._tracks[id(raw)] = track
        return track

    @guarded
    def _on_recorded(self, labels, region) -> None:
        """A write into ``labels`` over ``region`` (None: anywhere): autosave it once the
        current event is handled (napari's paint event comes before a fill lands in the
        data, and a commit's prompts and object id change after its write is recorded)."""
        if self.restoring or labels is None or self.session.closed:
            return
        track = self._track(labels)
        if track is None or not self.binder.alive(track.image):
            return
        entry = self._unflushed.setdefault(id(track.labels), (track, []))
        entry[1].append(None if region is None else tuple(region))
        if not self._flush_queued:
            self._flush_queued = True
            QTimer.singleShot(0, self._flush)

    @guarded
    def _flush(self) -> None:
        """Queue an autosave of each track written into since the last flush (GUI thread)."""
        self._flush_queued = False
        entries, self._unflushed = list(self._unflushed.values()), {}
        if self.session.closed:
            return
        for track, regions in entries:
            if not self.binder.alive(track.image) or not self.binder.alive(track.labels):
                continue
            snap = self._snapshot(track.image, track.labels)
            with self._lock:
                track.pending.extend(regions)
                track.snapshot = snap
                if track.queued:
                    continue
                track.queued = True
            self._submit(lambda t=track: self._autosave(t), self._on_autosaved,
                         self._autosave_failed)

    def _autosave(self, track: Track) -> Path:
        """Worker: write the track's pending regions (the whole labels the first time)."""
        with self._lock:
            regions, track.pending = track.pending, []
            snap, track.queued = track.snapshot, False
            folder, ready, created = track.folder, track.ready, track.created
        record, snap = self._record(snap, track.image)
        if folder is None or sf._norm(folder.parent) == sf._norm(sf.autosave_root()):
            record["autosave"] = True  # (a session the user saved or opened is not)
        if folder is None or (not ready and (created or not folder.exists())):
            folder = folder or sf.new_autosave_folder(snap["image"]["name"])
            sf.write_session(folder, record, snap["source"], snap["provenance"],
                             image_levels=snap["levels"])
            with self._lock:
                track.folder, track.ready, track.created = folder, True, True
                used = self._held()
            sf.prune_autosaves(record["image"], exclude=used)  # beyond the newest few
            return folder
        if not ready:  # a session opened here: never replaced, the labels that differ go in
            regions = [None]
        try:
            whole = any(r is None for r in regions)
            for region in [None] if whole else distinct_regions(regions):
                sf.update_labels(folder, snap["source"], region)
            sf.set_provenance(folder, snap["provenance"])
            sf.write_record(folder, record)
        except Exception:
            with self._lock:
                track.ready = False  # the next autosave writes the whole labels again
            raise
        with self._lock:
            track.ready = True
        return folder

    @guarded
    def _autosave_failed(self, exc) -> None:
        self.session.report(f"SAM3: autosave failed: {user_message(exc)}", "warning")

    @guarded
    def _on_autosaved(self, folder: Path) -> None:
        self.last_autosave = Path(folder)
        self.autosaved.emit(str(folder))

    # -- offering an autosave -------------------------------------------------------------------------
    def _in_use(self) -> list[Path]:
        return [t.folder for t in list(self._tracks.values()) if t.folder is not None]

    def _held(self) -> list[Path]:
        """The folders being autosaved into or opened."""
        return [*self._in_use(), *([self._opening] if self._opening else [])]

    def check_autosaves(self) -> None:
        """Look for an autosave of the chosen image (worker); ``offer`` says what was found."""
        image = self.binder.image_layer
        if image is None:
            self._set_offer(None)
            return
        ref, used = image_ref(image), self._in_use()

        def find():
            found = sf.find_autosaves(dict(ref, fingerprint=self._fingerprint(image)),
                                      exclude=used)
            return image, (found[0] if found else None)

        self._submit(find, self._on_found, lambda exc: log.debug("SAM3: %s", exc))

    def _busy(self, folder) -> bool:
        """``folder`` is being opened or autosaved into."""
        return any(sf._norm(folder) == sf._norm(p) for p in self._held())

    def _still_offered(self, folder) -> Path | None:
        """The offered autosave if it is ``folder`` (None: whichever is offered) and is
        neither being opened nor in use, else None."""
        offered = self.offered
        if offered is None or (folder is not None and sf._norm(folder) != sf._norm(offered)):
            return None
        return None if self._busy(offered) else offered

    @guarded
    def _on_found(self, result) -> None:
        image, folder = result
        if not same(image, self.binder.image_layer):
            return
        if folder is not None and self._busy(folder):
            folder = None  # being opened, or in use already
        self._set_offer(folder)
        if folder is not None:
            self._notify(folder)

    def _set_offer(self, folder) -> None:
        self.offered = None if folder is None else Path(folder)
        self.offer.emit(self.offered)

    def _notify(self, folder: Path) -> None:
        from napari.utils.notifications import (
            Notification,
            NotificationSeverity,
            notification_manager,
        )

        name = unwrap(self.binder.image_layer).name
        notification_manager.dispatch(Notification(
            f"SAM3: an autosaved session of '{name}' was found ({folder}): restore it?",
            severity=NotificationSeverity.INFO,
            actions=[("Restore", lambda *_, f=folder: self.restore(f)),
                     ("Discard", lambda *_, f=folder: self.discard(f))]))

    def restore(self, folder=None) -> bool:
        """Open the offered autosave (it keeps being autosaved into); ``folder``: only if
        that is the one still offered (an old notification does nothing)."""
        offered = self._still_offered(folder)
        if offered is None:
            self.session.report("SAM3: no autosave to restore" if folder is None else
                                f"SAM3: the autosave {folder} is no longer offered", "info")
            return False
        return self.open(offered)

    def discard(self, folder=None) -> bool:
        """Delete the offered autosave (a session folder of ours only); ``folder``: only if
        that is the one still offered; never one being opened or autosaved into."""
        folder = self._still_offered(folder)
        if folder is None:
            return False
        self._set_offer(None)
        self._submit(lambda: sf.remove(folder), lambda ok: self.session.status(
            f"Autosave {folder} deleted" if ok else f"Autosave {folder} kept (not ours)"),
            lambda exc: self.session.report(f"SAM3: {user_message(exc)}", "warning"))
        return True

    # -- Save session ------------------------------------------------------------------------------------
    def save(self, folder) -> bool:
        """Write the session (labels, provenance, prompts, settings) to ``folder`` in the
        worker: a new or empty folder, or a session of ours (replaced). Autosaves go there
        from then on, and the autosave it replaces is deleted."""
        binder, session = self.binder, self.session
        image, labels = binder.image_layer, binder.labels_layer
        try:
            if image is None or labels is None:
                raise UserError("nothing to save: choose an image (its labels layer follows)")
            target = sf.check_target(Path(folder))
            track = self._track(labels)
            for other in self._tracks.values():
                if (other is not track and other.folder is not None
                        and sf._norm(other.folder) == sf._norm(target)
                        and self.binder.alive(other.labels)):
                    raise UserError(f"{target} holds the session of '{other.labels.name}' "
                                    "(autosaved there): choose another folder")
            snap = self._snapshot(image, labels)
        except (UserError, sf.SessionError) as exc:
            session.report(f"SAM3: {exc}")
            return False

        def write():
            record, rest = self._record(snap, image)
            sf.write_session(target, record, rest["source"], rest["provenance"],
                             image_levels=rest["levels"])
            old = None
            if track is not None:
                with self._lock:
                    old = track.folder if track.autosave else None
                    track.folder, track.ready, track.autosave = target, True, False
                    track.created = True
            kept = None
            if old is not None and sf._norm(old) != sf._norm(target):
                try:
                    sf.remove(old)
                except sf.SessionError as exc:
                    kept = str(exc)
            return target, kept

        session.status(f"Saving the session to {target}...")
        self._submit(write, self._on_saved, lambda exc: session.report(
            f"SAM3: cannot save the session to {target}: {user_message(exc)}"))
        return True

    @guarded
    def _on_saved(self, result) -> None:
        folder, kept = result
        self.session.status(f"Saved the session to {folder}; autosaves go there")
        if kept is not None:
            self.session.report(f"SAM3: {kept} (the autosave it replaces)", "warning")
        self.saved.emit(str(folder))

    # -- Open session -------------------------------------------------------------------------------------
    def open(self, folder, force: bool = False) -> bool:
        """Open a session folder: its image (found in the viewer by path or name, else
        opened from its path) must have the recorded pixels (``force``: open anyway);
        its labels, prompts, provenance and settings are restored into the image's
        empty layers, and the next object continues after its ids."""
        session = self.session
        folder = Path(folder)
        try:
            record = sf.read_record(folder)
            image = find_image(self.viewer, self.binder.image_layer, record["image"])
        except (UserError, sf.SessionError) as exc:
            session.report(f"SAM3: {exc}")
            return False
        ref = image_ref(image)
        channels = find_channels(self.viewer, image, record, session.report)

        def read():
            mismatch = sf.image_mismatch(record["image"],
                                         dict(ref, fingerprint=self._fingerprint(image)))
            if mismatch and not force:
                return folder, record, image, mismatch, None, channels
            labels = sf.read_labels(folder)
            small = int(np.prod(labels.shape, dtype=np.int64)) <= sf.ONE_WRITE
            return folder, record, image, None, labels.read() if small else labels, channels

        session.status(f"Opening the session {folder}...")
        self._opening = folder
        self._submit(read, self._apply, self._open_failed)
        return True

    @guarded
    def _open_failed(self, exc) -> None:
        self._opening = None
        self.session.report(f"SAM3: cannot open the session: {user_message(exc)}")

    def _check_empty(self, labels, points, boxes) -> None:
        binder = self.binder
        if binder._lazy_foreign(labels) and binder.largest.known(labels) is None:
            raise UserError(f"the largest id of '{labels.name}' is not read yet (to know it "
                            "is empty): try again in a moment")
        if binder.max_label(labels) > 0:
            raise UserError(f"'{labels.name}' already holds labels: the session is opened "
                            "only into empty layers (remove or clear them first)")
        for layer in (points, boxes):
            if layer is not None and len(layer.data):
                raise UserError(f"'{layer.name}' already holds prompts: the session is "
                                "opened only into empty layers (delete them first)")

    @guarded
    def _apply(self, result) -> None:
        folder, record, image, mismatch, labels_data, channels = result
        session, binder = self.session, self.binder
        self._opening = None
        if mismatch:
            session.report(f"SAM3: {mismatch}: the session {folder} was not opened")
            return
        if not binder.alive(image):
            session.report("SAM3: the session's image was removed meanwhile: not opened")
            return
        binder.choose("image", image)
        restore_contrast(image, record["image"])
        restore_channels(binder, image, channels)
        binder.ensure_layers()
        labels, points, boxes = binder.labels_layer, binder.points_layer, binder.shapes_layer
        try:
            if labels is None:
                raise UserError("no labels layer for the session's image")
            target = self._target(labels)
            if list(target.shape) != list(record["labels"]["shape"]):
                raise UserError(f"'{labels.name}' has shape {target.shape}, the session's "
                                f"labels {tuple(record['labels']['shape'])}")
            self._check_empty(labels, points, boxes)
        except UserError as exc:
            session.report(f"SAM3: {exc}")
            return
        self.restoring = True
        try:
            restore_prompts(points, boxes, record)
            from .._writers import PROVENANCE_KEY

            prov = sf.read_provenance(folder)
            if prov is not None:
                unwrap(labels).metadata[PROVENANCE_KEY] = prov
            self.settings.apply(record.get("settings") or {})
        finally:
            self.restoring = False
        track = self._track(labels) or Track(unwrap(image), unwrap(labels))
        self._tracks[id(unwrap(labels))] = track
        if self.offered is not None and sf._norm(self.offered) == sf._norm(folder):
            self._set_offer(None)
        destination = target.pyramid if getattr(target, "pyramid", None) is not None else None
        if isinstance(labels_data, np.ndarray):  # small: written at once (queued on a pyramid)
            if destination is not None:
                destination.write((), labels_data)
            else:
                target.data[...] = labels_data
            self._opened(folder, record, labels, track, int(labels_data.max(initial=0)))
            return

        def copy():
            from ..core.pyramid import Pyramid

            dest = destination if destination is not None else Pyramid([target.data])
            top = sf.copy_labels(dest, labels_data, (), fresh=True)
            if hasattr(dest, "wait"):
                dest.wait()
            return top

        self._opening = folder  # until its labels are in (not offered, not discarded)
        self._submit(copy, lambda top: self._opened(folder, record, labels, track, top),
                     self._copy_failed)

    @guarded
    def _copy_failed(self, exc) -> None:
        self._opening = None
        self.session.report(f"SAM3: cannot copy the session's labels: {user_message(exc)} "
                            "(the session is left as it was; the labels here may be partial)")

    @guarded
    def _opened(self, folder: Path, record: dict, labels, track: Track, top: int) -> None:
        """The session's labels are in: autosaves go into its folder from now on."""
        session, binder = self.session, self.binder
        autosave = sf._norm(folder.parent) == sf._norm(sf.autosave_root())
        with self._lock:
            track.folder, track.ready, track.autosave = folder, True, autosave
            track.created = False
        self._opening = None
        unwrap(labels).refresh()
        session.wrote(labels, top)
        next_id = binder.next_object_id()
        saved_id = int(record.get("object_id", 0))
        if saved_id > top and saved_id in binder.prompt_ids():
            next_id = saved_id  # the object being edited when it was saved
        session.object_id = next_id
        model = "" if session.segmenter is not None else " (press Load model to go on)"
        session.status(f"Opened the session {folder}: labels up to {top}, now object "
                       f"{next_id}{model}")
        self.last_opened = Path(folder)
        self.opened.emit(str(folder))

