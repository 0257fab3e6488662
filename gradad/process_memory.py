"""Peak memory of the running process, for the latency benchmark's rows and grad-run's summary."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

PROC_STATUS = Path("/proc/self/status")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    Linux: ``VmHWM`` from /proc/self/status, which starts afresh at exec (``ru_maxrss`` would carry the parent's
    peak over into a forked-and-exec'd process: every grad-run started by one benchmark showed the benchmark's
    peak). Elsewhere: ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**10, 1)
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**20 if sys.platform == "darwin" else 2**10
    return round(peak / scale, 1)
