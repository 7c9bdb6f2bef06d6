"""How many CPU cores this process may actually use: its affinity mask, capped by a cgroup CPU quota.

``os.cpu_count()`` (and torch's default thread count) counts every core of the host; on a shared or
containerized host that oversubscribes the cores the process really gets, and a forward that takes
5.5 ms on one thread was measured at 350 ms with the default.

A model server's default (``model_threads``) leaves one of those cores to everything else the process does
beside the forward (gRPC, protobuf, decoding p~, rejection sampling on the handler threads): measured on
a loaded 2-core host, a demo-LLM forward took 15 ms on 1 thread and 407 ms on 2 (``python -m bench.threads``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")


def _quota_cores(cpu_max: Path = _CGROUP_V2_MAX) -> int | None:
    """Cores granted by a cgroup v2 quota ("QUOTA PERIOD"), rounded up; None when there is no quota."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def usable_cpus(cpu_max: Path = _CGROUP_V2_MAX) -> int:
    """Cores this process may run on: the affinity mask, capped by the cgroup quota (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _quota_cores(cpu_max)
    return max(1, min(cores, quota) if quota else cores)


def model_threads(cpu_max: Path = _CGROUP_V2_MAX) -> int:
    """Default intra-op threads of a model server: the usable cores but one (at least 1)."""
    return max(1, usable_cpus(cpu_max) - 1)
