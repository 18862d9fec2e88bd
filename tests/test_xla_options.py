"""slr_jax's per-program XLA compiler options (``slr_jax.xla_options``): which programs get
them, and that on the CPU they take float32 convolutions off YNNPACK (docs/benchmarks.md)."""

import re

import jax
import jax.numpy as jnp
import pytest

from slr_jax.xla_options import CPU_OPTIONS, compiler_options


def ynn_convolutions(hlo_text: str) -> int:
    """How many convolutions of a compiled XLA:CPU program run inside YNNPACK fusions."""
    called = set(re.findall(r'calls=%([\w.\-]+), [^\n]*"__ynn_fusion"', hlo_text))
    count, current = 0, None
    for line in hlo_text.splitlines():
        header = re.match(r"^%?([\w.\-]+) [^=]*\{$", line.strip()) if line.endswith("{") else None
        if header:
            current = header.group(1)
        elif current in called and " convolution(" in line:
            count += 1
    return count


def test_options_by_platform_and_dtype():
    for dtype in ("float32", "bfloat16", jnp.float32):
        assert compiler_options("cpu", dtype) == CPU_OPTIONS
    assert compiler_options("cpu", "float64") is None  # YNNPACK is the fast float64 path
    assert compiler_options("tpu", "float32") is None and compiler_options("gpu", "bf16") is None


@pytest.mark.parametrize("dilation", [1, 2])
def test_cpu_options_take_float32_convolutions_off_ynnpack(dilation):
    """XLA:CPU's default puts the forward, input- and kernel-gradient convolutions on
    YNNPACK (if a jaxlib stops doing so, this control fails: revisit the option); with
    ``CPU_OPTIONS`` none of the three is, and the results agree to float32 rounding."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))
    w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) * 0.1

    def loss(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", rhs_dilation=(dilation,) * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        return jnp.sum(y**2)

    grad = jax.grad(loss, argnums=(0, 1))
    default = jax.jit(grad).lower(x, w).compile()
    ours = jax.jit(grad, compiler_options=compiler_options("cpu", "float32")).lower(x, w).compile()
    assert ynn_convolutions(default.as_text()) == 3
    assert ynn_convolutions(ours.as_text()) == 0 and ours.as_text().count(" convolution(") == 3
    for a, b in zip(default(x, w), ours(x, w)):
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < 1e-5
