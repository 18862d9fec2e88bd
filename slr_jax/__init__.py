"""slr_jax: SLRNet (Pan et al., IJCV 2022) in JAX/Flax.

Layout convention everywhere inside JAX: NHWC (batch, height, width, channels).
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# The defaults of every setting live in the repository's top-level ``configs/`` package
# (configs/common.py), which the code reads too: make it importable wherever the command or
# the import starts from.
_REPO_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _REPO_ROOT not in _sys.path:
    _sys.path.append(_REPO_ROOT)
