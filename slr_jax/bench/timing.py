"""Wall-clock timing: calls of both frameworks in turn, and their medians."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any


def alternate(
    fns: dict[str, Callable[[], Any]],
    warmup: int,
    steps: int,
    samplers: dict | None = None,
    label: str | None = None,
) -> dict[str, dict]:
    """Calls every function ``warmup`` times, then ``steps`` timed times, in turn (a, b, a, b).

    Returns ``{name: {'first_s', 'times_s', 'median_s'}}``; ``first_s`` is the first warm-up
    call (compilation, caches). ``samplers[name]`` (an ``RssSampler``) watches the timed calls.
    With ``label``, every call's time is printed as it ends (slow machines).
    """
    samplers = samplers or {}
    out = {name: {"times_s": []} for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            sampler = samplers.get(name)
            timed = i >= warmup
            scope = sampler.measure() if (timed and sampler) else contextlib.nullcontext()
            with scope:
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
            if label:
                kind = "timed" if timed else "warm-up"
                print(f"  {label} {name} call {i + 1} ({kind}): {elapsed:.2f} s", flush=True)
            if i == 0:
                out[name]["first_s"] = elapsed
            if timed:
                out[name]["times_s"].append(elapsed)
            if len(fns) > 1:
                time.sleep(0.1)  # let the other framework's worker threads go idle
    for result in out.values():
        result["median_s"] = statistics.median(result["times_s"])
    return out


def median(times: dict | None, name: str) -> float | None:
    """The median of side ``name`` in a result of ``alternate`` (None if it did not run)."""
    return times[name]["median_s"] if times and name in times else None


def _print_medians(what: str, times: dict) -> None:
    text = ", ".join(f"{name} {t['median_s']:.3f} s" for name, t in times.items())
    print(f"{what} medians: {text}", flush=True)
