"""What the process may use of this machine: cores, free memory, the accelerator, and the peak memory of a
stretch of work."""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers, SLURM)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    return max(1, n)


def _cgroup_memory_left() -> int | None:
    """Bytes left under a cgroup v2 or v1 memory limit, where one is set."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            text = Path(limit).read_text().strip()
            if text == "max" or int(text) >= 2**60:
                continue
            return max(0, int(text) - int(Path(usage).read_text()))
    return None


def _address_space_left() -> int | None:
    """Bytes left under RLIMIT_AS (`ulimit -v`), where one is set."""
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource  # Unix only

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return max(0, soft - int(line.split()[1]) * 1024)
            return soft
    return None


def free_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on `device`: CUDA's free memory, or on the CPU the least of the
    system's available memory, a cgroup limit and an address-space limit."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    candidates = [_cgroup_memory_left(), _address_space_left()]
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    known = [c for c in candidates if c is not None]
    return min(known) if known else 8 * 2**30


def process_memory(device: torch.device) -> int:
    """Bytes this process holds now: CUDA memory allocated, or its resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def process_start() -> float:
    """When this process started, on the `time.monotonic` clock (Linux: from /proc; elsewhere: now)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.monotonic() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    return time.monotonic()


class PeakMemory:
    """Peak memory of what runs between `reset` and `read` (MiB): CUDA max allocated, or the process's peak RSS
    (Linux: its high-water mark is reset through /proc/self/clear_refs; elsewhere the peak since start)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        with contextlib.suppress(OSError):
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        import resource  # Unix only: reached where /proc is missing

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
