"""The command line: ``python -m slr_jax.parity --reference-repo PATH ...`` (``main``)."""

from __future__ import annotations

import argparse
import json
import sys

from slr_jax.parity.report import format_table
from slr_jax.parity.runner import run
from slr_jax.parity.settings import DEFAULT_SCALES, SETTINGS, TIE_EPS

DESCRIPTION = "Numerical parity with the official PyTorch SLRNet, from a checkout the user names."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m slr_jax.parity", description=DESCRIPTION)
    parser.add_argument(
        "--reference-repo", required=True, help="checkout of github.com/DesertsP/SLRNet"
    )
    parser.add_argument("--setting", default="wsss", choices=sorted(SETTINGS))
    parser.add_argument("--crop", type=int, default=161)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tie-eps", type=float, default=TIE_EPS, help="top-2 code gap counted as a near tie"
    )
    parser.add_argument("--no-grads", action="store_true", help="skip the gradient rows (faster)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"),
        help="JAX computation dtype; bfloat16 reports its errors against the float32 reference "
        "as info rows (parameters stay float32)",
    )  # fmt: skip
    parser.add_argument(
        "--scales", default=",".join(f"{x:g}" for x in DEFAULT_SCALES),
        help="scales of the multi-scale inference rows, comma-separated ('' to skip them)",
    )  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.crop < 33 or args.batch < 1:
        parser.error(f"need --crop >= 33 and --batch >= 1, got {args.crop} and {args.batch}")
    scales = _parse_scales(parser, args.scales)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("the parity tool needs PyTorch (CPU is enough): pip install torch", file=sys.stderr)
        return 2
    try:
        report = run(
            args.reference_repo, args.setting, args.crop, args.batch, args.seed,
            not args.no_grads, args.tie_eps, args.dtype, scales,
        )  # fmt: skip
    except FileNotFoundError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1
