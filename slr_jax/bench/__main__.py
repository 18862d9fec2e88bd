"""``python -m slr_jax.bench``: see the package docstring and ``cli.main``."""

from slr_jax.bench.cli import main
from slr_jax.cli import run_cli

if __name__ == "__main__":
    run_cli(main)
