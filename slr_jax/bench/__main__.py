"""``python -m slr_jax.bench``: see the package docstring and ``cli.main``."""

import sys

from slr_jax.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
