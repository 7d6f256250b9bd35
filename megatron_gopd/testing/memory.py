"""Peak resident memory of a block of code on CPU (Linux), for memory tests and benchmarks."""

from __future__ import annotations

import resource


def rss_field_bytes(field: str) -> int:
    """A field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakRSSGrowth:
    """``with PeakRSSGrowth() as growth: ...`` then ``growth.bytes``: how far the process's resident
    set rose above its size at entry, at its highest inside the block.

    Exact where the kernel lets the peak counter be reset (``exact`` True); otherwise the
    process-lifetime ``ru_maxrss`` minus the entry size, an upper bound.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.exact = False
        self._before = 0

    def __enter__(self) -> "PeakRSSGrowth":
        self.exact = reset_peak_rss()
        self._before = rss_field_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exact:
            peak = rss_field_bytes("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.bytes = max(0, peak - self._before)
