"""FLOPs of the train step from XLA's cost analysis, and the chips' bf16 peaks for the MFU."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from slr_jax import train

# Dense (no sparsity) bf16 peak per chip in TFLOP/s, from the vendors' data sheets; the first
# matching substring of the lower-cased ``device_kind`` wins.
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100", 989.4),
    ("h200", 989.4),
    ("a100", 312.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("tpu v5", 459.0),
    ("v4", 275.0),
)


# The fallback's host compilation, made only to be analysed: LLVM at -O0.
FALLBACK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def xla_flops(program: Any) -> float | None:
    """FLOPs from the cost analysis of a lowered or compiled XLA program (None if unavailable)."""
    try:
        cost = program.cost_analysis()
    except Exception:  # some backends and releases do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def count_train_step_flops(config: Any, plan: Any, state: Any, batch: dict) -> float | None:
    """FLOPs of one global train step, counted on a one-device CPU mesh whatever the backend.

    Counted on the host because the accelerator's own count is wrong: on an H200, XLA's cost
    analysis of the compiled GPU step left out the convolutions that run as cuDNN custom calls
    (36 GFLOP for a ~14 TFLOP step), and JAX 0.11's lowered GPU program gave none. The lowered
    CPU program (before optimisation) counts every convolution; where a JAX release cannot
    analyse it, the CPU-compiled program is analysed instead (slower: a host compilation, with
    LLVM at -O0). Inputs are abstract (shapes only), so nothing is copied or run.
    """
    cpu_mesh = Mesh(np.asarray(jax.devices("cpu")[:1]), ("data",))
    schedule = plan.learning_rate_fn(config.train.lr)
    step = train.compile_train_step(config, plan, schedule, cpu_mesh, state)
    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    lowered = step.lower(
        jax.tree_util.tree_map(abstract, state), jax.tree_util.tree_map(abstract, batch)
    )
    flops = xla_flops(lowered)
    if flops is None:
        try:
            # The count is read from the optimised HLO; LLVM's optimisation of the machine
            # code, most of a CPU compile's time, changes nothing in it.
            flops = xla_flops(lowered.compile(FALLBACK_COMPILER_OPTIONS))
        except Exception:
            return None
    return flops


def peak_bf16_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s of one chip of this ``device_kind`` (None if not tabled)."""
    kind = device_kind.lower()
    for name, peak in PEAK_BF16_TFLOPS:
        if name in kind:
            return peak
    return None
