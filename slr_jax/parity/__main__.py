"""``python -m slr_jax.parity``: see the package docstring and ``cli.main``."""

from slr_jax.cli import run_cli
from slr_jax.parity.cli import main

if __name__ == "__main__":
    run_cli(main)
