"""One QWidget per section of the dock widget, each handed the session, the job runner
and the layer binder explicitly (and connecting and disconnecting its own events)."""
