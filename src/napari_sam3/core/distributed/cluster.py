"""A ``distributed.Client`` from the command line's ``--scheduler S --workers N``.

* no scheduler (None): no client, everything runs in this process as before;
* ``local``: a ``LocalCluster`` of N worker processes, closed after the run; each runs
  one task at a time with torch on its share of the cores (cores // N threads);
* ``slurm``, ``pbs``, ``lsf``, ``sge``: a ``dask_jobqueue`` cluster of N jobs,
  configured the dask way (``~/.config/dask/jobqueue.yaml`` or ``DASK_JOBQUEUE__...``
  variables), closed after the run; ``dask-jobqueue`` is the ``cluster`` extra;
* anything else (``tcp://host:port``, a scheduler file's address): a running
  scheduler and its workers; it is left running.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util

JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster",
            "sge": "SGECluster"}
LOCAL = "local"
DEFAULT_LOCAL_WORKERS = 2
MISSING_JOBQUEUE = ("--scheduler {kind} needs dask-jobqueue: pip install napari-sam3[cluster] "
                    "(or pip install dask-jobqueue)")


class SchedulerError(ValueError):
    """The scheduler or cluster cannot be used; the message says what to do."""


def check_scheduler(scheduler: str | None, workers: int | None) -> None:
    """``--scheduler``/``--workers`` that fit together (no import, nothing started)."""
    if scheduler is None:
        if workers is not None:
            raise SchedulerError("--workers needs --scheduler local, slurm, pbs, lsf or sge")
        return
    if not str(scheduler).strip():
        raise SchedulerError("--scheduler is empty: give local, slurm, pbs, lsf, sge or an "
                             "address such as tcp://HOST:PORT")
    if workers is not None and workers < 1:
        raise SchedulerError(f"--workers must be 1 or more, got {workers}")
    kind = str(scheduler).lower()
    if workers is not None and kind != LOCAL and kind not in JOBQUEUE:
        raise SchedulerError(f"--workers applies to --scheduler local or a job queue; the "
                             f"scheduler at {scheduler} brings its own workers")
    if kind in JOBQUEUE and importlib.util.find_spec("dask_jobqueue") is None:
        raise SchedulerError(MISSING_JOBQUEUE.format(kind=kind))


def jobqueue_cluster(kind: str, **options):
    """The ``dask_jobqueue`` cluster object for ``kind`` (slurm, pbs, lsf, sge), built from
    the dask configuration (``jobqueue.<kind>``) and ``options``; no job is submitted."""
    kind = kind.lower()
    try:
        module = importlib.import_module("dask_jobqueue")
    except ImportError:
        raise SchedulerError(MISSING_JOBQUEUE.format(kind=kind)) from None
    cls = getattr(module, JOBQUEUE[kind])
    try:
        return cls(**options)
    except (ValueError, TypeError, KeyError) as e:
        raise SchedulerError(
            f"cannot set up the {kind} cluster ({' '.join(str(e).split())}): configure "
            f"jobqueue.{kind} in ~/.config/dask/jobqueue.yaml or DASK_JOBQUEUE__"
            f"{kind.upper()}__... variables") from None


def local_cluster(workers: int, torch_threads: int | None = None):
    """N worker processes of one task slot each (a queued tile stays stealable by an idle
    worker) whose torch uses ``torch_threads`` (default cores // N) threads
    (:data:`~.sources.TORCH_THREADS_ENV`)."""
    import os

    from distributed import LocalCluster

    from .sources import TORCH_THREADS_ENV

    share = torch_threads or max(1, (os.cpu_count() or 1) // max(1, int(workers)))

    try:
        import bokeh  # noqa: F401 - the dashboard needs it
        dashboard = "127.0.0.1:0"
    except ImportError:
        dashboard = None
    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                        host="127.0.0.1", dashboard_address=dashboard,
                        env={TORCH_THREADS_ENV: str(share)})


@contextlib.contextmanager
def open_client(scheduler: str | None, workers: int | None = None, *,
                torch_threads: int | None = None):
    """Yields the ``distributed.Client`` for ``scheduler`` (None: yields None), and closes
    what it started (a LocalCluster, jobqueue jobs) afterwards. SchedulerError when it
    cannot be set up or reached. ``torch_threads``: per local worker (default: its share
    of the cores)."""
    check_scheduler(scheduler, workers)
    if scheduler is None:
        yield None
        return
    from distributed import Client

    kind = str(scheduler).lower()
    cluster = None
    try:
        if kind == LOCAL:
            cluster = local_cluster(workers or DEFAULT_LOCAL_WORKERS, torch_threads)
        elif kind in JOBQUEUE:
            cluster = jobqueue_cluster(kind)
            cluster.scale(jobs=workers or 1)
        client = Client(cluster if cluster is not None else scheduler, timeout="20s")
    except SchedulerError:
        raise
    except (OSError, TimeoutError, ValueError) as e:
        if cluster is not None:
            cluster.close()
        raise SchedulerError(f"cannot reach the scheduler {scheduler}: "
                             f"{type(e).__name__}: {' '.join(str(e).split())}") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def dashboard_link(client) -> str | None:
    """The dask dashboard's address, when the scheduler serves one."""
    try:
        info = client.scheduler_info()
        if "dashboard" not in info.get("services", {}):
            return None
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - a link is a convenience
        return None
