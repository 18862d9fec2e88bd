"""The command line: ``python -m slr_jax.bench [--config FILE] [--config.KEY=VALUE ...] ...``
(``main``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from slr_jax.bench.configfile import BenchError, split_overrides
from slr_jax.bench.options import build_parser
from slr_jax.bench.report import format_report
from slr_jax.bench.runner import run
from slr_jax.errors import TrainingError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for per-process measurements
    try:
        overrides = split_overrides(extra)
        report = run(args, overrides)
    except (BenchError, FileNotFoundError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
