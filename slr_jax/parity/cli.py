"""The command line: ``python -m slr_jax.parity --reference-repo PATH ...`` (``main``)."""

from __future__ import annotations

import argparse
import json
import sys

from slr_jax import cli
from slr_jax.parity.exact import run_float64
from slr_jax.parity.report import format_table, merge_seed_reports
from slr_jax.parity.runner import run
from slr_jax.parity.settings import DEFAULT_SCALES, SETTINGS, TIE_EPS

DESCRIPTION = "Numerical parity with the official PyTorch SLRNet, from a checkout the user names."


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m slr_jax.parity", description=DESCRIPTION)
    parser.add_argument(
        "--reference-repo", required=True, help="checkout of github.com/DesertsP/SLRNet"
    )
    parser.add_argument("--setting", default="wsss", choices=sorted(SETTINGS))
    parser.add_argument("--crop", type=int, default=161)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="random draw of weights and inputs")
    parser.add_argument(
        "--seeds", default="",
        help="several draws, comma-separated (e.g. 0,1,2,3,4): every seed's rows, named "
        "'seed S/...', and PASSED only if every seed passes (overrides --seed)",
    )  # fmt: skip
    parser.add_argument(
        "--tie-eps", type=float, default=TIE_EPS, help="top-2 code gap counted as a near tie"
    )
    parser.add_argument("--no-grads", action="store_true", help="skip the gradient rows (faster)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float64"),
        help="JAX computation dtype; bfloat16 reports its errors against the float32 reference "
        "as info rows (parameters stay float32); float64 runs both sides in float64 and judges "
        "every row at 1e-11 (a real difference, not rounding)",
    )  # fmt: skip
    parser.add_argument(
        "--scales", default=",".join(f"{x:g}" for x in DEFAULT_SCALES),
        help="scales of the multi-scale inference rows, comma-separated ('' to skip them)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=0,
        help="also run N optimiser steps of the same training in both frameworks (rows "
        "'traj/...', module trajectory; at --traj-width and --traj-crop)",
    )  # fmt: skip
    parser.add_argument("--traj-width", type=float, default=0.25, help="trajectory width")
    parser.add_argument("--traj-crop", type=int, default=81, help="trajectory crop")
    parser.add_argument("--json", help="also write the report as JSON here")
    return parser


def _parse_scales(parser: argparse.ArgumentParser, text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        parser.error(f"--scales must be comma-separated numbers, got {text!r}")
    if any(x <= 0 for x in scales):
        parser.error(f"--scales must be positive, got {text!r}")
    return scales


def _parse_seeds(parser: argparse.ArgumentParser, text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {text!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must name distinct seeds, got {text!r}")
    return seeds


def _run_one(args, seed: int, scales: tuple[float, ...]) -> dict:
    if args.dtype == "float64":
        report = run_float64(
            args.reference_repo, args.setting, args.crop, args.batch, seed, not args.no_grads
        )
    else:
        report = run(
            args.reference_repo, args.setting, args.crop, args.batch, seed,
            not args.no_grads, args.tie_eps, args.dtype, scales,
        )  # fmt: skip
    if args.steps:
        # lazy: imported with this package, `python -m slr_jax.parity.trajectory` would make
        # runpy warn that the module was in sys.modules before it ran as __main__
        from slr_jax.parity import trajectory

        traj = trajectory.run(args.reference_repo, args.setting, args.traj_crop,
                              max(2, args.batch), args.steps, seed, args.traj_width)  # fmt: skip
        report = dict(report, rows=report["rows"] + traj["rows"],
                      passed=report["passed"] and traj["passed"])  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error(f"--steps must be >= 0, got {args.steps}")
    if args.crop < 33 or args.batch < 1:
        parser.error(f"need --crop >= 33 and --batch >= 1, got {args.crop} and {args.batch}")
    scales = _parse_scales(parser, args.scales)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("the parity tool needs PyTorch (CPU is enough): pip install torch", file=sys.stderr)
        return 2
    seeds = _parse_seeds(parser, args.seeds) if args.seeds else (args.seed,)
    reports = []
    try:
        for seed in seeds:
            reports.append(_run_one(args, seed, scales))
            print(format_table(reports[-1]), flush=True)
    except FileNotFoundError as e:
        print(str(e), file=sys.stderr)
        return 2
    report = reports[0] if len(reports) == 1 else merge_seed_reports(reports)
    if len(reports) > 1:
        print(f"{len(seeds)} seeds: {'PASSED' if report['passed'] else 'FAILED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1
