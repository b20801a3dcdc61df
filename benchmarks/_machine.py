"""What every benchmark reports about the machine, and how busy it is."""

from __future__ import annotations

import datetime
import os
import platform
import time


def loadavg() -> str:
    """1-minute load average: above ~0.5 on 2 cores, other processes share the CPU."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import numpy as np
    import torch
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "date": datetime.date.today().isoformat(),
        "loadavg_start": loadavg(),
    }


def rss_mb() -> float:
    """Resident memory of this process now, in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_snapshot():
    """(busy ticks of all cores, this process's CPU seconds, wall seconds), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(v) - v[3] - v[4], time.process_time(), time.perf_counter()


def other_load(before) -> float:
    """Share of all cores that other processes used since ``before`` (0 when unknown)."""
    after = cpu_snapshot()
    if before is None or after is None:
        return 0.0
    busy = (after[0] - before[0]) / os.sysconf("SC_CLK_TCK")
    mine = after[1] - before[1]
    return max(0.0, busy - mine) / ((after[2] - before[2]) * (os.cpu_count() or 1))
