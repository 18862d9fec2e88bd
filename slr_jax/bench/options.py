"""The command line's flags (``build_parser``) and the settings they make: the config with
the requested sizes, checked (``configure``), and XLA's options and cache (``xla_settings``).
Shared by the benchmark run and the per-process memory measurement."""

from __future__ import annotations

import argparse
import ast
import os
from typing import Any

import jax

from slr_jax import cli
from slr_jax.bench.configfile import DEFAULT_CONFIG, BenchError, load_config
from slr_jax.config import ConfigError, validate_config

MIN_CROP = 33
DESCRIPTION = (
    "Benchmark: the WSSS training step and multi-scale inference, optionally against the reference."
)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m slr_jax.bench",
        description=DESCRIPTION,
        epilog="Config keys can be overridden as in slr_jax.main: --config.model.width=0.25",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="ml_collections config file")
    parser.add_argument("--crop", type=int, default=321, help="square training crop")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: 2 on CPU, else 8)")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per side first")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="slr_jax computation dtype (default: the config's)",
    )
    parser.add_argument(
        "--infer-size",
        type=int,
        default=None,
        help="side of the inference photograph (default: --crop; 0: skip)",
    )
    parser.add_argument(
        "--reference-repo",
        default=None,
        help="checkout of github.com/DesertsP/SLRNet to time against",
    )
    parser.add_argument(
        "--reference-detect-anomaly",
        action="store_true",
        help="turn on torch anomaly detection, as tools/train_voc_wss.py does",
    )
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--piece-steps", type=int, default=3, help="timed calls per piece (after 1 warm-up)"
    )
    parser.add_argument(
        "--pieces",
        action="store_true",
        help="also time backbone forward, forward with loss and PAMR",
    )
    parser.add_argument(
        "--xla-cache-dir",
        default=None,
        help="persistent XLA compilation cache (makes repeated runs compile fast)",
    )
    parser.add_argument(
        "--xla-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="XLA compiler option for the train step (repeatable), e.g. "
        "xla_backend_optimization_level=0 for a quick compile",
    )
    parser.add_argument(
        "--memory", default="process", choices=("process", "inline"),
        help="CPU memory of the train step: 'process' runs each side again alone in its own "
        "process (peak RSS above its RSS after construction; comparable between the sides); "
        "'inline' samples RSS around the timed calls of this process (faster, not comparable)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report here")
    return parser


def configure(args: argparse.Namespace, overrides: list[tuple[str, str]]):
    """The config with the command line's sizes and dtype, checked: ``(config, (crop, batch,
    inference size))``."""
    config = load_config(args.config, overrides)
    on_cpu = jax.default_backend() == "cpu"
    batch = args.batch or (2 if on_cpu else 8)
    crop = int(args.crop)
    infer_size = crop if args.infer_size is None else int(args.infer_size)
    if (
        min(batch, args.steps, args.warmup, args.piece_steps) < 1
        or crop < MIN_CROP
        or infer_size < 0
    ):
        raise BenchError(
            f"need --crop >= {MIN_CROP}, --batch, --steps, --warmup, --piece-steps >= 1 and "
            f"--infer-size >= 0; got {crop}, {batch}, {args.steps}, {args.warmup}, {infer_size}"
        )
    with config.ignore_type():
        config.train.batch_size = batch
        config.dataset.crop_size = crop
        if args.dtype:
            config.model.dtype = args.dtype
        config.train.init_checkpoint = ""  # random weights: the speed does not depend on them
    try:
        validate_config(config)
    except ConfigError as e:
        raise BenchError(str(e)) from None
    return config, (crop, batch, infer_size)


def xla_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Turns on the persistent compilation cache (``--xla-cache-dir``); returns the compiler
    options of ``--xla-option KEY=VALUE`` (values as Python literals where they parse)."""
    if args.xla_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.xla_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        # Experimental module, imported only when asked for: not every JAX release has it.
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()  # takes the folder even after earlier compilations

    compiler_options = {}
    for item in args.xla_option:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--xla-option needs KEY=VALUE, got {item!r}")
        try:
            compiler_options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            compiler_options[key] = text
    return compiler_options
