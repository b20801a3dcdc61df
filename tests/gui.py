"""Helpers shared by the GUI tests (real napari viewer under Xvfb)."""

from __future__ import annotations


class Notes:
    """New napari notifications since creation (the real notification manager)."""

    def __init__(self):
        from napari.utils.notifications import notification_manager

        self._manager = notification_manager
        self._start = len(notification_manager.records)

    def since(self, severity: str | None = None) -> list[str]:
        recs = self._manager.records[self._start :]
        return [
            str(r.message) for r in recs if severity is None or str(r.severity).lower() == severity
        ]

    def reset(self):
        self._start = len(self._manager.records)


def unwrap(layer):
    """The widget sees napari's PublicOnlyProxy of each layer; tests use the real layer."""
    return getattr(layer, "__wrapped__", layer)
