"""``python -m slr_jax.parity``: see the package docstring and ``cli.main``."""

import sys

from slr_jax.parity.cli import main

if __name__ == "__main__":
    sys.exit(main())
