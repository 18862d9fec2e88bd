"""Peak memory: the device's own statistics on accelerators, else the process RSS sampled
during each call."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any


def current_rss() -> int | None:
    """Resident set size of this process in bytes (Linux ``/proc``), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """Samples the process RSS every ``interval`` s while active; ``peak_delta``: the largest
    (peak during a call - RSS before that call) over the calls, in bytes."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_delta: int | None = None

    @contextlib.contextmanager
    def measure(self):
        start = current_rss()
        if start is None:
            yield
            return
        peak = [start]
        stop = threading.Event()

        def sample():
            while not stop.wait(self.interval):
                peak[0] = max(peak[0], current_rss() or 0)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            peak[0] = max(peak[0], current_rss() or 0)
            delta = peak[0] - start
            self.peak_delta = delta if self.peak_delta is None else max(self.peak_delta, delta)


def _device_peak_bytes(device: Any) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None


def _memory_entry(sampler: RssSampler | None, device_bytes: int | None, kind: str) -> dict:
    if device_bytes is not None:
        return {"bytes": device_bytes, "kind": kind}
    if sampler is not None and sampler.peak_delta is not None:
        return {
            "bytes": sampler.peak_delta,
            "kind": "process RSS: peak during a call minus RSS before it (CPU)",
        }
    return {"bytes": None, "kind": "unavailable"}
