"""Precompute, segment-everything and concepts on dask.distributed (laptop to cluster).

Any ``distributed.Client`` works: ``Sam3Segmenter.precompute(image, client=...)``,
``segment_everything(..., client=...)``, ``segment_concept(..., client=...)``. Tasks are
per tile; workers load the model once per process, read file-backed images themselves
and write into the shared, content-keyed embedding store; the client merges.

* :mod:`.cluster`: a client from ``--scheduler``/``--workers`` (LocalCluster, jobqueue).
* :mod:`.sources`: the image and model as tasks get them (:class:`FileImage`, specs).
* :mod:`.tasks`: what workers run; :mod:`.run`: what the client does.
* :mod:`.empty`: skipping empty tiles.

Importing this package imports neither dask nor torch.
"""

from .cluster import SchedulerError, dashboard_link, jobqueue_cluster, open_client
from .empty import DEFAULT_MAX_RANGE, EmptyTiles
from .run import PrecomputeReport, TileProgress, iter_precompute, recorded_limits
from .sources import FileImage, ModelSpec, spec_of

__all__ = ["SchedulerError", "open_client", "jobqueue_cluster", "dashboard_link", "EmptyTiles",
           "DEFAULT_MAX_RANGE", "PrecomputeReport", "TileProgress", "iter_precompute",
           "recorded_limits", "FileImage", "ModelSpec", "spec_of"]
