"""The napari dock widget: a session, a job runner, a layer binder and one QWidget per
section (see ``dock.Sam3Widget``)."""
