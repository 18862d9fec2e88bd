"""The benchmark's JSON report, section by section, and its human-readable summary."""

from __future__ import annotations

import argparse
import os
import platform
from typing import Any

import jax

from slr_jax.bench.flops import peak_bf16_tflops
from slr_jax.bench.timing import median


def _versions() -> dict[str, str | None]:
    """Versions of the frameworks (PyTorch from its metadata: importing it costs seconds)."""
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "flax": version("flax"),
        "torch": version("torch"),
    }


def timing_section(
    train_times: dict, infer_times: dict | None, with_ref: bool, own_times: dict | None = None
) -> dict:
    """Medians, their ratio slr_jax / reference and every timed call, of both measurements;
    ``own_times``: the train step of each side alone in its own process (``train_own_*``)."""
    ratio = lambda times: (
        median(times, "slr_jax") / median(times, "reference")
        if with_ref and times and "reference" in times
        else None
    )
    own_times = own_times or {}
    return {
        "train_own_process_s": {n: median(own_times, n) for n in ("slr_jax", "reference")},
        "train_own_process_ratio": ratio(own_times),
        "train_own_process_times_s": {n: t["times_s"] for n, t in own_times.items()},
        "train_step_s": {
            "slr_jax": median(train_times, "slr_jax"),
            "reference": median(train_times, "reference"),
        },
        "train_step_ratio": ratio(train_times),
        "train_step_times_s": {n: t["times_s"] for n, t in train_times.items()},
        "infer_s": {
            "slr_jax": median(infer_times, "slr_jax"),
            "reference": median(infer_times, "reference"),
        },
        "infer_ratio": ratio(infer_times),
        "infer_times_s": {n: t["times_s"] for n, t in (infer_times or {}).items()},
    }


def compile_section(
    timings: dict, train_times: dict, infer_times: dict | None, with_ref: bool
) -> dict:
    """Compile time (first call minus median; slr_jax's lowering and XLA compilation apart).
    ``timings``: slr_jax's ``lower_s`` and ``xla_compile_s``."""
    compile_s = {
        "slr_jax_train": train_times["slr_jax"]["first_s"] - median(train_times, "slr_jax"),
        "slr_jax_train_lower": timings["lower_s"],
        "slr_jax_train_xla_compile": timings["xla_compile_s"],
    }
    if infer_times:
        compile_s["slr_jax_infer"] = infer_times["slr_jax"]["first_s"] - median(
            infer_times, "slr_jax"
        )
    if with_ref:
        compile_s["reference_train_first_call_overhead"] = train_times["reference"][
            "first_s"
        ] - median(train_times, "reference")
        if infer_times:
            compile_s["reference_infer_first_call_overhead"] = infer_times["reference"][
                "first_s"
            ] - median(infer_times, "reference")
    return compile_s


def flops_section(flops: float | None, step_s: float, count_s: float, device_kind: str) -> dict:
    """The step's FLOPs, the achieved TFLOP/s per chip and, where the chip is tabled, the MFU."""
    peak = peak_bf16_tflops(device_kind)
    # Per chip: the lowered program is the global step, spread over every device.
    achieved = flops / step_s / 1e12 / jax.device_count() if flops else None
    return {
        "train_step": flops,
        "source": "XLA cost_analysis() of the global train step lowered for one CPU device",
        "count_s": count_s,
        "achieved_tflops": achieved,
        "peak_bf16_tflops": peak,
        "mfu": achieved / peak if (achieved and peak) else None,
    }


def device_section(device: Any, sides: dict, torch_threads: int) -> dict:
    with_ref = "reference" in sides
    return {
        "jax_backend": jax.default_backend(),
        "jax_device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "reference": str(sides["reference"].device) if with_ref else None,
        "torch_threads": torch_threads if with_ref else None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def settings_section(
    args: argparse.Namespace,
    config: Any,
    sizes: tuple[int, int, int],
    overrides: list[tuple[str, str]],
    compiler_options: dict,
    with_ref: bool,
) -> dict:
    """What was measured: ``sizes`` (crop, batch, inference size), dtype, scales, calls, the
    config and the XLA settings."""
    crop, batch, infer_size = sizes
    return {
        "crop": crop,
        "batch": batch,
        "dtype": str(config.model.dtype),
        "width": float(config.model.width),
        "infer_size": infer_size,
        "scales": list(config.test.scales),
        "flip": bool(config.test.flip),
        "steps": args.steps,
        "warmup": args.warmup,
        "config": args.config,
        "overrides": {k: v for k, v in overrides},
        "reference_detect_anomaly": bool(args.reference_detect_anomaly) if with_ref else None,
        "xla_cache_dir": args.xla_cache_dir,
        "xla_options": compiler_options,
    }


def format_report(report: dict) -> str:
    """Human-readable summary of a report from :func:`run`."""

    def fmt(x, unit="s"):
        return "-" if x is None else f"{x:.3f} {unit}"

    lines = [
        f"device {report['device']['jax_device_kind']} x{report['device']['num_devices']} "
        f"(reference: {report['device']['reference'] or 'not run'}); crop {report['crop']}, "
        f"batch {report['batch']}, {report['dtype']}, width {report['width']}",
        f"{'':<22}{'slr_jax':>14}{'reference':>14}{'ratio':>8}",
    ]
    for label, key, ratio in (
        ("train step (median)", "train_step_s", "train_step_ratio"),
        ("  each in own process", "train_own_process_s", "train_own_process_ratio"),
        ("inference (median)", "infer_s", "infer_ratio"),
    ):
        r = report[ratio]
        lines.append(
            f"{label:<22}{fmt(report[key]['slr_jax']):>14}"
            f"{fmt(report[key]['reference']):>14}{'-' if r is None else f'{r:.2f}':>8}"
        )
    for name, value in report["compile_s"].items():
        lines.append(f"compile/first-call {name}: {value:.2f} s")
    for name, entry in report["memory"].items():
        if isinstance(entry, dict):
            size = "-" if entry["bytes"] is None else f"{entry['bytes'] / 2**20:.0f} MiB"
            lines.append(f"memory {name}: {size} ({entry['kind']})")
        else:
            lines.append(f"memory {name}: {entry / 2**20:.0f} MiB")
    fl = report["flops"]
    if fl["train_step"]:
        mfu = "-" if fl["mfu"] is None else f"{100 * fl['mfu']:.1f}% of bf16 peak"
        lines.append(
            f"train step {fl['train_step'] / 1e9:.1f} GFLOP (XLA), "
            f"{fl['achieved_tflops']:.3f} TFLOP/s, MFU {mfu}"
        )
    for side, pieces in (report["pieces_s"] or {}).items():
        text = ", ".join(f"{k} {v:.3f} s" for k, v in pieces.items())
        lines.append(f"pieces {side}: {text}")
    load = report["load_average"]
    if load["start"]:
        lines.append(f"load average start {load['start'][0]:.2f}, end {load['end'][0]:.2f}")
    return "\n".join(lines)
