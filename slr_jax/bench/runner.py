"""The benchmark run (``run``): settings checked, both sides built, the train step, inference
and (``--pieces``) parts of the step timed, memory and FLOPs measured, the report assembled."""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from typing import Any

import jax
import numpy as np

from slr_jax.bench.configfile import BenchError
from slr_jax.bench.inputs import make_inputs, make_photo, voc_like_sizes
from slr_jax.bench.jax_side import JaxSide
from slr_jax.bench.memory import RssSampler, _device_peak_bytes, _memory_entry
from slr_jax.bench.options import configure, xla_settings
from slr_jax.bench.process_memory import in_own_process
from slr_jax.bench.reference_side import ReferenceSide
from slr_jax.bench.report import (
    _versions,
    compile_section,
    device_section,
    flops_section,
    settings_section,
    timing_section,
)
from slr_jax.bench.timing import _print_medians, alternate, median
from slr_jax.infer.predict import eval_programs_compiled
from slr_jax.models import build_model, variable_shapes
from slr_jax.parity.reference import load_reference

JAX_PEAK_KIND = "jax device peak_bytes_in_use (process lifetime)"
TORCH_PEAK_KIND = "torch.cuda.max_memory_allocated"


def run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> dict:
    """Runs the benchmark described by the parsed command line; returns the JSON report."""
    config, (crop, batch, infer_size) = configure(args, overrides)
    with_ref = args.reference_repo is not None
    _check_reference(args, config)
    compiler_options = xla_settings(args)
    load_start = _load_average()
    inputs = make_inputs(batch, crop, int(config.model.num_classes), args.seed)
    photo = make_photo(infer_size, args.seed) if infer_size else None
    sides = _make_sides(args, config, inputs, compiler_options)
    ours = sides["slr_jax"]
    device = jax.devices()[0]
    train_times, own_times, memory = _time_training(sides, config, args, device, crop, batch)
    infer_times = None
    if photo is not None:
        infer_times = _time_inference(sides, photo, config, args, device, infer_size, memory)
    memory["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pieces = _time_pieces(sides, inputs, args.piece_steps, train_times) if args.pieces else None
    step_s = median(train_times, "slr_jax")
    flops = ours.count_flops()  # after the timed calls: host work, never inside a measurement
    sizes = (crop, batch, infer_size)
    return {
        **timing_section(train_times, infer_times, with_ref, own_times),
        "compile_s": compile_section(ours.timings, train_times, infer_times, with_ref),
        "init_s": {n: s.init_s for n, s in sides.items()},
        "memory": memory,
        "flops": flops_section(flops, step_s, ours.timings["flop_count_s"], device.device_kind),
        "pieces_s": pieces,
        "final_loss": {
            "slr_jax": ours.metrics.get("total"),
            "reference": sides["reference"].loss if with_ref else None,
        },
        "device": device_section(device, sides, args.torch_threads),
        **settings_section(args, config, sizes, overrides, compiler_options, with_ref),
        "eval_programs_compiled": eval_programs_on_cpu(config),
        "versions": _versions(),
        "load_average": {"start": load_start, "end": _load_average()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def eval_programs_on_cpu(config) -> int:
    """XLA programs one evaluation of VOC-like image sizes (``inputs.voc_like_sizes``)
    compiles on the CPU with ``config.test``: counted by ``infer.predict.eval_programs_compiled``
    on a width-1/16 copy of the network with zero weights (the count depends on the shapes
    only), the persistent compilation cache off so that every compilation shows."""
    model = build_model(config.model).clone(width=0.0625)
    zeros = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), variable_shapes(model))
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            counted = eval_programs_compiled(model.apply, zeros, voc_like_sizes(), config.test)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    print(
        f"evaluation programs: {counted['programs']} compiled for {counted['images']} VOC-like "
        f"image sizes ({counted['groups']} groups), scales {tuple(config.test.scales)}"
    )
    return counted["programs"]


def _check_reference(args: argparse.Namespace, config: Any) -> None:
    """With ``--reference-repo``: the reference's architecture, PyTorch and the checkout."""
    if args.reference_repo is None:
        return
    if config.model.width != 1.0 or config.model.variant != "wsss":
        raise BenchError(
            "the reference is the wsss network at width 1.0; drop the --config.model.width / "
            f"variant overrides (got width={config.model.width}, variant="
            f"{config.model.variant!r}) or leave out --reference-repo"
        )
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BenchError(
            "--reference-repo needs PyTorch (CPU is enough): pip install torch"
        ) from None
    load_reference(args.reference_repo, "wsss")  # a bad path fails before any work


def _load_average():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def _make_sides(args, config, inputs, compiler_options) -> dict[str, Any]:
    """``{'slr_jax': JaxSide, 'reference': ReferenceSide (with --reference-repo)}``."""
    sides: dict[str, Any] = {"slr_jax": JaxSide(config, inputs, args.seed, compiler_options)}
    if args.reference_repo is not None:
        sides["reference"] = ReferenceSide(
            args.reference_repo,
            config,
            inputs,
            args.seed,
            args.torch_threads,
            args.reference_detect_anomaly,
        )
    return sides


def _time_training(sides: dict, config, args, device, crop: int, batch: int):
    """The train step of every side, alternating, and (CPU, ``--memory process``) each side
    alone in its own process: ``(times, own-process times, memory entries)``."""
    on_cpu = jax.default_backend() == "cpu"
    samplers = {name: RssSampler() for name in sides}
    print(
        f"train step: crop {crop}, batch {batch}, {config.model.dtype}, width "
        f"{config.model.width}, {args.warmup} warm-up + {args.steps} timed, sides "
        f"{list(sides)}",
        flush=True,
    )
    train_times = alternate(
        {n: s.step for n, s in sides.items()}, args.warmup, args.steps, samplers, "train"
    )
    _print_medians("train step", train_times)
    train_device_peak = _device_peak_bytes(device) if not on_cpu else None
    sides["slr_jax"].finish_training()
    memory = {"slr_jax_train": _memory_entry(samplers["slr_jax"], train_device_peak, JAX_PEAK_KIND)}
    if "reference" in sides:
        ref = sides["reference"]
        torch_cuda = ref.device.type == "cuda"
        peak = ref.torch.cuda.max_memory_allocated() if torch_cuda else None
        ref.finish_training()
        if torch_cuda:
            ref.torch.cuda.reset_peak_memory_stats()
        memory["reference_train"] = _memory_entry(samplers["reference"], peak, TORCH_PEAK_KIND)
    own_times = {}
    if on_cpu and args.memory == "process":
        for name in sides:
            print(f"train step memory and time: {name} alone in its own process", flush=True)
            own = in_own_process(args.argv, name)
            if own.get("times_s"):
                times = own.pop("times_s")
                own_times[name] = {
                    "first_s": own.pop("first_s"),
                    "times_s": times,
                    "median_s": statistics.median(times),
                }
            memory[f"{name}_train"] = own
    return train_times, own_times, memory


def _time_inference(sides: dict, photo, config, args, device, infer_size: int, memory: dict):
    """Multi-scale inference of ``photo`` on every side, alternating: the times; adds the
    memory entries to ``memory``."""
    on_cpu = jax.default_backend() == "cpu"
    print(
        f"inference: {infer_size}x{infer_size}, scales {tuple(config.test.scales)}, "
        f"flip {config.test.flip}",
        flush=True,
    )
    samplers = {name: RssSampler() for name in sides}
    infer_times = alternate(
        {n: s.inference_fn(photo) for n, s in sides.items()},
        args.warmup,
        args.steps,
        samplers,
        "infer",
    )
    _print_medians("inference", infer_times)
    device_peak = _device_peak_bytes(device) if not on_cpu else None
    memory["slr_jax_infer"] = _memory_entry(samplers["slr_jax"], device_peak, JAX_PEAK_KIND)
    if "reference" in sides:
        ref = sides["reference"]
        peak = ref.torch.cuda.max_memory_allocated() if ref.device.type == "cuda" else None
        memory["reference_infer"] = _memory_entry(samplers["reference"], peak, TORCH_PEAK_KIND)
    return infer_times


def _time_pieces(sides: dict, inputs: dict, piece_steps: int, train_times: dict) -> dict:
    """Median of every part of the step per side; ``backward_and_update`` is the step minus
    the forward with loss."""
    piece_fns = {"slr_jax": sides["slr_jax"].piece_fns(inputs)}
    if "reference" in sides:
        piece_fns["reference"] = sides["reference"].piece_fns()
    pieces = {name: {} for name in piece_fns}
    for piece in piece_fns["slr_jax"]:
        fns = {name: fns[piece] for name, fns in piece_fns.items() if piece in fns}
        times = alternate(fns, 1, piece_steps, label=piece)
        for name, result in times.items():
            pieces[name][piece] = result["median_s"]
    for name in pieces:
        pieces[name]["backward_and_update"] = (
            train_times[name]["median_s"] - pieces[name]["forward_with_loss"]
        )
    return pieces
