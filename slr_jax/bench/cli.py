"""The command line: ``python -m slr_jax.bench [--config FILE] [--config.KEY=VALUE ...] ...``
(``main``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from slr_jax import cli
from slr_jax.bench.configfile import DEFAULT_CONFIG, BenchError, _split_overrides
from slr_jax.bench.report import format_report
from slr_jax.bench.runner import run
from slr_jax.errors import TrainingError

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for per-process measurements
    try:
        overrides = _split_overrides(extra)
        report = run(args, overrides)
    except (BenchError, FileNotFoundError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
