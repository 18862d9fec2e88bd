"""XLA compiler options slr_jax sets on the programs it compiles (per program, not through
``XLA_FLAGS``, because the right choice depends on the program's dtype).

XLA:CPU (jaxlib 0.10.2) runs convolutions as YNNPACK fusions by default. In float32 that path
computes a convolution's kernel gradient about 4x slower than XLA's own convolution emitter
(Eigen) on the 2-core x86 machines this project is tested on, which makes the full training
step 25-30% slower (docs/benchmarks.md); in float64 it is the other way round (Eigen's
float64 convolution is ~100x slower than YNNPACK's). So programs for the CPU that do not
compute in float64 keep only the matrix products on YNNPACK; float64 programs and other
platforms keep XLA's defaults (the option is read by XLA:CPU alone; libtpu accepts and ignores
it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options(platform: str, dtype: Any) -> dict[str, str] | None:
    """``jax.jit(..., compiler_options=...)`` for a program on ``platform`` ('cpu', 'gpu',
    'tpu') whose computation dtype is ``dtype`` (a name or dtype)."""
    if platform != "cpu" or jnp.dtype(dtype) == jnp.float64:
        return None
    return dict(CPU_OPTIONS)


def mesh_platform(mesh: jax.sharding.Mesh) -> str:
    """The platform of ``mesh``'s devices ('cpu', 'gpu', 'tpu')."""
    return mesh.devices.flat[0].platform
