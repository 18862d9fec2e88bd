"""slr_jax: SLRNet (Pan et al., IJCV 2022) in JAX/Flax.

Layout convention everywhere inside JAX: NHWC (batch, height, width, channels).
"""

__version__ = "0.1.0"
