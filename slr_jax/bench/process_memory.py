"""Peak memory and step time of one side's training step, each side in a process of its own
(CPU).

In one process the two sides cannot be compared by RSS: PyTorch's allocator keeps the memory
of its first step, so "peak during a call minus RSS before it" reads ~0 for the reference
after the warm-up, and whatever one side freed the other reuses. Here each side runs alone in a
fresh interpreter: its RSS is read after the imports and the model (and optimiser state) are
built, then sampled through the warm-up and timed steps (JAX's compilation included, as a
user's first step has it); the figure is the peak above that baseline. Each call is timed too,
so that each side's step time alone stands beside the alternating calls' (two frameworks'
thread pools and allocators in one process can slow one side down).

    python -m slr_jax.bench.process_memory --side slr_jax|reference <the bench's flags>

prints one JSON line; ``in_own_process`` runs it for the benchmark.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from slr_jax.bench.configfile import split_overrides
from slr_jax.bench.inputs import make_inputs
from slr_jax.bench.jax_side import JaxSide
from slr_jax.bench.memory import RssSampler, current_rss
from slr_jax.bench.options import build_parser, configure, xla_settings
from slr_jax.bench.reference_side import ReferenceSide

PROCESS_KIND = "process peak RSS above its RSS after imports and construction (own process)"


def measure_side(argv: list[str]) -> dict:
    """Builds one side (``--side``) from the bench's flags and measures its training steps."""
    parser = build_parser()
    parser.add_argument("--side", required=True, choices=("slr_jax", "reference"))
    args, extra = parser.parse_known_args(argv)
    config, (crop, batch, _) = configure(args, split_overrides(extra))
    compiler_options = xla_settings(args)
    inputs = make_inputs(batch, crop, int(config.model.num_classes), args.seed)
    if args.side == "slr_jax":
        side = JaxSide(config, inputs, args.seed, compiler_options)
    else:
        side = ReferenceSide(args.reference_repo, config, inputs, args.seed,
                             args.torch_threads, args.reference_detect_anomaly)  # fmt: skip
    baseline = current_rss()
    sampler = RssSampler()
    times = []
    with sampler.measure():
        for _ in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            side.step()
            times.append(time.perf_counter() - t0)
        side.finish_training()
    return {
        "bytes": sampler.peak_delta,
        "baseline_bytes": baseline,
        "kind": PROCESS_KIND,
        "first_s": times[0],
        "times_s": times[args.warmup :],
    }


def in_own_process(argv: list[str], side: str) -> dict:
    """``measure_side`` for ``side`` in a fresh interpreter (the bench's own ``argv``)."""
    cmd = [sys.executable, "-m", "slr_jax.bench.process_memory", "--side", side, *argv]
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"bytes": None, "kind": f"unavailable: the {side} process failed: {tail}"}
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(measure_side(sys.argv[1:])))
