"""Preflight: compile every program of a run for a named TPU slice (or the local devices) and
report what fits, before booking anything.

    python -m slr_jax.preflight --config=configs/voc.py --topology=v5e-16 \
        [--config.KEY=VALUE ...] [--json=FILE] [--max-batch] [--workdir=DIR]

The ``libtpu`` package (installed by ``jax[tpu]``, requirements-tpu.txt) compiles for a TPU
slice named by its topology on a machine without TPUs (``jax.experimental.topologies``); nothing
is executed. Compiled, with the shardings training uses (``slr_jax.sharding``): the train step
(one program: the seg loss switches on inside it from the step counter, so the steps before and
after the classification-only epochs share it), backbone pretraining's step when
``config.pretrain.steps > 0``, and per test scale the evaluation forward (one chip, the view
pair of the largest image the dataset yields, :func:`eval_view_shapes`) and its resize to the
image. Per program and per chip: argument, temporary, output and code bytes against the chip's
HBM, compile seconds, FLOPs and the collectives in the compiled program.

``--topology``: an accelerator type as Cloud TPU names it (``v5litepod-16``, ``v5e-16``,
``v5p-128``, ``v6e-8``, ``v4-32``; v4 and v5p count TensorCores, two per chip, v5e and v6e count
chips) or a libtpu topology (``v5e:4x4``, ``v5p:4x4x4``). Without it: the local devices.
``--max-batch``: the largest per-chip batch whose train step fits, compiled on a 4-chip slice of
the same generation (per-chip memory of the data-parallel step does not depend on the number of
chips). JAX's persistent compilation cache (``config.compile_cache_dir``; ``--workdir`` as in
training, else ``~/.cache/slr_jax``) makes a second preflight of the same programs fast.

Exit status: 0 when every program fits, 1 with one ``error: ...`` line naming the fix when one
does not (or for a config error), 2 for bad flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags
from jax import monitoring
from jax.experimental import topologies
from jax.sharding import Mesh, SingleDeviceSharding

from slr_jax import cli, pretrain, train
from slr_jax import main as main_lib
from slr_jax.config import validate_config
from slr_jax.constants import MASK_STRIDE
from slr_jax.errors import ConfigError, FlagError, SlrJaxError
from slr_jax.infer import predict
from slr_jax.infer.preprocess import bucket_size, reference_scaled_size
from slr_jax.infer.runner import inference_settings
from slr_jax.models import build_model, init_variables
from slr_jax.models.slrnet import padded_region
from slr_jax.sharding import data_sharded, replicated

GIB = 1 << 30
# HBM per chip (Cloud TPU documentation of each generation).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# TensorCores per chip: v4 and v5p accelerator types count cores (megacore: one JAX device per
# chip), v5e and v6e count chips.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_GENERATIONS = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
# v5e / v6e slices of at most this many chips are one host; larger ones have 4 chips per host.
_SINGLE_HOST_2D = 8
# Slice sizes of the 2-D generations (chips) and the largest image each dataset yields.
_SIZES_2D = (1, 4, 8, 16, 32, 64, 128, 256)
LARGEST_IMAGE = {"voc": (500, 500), "coco": (640, 640)}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(_COLLECTIVES) + r")(?:-start)?\(")
# Examples per epoch for the schedule's constants when the data is not at hand (VOC train_aug).
_NOMINAL_EXAMPLES = 10582

_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice: v5e-16, v5litepod-16, v5p-128, v6e-8, v4-32 or v5e:4x4 "
    "(default: the local devices)"
)  # fmt: skip
_JSON = flags.DEFINE_string("json", None, "write the report to this JSON file")
_MAX_BATCH = flags.DEFINE_bool("max-batch", False, "find the largest per-chip batch that fits")
KINDS = ("train", "pretrain", "eval")
_PROGRAMS = flags.DEFINE_multi_enum(
    "programs", list(KINDS), KINDS, "which kinds of program to compile (default: all)"
)


class TopologyError(FlagError):
    """A --topology the tool does not know (a bad flag: exit status 2)."""


# ----------------------------------------------------------------------------- slices


@dataclasses.dataclass(frozen=True)
class Slice:
    """A TPU slice: generation, chip grid, hosts; ``devices()`` are compile-only devices."""

    name: str
    generation: str
    shape: tuple[int, ...]
    hosts: int

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def hbm_bytes(self) -> int:
        return HBM_GIB[self.generation] * GIB

    @property
    def topology_name(self) -> str:
        return f"{self.generation}:{'x'.join(str(d) for d in self.shape)}"

    def _host_bounds(self) -> tuple[int, int, int]:
        if self.hosts == 1:
            return (*self.shape, 1, 1)[:3]
        return (2, 2, 1)

    def devices(self) -> list:
        # Compile-only: libtpu's one-process-per-machine lock guards TPU hardware, not this.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

        megacore = CORES_PER_CHIP[self.generation] > 1
        desc = topologies.get_topology_desc(
            topology_name=self.topology_name,
            platform="tpu",
            chip_config_name="megacore" if megacore else "default",
            chips_per_host_bounds=self._host_bounds(),
        )
        devices = list(desc.devices)
        processes = len({d.process_index for d in devices})
        if len(devices) != self.chips or processes != self.hosts:
            raise TopologyError(
                f"libtpu laid {self.topology_name} out as {len(devices)} devices on {processes} "
                f"hosts, not {self.chips} chips on {self.hosts} hosts."
            )
        return devices

    def probe_slice(self) -> Slice:
        """The 4-chip one-host slice of this generation (``--max-batch`` compiles there)."""
        shape = _grid(self.generation, 4)
        return Slice(f"{self.generation}:{'x'.join(map(str, shape))}", self.generation, shape, 1)


def _grid(generation: str, chips: int) -> tuple[int, ...]:
    """The chip grid Cloud TPU gives ``chips`` chips: 2-D for v5e / v6e (2x2, 2x4, 4x4, ...),
    3-D for v4 / v5p (2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)."""
    if CORES_PER_CHIP[generation] == 1:
        if chips not in _SIZES_2D:
            raise TopologyError(f"{generation} slices have {_SIZES_2D} chips, not {chips}.")
        k = chips.bit_length() - 1
        return (2 ** (k // 2), 2 ** (k - k // 2))
    if chips < 4 or chips & (chips - 1):
        raise TopologyError(
            f"{generation} slices of {chips} chips have no standard shape; name the topology "
            f"(e.g. {generation}:2x2x3)."
        )
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        smallest = min(shape)
        index = max(i for i, d in enumerate(shape) if d == smallest)
        shape[index] *= 2
    return tuple(shape)


def _hosts(generation: str, shape: tuple[int, ...]) -> int:
    chips = math.prod(shape)
    if CORES_PER_CHIP[generation] == 1 and chips <= _SINGLE_HOST_2D:
        return 1
    return max(chips // 4, 1)


def parse_slice(name: str) -> Slice:
    """``v5e-16`` / ``v5litepod-16`` / ``v5p-128`` / ``v6e-8`` / ``v4-32`` (accelerator types)
    or ``v5e:4x4`` / ``v5p:4x4x4`` (libtpu topologies) -> :class:`Slice`."""
    text = str(name).strip().lower()
    known = "v5e-16, v5litepod-16, v5p-128, v6e-8, v4-32 or v5e:4x4"
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
    if match:
        generation, count = _GENERATIONS[match[1]], int(match[2])
        cores = CORES_PER_CHIP[generation]
        if count % cores or count < cores:
            raise TopologyError(
                f"--topology {name}: {generation} accelerator types count TensorCores, "
                f"{cores} per chip; use a multiple of {cores}."
            )
        shape = _grid(generation, count // cores)
        return Slice(name, generation, shape, _hosts(generation, shape))
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e):(\d+(?:x\d+)+)", text)
    if match:
        generation = _GENERATIONS[match[1]]
        shape = tuple(int(d) for d in match[2].split("x"))
        dims = 2 if CORES_PER_CHIP[generation] == 1 else 3
        if len(shape) != dims or min(shape) < 1:
            raise TopologyError(
                f"--topology {name}: {generation} topologies have {dims} dimensions, e.g. "
                f"{_GENERATIONS[match[1]]}:{'x'.join(['2'] * dims)}."
            )
        return Slice(name, generation, shape, _hosts(generation, shape))
    raise TopologyError(f"--topology {name!r} is not a TPU slice; use e.g. {known}.")


# ----------------------------------------------------------------------------- programs


@dataclasses.dataclass
class ProgramReport:
    """Per-chip figures of one compiled program (bytes from ``memory_analysis()``)."""

    name: str
    kind: str  # train | pretrain | eval
    compile_s: float
    # None when the compiler refused the program for lack of memory (``error``).
    argument_bytes: int | None
    temp_bytes: int | None
    output_bytes: int | None
    alias_bytes: int | None
    code_bytes: int | None
    flops: float | None
    collectives: dict[str, int]
    cache_hit: bool
    hbm_bytes: int | None
    error: str = ""  # the compiler's out-of-memory message, first line
    compiler_used_bytes: int | None = None  # what that message says the program needs

    @property
    def peak_bytes(self) -> int:
        """Arguments, outputs not aliased to donated arguments, temporaries and code (or, for
        a program the compiler refused, the memory its message says it needs)."""
        if self.error:
            return int(self.compiler_used_bytes or 0)
        return (
            self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes
        )  # fmt: skip

    @property
    def fits(self) -> bool:
        if self.error:
            return False
        return self.hbm_bytes is None or self.peak_bytes <= self.hbm_bytes

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["hbm_bytes"]
        out.update(peak_bytes=self.peak_bytes, fits=self.fits)
        return out


class _CacheHits:
    """Counts JAX's persistent-cache hits (``/jax/compilation_cache/cache_hits`` events)."""

    count = 0
    _registered = False

    @classmethod
    def register(cls) -> None:
        if not cls._registered:

            def listener(event: str, **_: Any) -> None:
                if event == "/jax/compilation_cache/cache_hits":
                    cls.count += 1

            monitoring.register_event_listener(listener)
            cls._registered = True


def collectives(text: str) -> dict[str, int]:
    """Counts of each collective op in compiled HLO text (async ``-start`` ops once)."""
    counts = dict.fromkeys(_COLLECTIVES, 0)
    for match in _COLLECTIVE_RE.finditer(text):
        counts[match[1]] += 1
    return counts


def _flops(cost: Any) -> float:
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def compile_program(
    name: str, kind: str, jitted: Callable, args: Sequence[Any], hbm_bytes: int | None
) -> ProgramReport:
    """Lowers and compiles ``jitted`` for abstract ``args`` (nothing runs) and reports it."""
    _CacheHits.register()
    hits = _CacheHits.count
    started = time.perf_counter()
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as error:  # noqa: BLE001 - only the compiler's out-of-memory is a result
        if "RESOURCE_EXHAUSTED" not in str(error) and "Ran out of memory" not in str(error):
            raise
        return _refused(name, kind, time.perf_counter() - started, str(error), hbm_bytes)
    seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    return ProgramReport(
        name=name,
        kind=kind,
        compile_s=round(seconds, 2),
        argument_bytes=int(memory.argument_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        flops=_flops(compiled.cost_analysis()),
        collectives=collectives(compiled.as_text() or ""),
        cache_hit=_CacheHits.count > hits,
        hbm_bytes=hbm_bytes,
    )


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_USED_RE = re.compile(r"Used ([0-9.]+)([KMGT]?)B? of ([0-9.]+)([KMGT]?)B? hbm")


def _refused(name: str, kind: str, seconds: float, message: str, hbm: int | None) -> ProgramReport:
    """The report of a program the TPU compiler refused: "Ran out of memory in memory space
    hbm. Used 19.38G of 15.75G hbm. ..." (sizes in binary units)."""
    used = _USED_RE.search(message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return ProgramReport(
        name=name, kind=kind, compile_s=round(seconds, 2), argument_bytes=None,
        temp_bytes=None, output_bytes=None, alias_bytes=None, code_bytes=None, flops=None,
        collectives={}, cache_hit=False, hbm_bytes=hbm, error=lines[0] if lines else message,
        compiler_used_bytes=int(float(used[1]) * _UNITS[used[2]]) if used else None,
    )  # fmt: skip


def _abstract(tree: Any, sharding: Any) -> Any:

    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
    )


def train_batch_shapes(config: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of each entry of a global training batch (slr_jax/data/pipeline.py)."""

    batch, crop = int(config.train.batch_size), int(config.dataset.crop_size)
    classes = int(config.model.num_classes) - 1
    return {
        "image": ((batch, crop, crop, 3), np.float32),
        "raw_image": ((batch, crop, crop, 3), np.float32),
        "labels": ((batch, classes), np.float32),
        "mask": ((batch, crop, crop), np.int32),
        "is_labeled": ((batch,), np.bool_),
    }


def abstract_train_step(config: Any, mesh: Any) -> tuple[Any, Any, dict]:
    """(jitted train step, abstract TrainState, abstract global batch) for ``config`` on
    ``mesh``: the arguments carry their shardings (state replicated, batch split over the data
    axis); nothing is computed."""

    nominal = max(_NOMINAL_EXAMPLES, int(config.train.batch_size))
    plan = train.plan_steps(config.train, nominal)
    model = build_model(config.model)
    lr_fn = plan.learning_rate_fn(config.train.lr)
    state = jax.eval_shape(
        lambda key: train.create_train_state(config, model, lr_fn, key, init_checkpoint=""),
        jax.random.key(int(config.seed)),
    )
    step = train.compile_train_step(config, plan, lr_fn, mesh, state)
    batch = {
        key: jax.ShapeDtypeStruct(shape, dtype, sharding=data_sharded(mesh))
        for key, (shape, dtype) in train_batch_shapes(config).items()
    }
    return step, _abstract(state, replicated(mesh)), batch


def train_program(config: Any, mesh: Any, hbm_bytes: int | None) -> ProgramReport:
    """The train step of ``slr_jax.train.compile_train_step`` on an abstract TrainState."""

    step, state, batch = abstract_train_step(config, mesh)
    return compile_program("train_step", "train", step, (state, batch), hbm_bytes)


def pretrain_program(config: Any, mesh: Any, hbm_bytes: int | None) -> ProgramReport:
    """Backbone pretraining's step (``slr_jax.pretrain``) on abstract state and batch."""

    model = pretrain.build_classifier(config)
    state = jax.eval_shape(
        lambda key: pretrain.init_state(config, model, key), jax.random.key(int(config.seed))
    )
    shapes = train_batch_shapes(config)
    data = data_sharded(mesh)
    args = (
        *_abstract(state, replicated(mesh)),
        jax.ShapeDtypeStruct(*shapes["image"], sharding=data),
        jax.ShapeDtypeStruct(*shapes["labels"], sharding=data),
        _abstract(jax.eval_shape(lambda: jax.random.key(0)), replicated(mesh)),
    )
    step = pretrain.sharded_step(config, model, mesh)
    return compile_program("pretrain_step", "pretrain", step, args, hbm_bytes)


def eval_image_shapes(config: Any) -> list[tuple[int, int]]:
    """(H, W) of the images evaluation must serve: the largest the dataset yields (VOC 500x500;
    synthetic sets their ``image_size``)."""
    name = str(config.dataset.name)
    if name == "synthetic":
        size = int(config.dataset.image_size) or 64
        return [(size, size)]
    if name not in LARGEST_IMAGE:
        raise ConfigError(f"preflight knows no image size for dataset.name={name!r}.")
    return [LARGEST_IMAGE[name]]


def eval_view_shapes(
    config: Any, image_shapes: Sequence[tuple[int, int]] | None = None
) -> list[tuple[float, tuple[int, int], tuple[int, int]]]:
    """(scale, view (h, w) as compiled, image (H, W)) of every evaluation forward program for
    ``image_shapes`` (default :func:`eval_image_shapes`) at ``config.test.scales``, views
    padded to their buckets when ``config.test.bucket_step`` > 0; each program once."""

    step = int(config.test.bucket_step)
    seen, out = set(), []
    for image in image_shapes or eval_image_shapes(config):
        for scale in config.test.scales:
            view = reference_scaled_size(tuple(image), float(scale))
            view = tuple(bucket_size(d, step) for d in view) if step else view
            if view not in seen:
                seen.add(view)
                out.append((float(scale), view, tuple(image)))
    return out


def eval_programs(config: Any, device: Any, hbm_bytes: int | None) -> list[ProgramReport]:
    """The programs ``slr_jax.infer.predict`` compiles for the images of
    :func:`eval_image_shapes`, on one chip (each process predicts its own images on its own
    devices): with exact padding (``test.bucket_sizes``, the default) one program per (bucket,
    scale), forward + resize + sum; otherwise per view shape the forward and its resize."""

    model = build_model(config.model)
    on_chip = SingleDeviceSharding(device)
    variables = _abstract(
        jax.eval_shape(lambda key: init_variables(model, key), jax.random.key(0)), on_chip
    )
    settings = inference_settings(config.test)
    padded, unpadded = [], []
    for image in eval_image_shapes(config):
        group = predict.eval_program_group(image, settings, model.apply)
        if group[0] == "padded":
            padded.append(group[1])
        else:
            unpadded.append(tuple(image))
    reports = []
    for bucket in sorted(set(padded)):
        reports += _padded_eval_programs(config, model, variables, bucket, on_chip, hbm_bytes)
    if unpadded:
        reports += _unpadded_eval_programs(config, model, variables, unpadded, on_chip, hbm_bytes)
    return reports


def _padded_eval_programs(config, model, variables, bucket, on_chip, hbm_bytes):
    """One program per scale of the exact padded prediction of a ``bucket`` x ``bucket`` image
    (``slr_jax.infer.predict._padded_predict``'s arguments, abstract)."""

    def spec(shape, dtype=np.float32):
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=on_chip)

    views_per_scale = 2 if config.test.flip else 1
    classes = int(config.model.num_classes)
    program = predict._padded_program(model.apply)
    reports, seen = [], set()
    for scale in config.test.scales:
        padded = reference_scaled_size((bucket, bucket), float(scale))
        if padded in seen:
            continue
        seen.add(padded)
        region = jax.tree_util.tree_map(
            lambda a: spec(a.shape, a.dtype), padded_region(padded, padded)
        )
        grid = [predict._grid_length(d, MASK_STRIDE) for d in padded]
        args = (
            variables,
            spec((views_per_scale, *padded, 3)),
            region,
            spec((bucket, grid[0])),
            spec((bucket, grid[1])),
            spec((bucket, grid[1])),
            spec((bucket, bucket, classes)),
            spec((classes - 1,)),
        )
        name = f"eval_padded_{bucket}@{float(scale):g}"
        reports.append(compile_program(name, "eval", program, args, hbm_bytes))
    return reports


def _unpadded_eval_programs(config, model, variables, images, on_chip, hbm_bytes):
    """Per view shape of ``images``: the network forward and its resize to the image."""

    step = int(config.test.bucket_step)
    stride = MASK_STRIDE if step else 1
    rescore = bool(step) and str(config.test.mode) == "test"
    rescore = rescore and config.model.variant != "semi_wo_cls"
    network = predict._network_fn(model.apply, str(config.test.mode), stride, rescore)
    views_per_scale = 2 if config.test.flip else 1
    classes = int(config.model.num_classes)
    reports = []
    for scale, (h, w), (height, width) in eval_view_shapes(config, images):
        views = jax.ShapeDtypeStruct((views_per_scale, h, w, 3), np.float32, sharding=on_chip)
        valid = jax.ShapeDtypeStruct((2,), np.int32, sharding=on_chip)
        tag = f"{h}x{w}@{scale:g}"
        reports.append(
            compile_program(f"eval_forward_{tag}", "eval", network, (variables, views, valid),
                            hbm_bytes)
        )  # fmt: skip
        gh, gw = (predict._grid_length(d, stride) for d in (h, w))
        masks_shape = (views_per_scale, gh, gw, classes)
        masks = jax.ShapeDtypeStruct(masks_shape, np.float32, sharding=on_chip)
        rows = jax.ShapeDtypeStruct((height, gh), np.float32, sharding=on_chip)
        cols = jax.ShapeDtypeStruct((width, gw), np.float32, sharding=on_chip)
        reports.append(
            compile_program(f"eval_resize_{tag}", "eval", predict._grid_to_image,
                            (masks, rows, cols, cols), hbm_bytes)
        )  # fmt: skip
    return reports


# ----------------------------------------------------------------------------- the report


@dataclasses.dataclass
class Target:
    """Where the programs are compiled: devices, hosts and HBM per chip (None: unknown)."""

    name: str
    devices: list
    hosts: int
    hbm_bytes: int | None

    @property
    def chips(self) -> int:
        return len(self.devices)

    def mesh(self) -> Any:

        return Mesh(np.asarray(self.devices), ("data",))  # slr_jax.sharding's layout


def tpu_target(tpu: Slice) -> Target:
    return Target(tpu.name, tpu.devices(), tpu.hosts, tpu.hbm_bytes)


def local_target() -> Target:
    """The local devices; HBM from the device's memory stats (GPU) or the machine's RAM (CPU)."""

    devices = jax.devices()
    stats = devices[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit is None and devices[0].platform == "cpu":
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    name = f"local {devices[0].platform} x{len(devices)}"
    return Target(name, devices, jax.process_count(), int(limit) if limit else None)


def check_batch(config: Any, target: Target) -> tuple[int, int]:
    """(per-chip, per-host) batch of ``config.train.batch_size`` on ``target``; a ConfigError
    when it does not split evenly (as ``slr_jax.sharding.check_batch_size`` on the slice)."""
    batch = int(config.train.batch_size)
    if batch % target.chips or batch % target.hosts:
        raise ConfigError(
            f"config.train.batch_size={batch} must be divisible by the {target.chips} chips "
            f"and {target.hosts} hosts of {target.name}; use a multiple of {target.chips}."
        )
    return batch // target.chips, batch // target.hosts


def with_batch(config: Any, global_batch: int) -> Any:
    config = config.copy_and_resolve_references()
    config.train.batch_size = int(global_batch)
    return config


def compile_all(config: Any, target: Target, kinds: Sequence[str] = KINDS) -> list[ProgramReport]:
    """Every program of a run of ``config`` on ``target`` (of the ``kinds`` asked for)."""
    mesh, reports = target.mesh(), []
    if "train" in kinds:
        reports.append(train_program(config, mesh, target.hbm_bytes))
    pretrains = int(config.pretrain.steps) > 0 and not str(config.train.init_checkpoint)
    if "pretrain" in kinds and pretrains:
        reports.append(pretrain_program(config, mesh, target.hbm_bytes))
    if "eval" in kinds:
        reports += eval_programs(config, target.devices[0], target.hbm_bytes)
    return reports


def max_batch_per_chip(
    peak_fn: Callable[[int], int], hbm_bytes: int, start: int = 1, limit: int = 1024
) -> tuple[int, dict[int, int]]:
    """Largest per-chip batch b <= ``limit`` with ``peak_fn(b) <= hbm_bytes`` (0 if none),
    and the peaks compiled. Memory grows about linearly with b: each probe is the linear
    estimate from the two nearest probes, kept strictly inside the bracket [fits, does not)
    so that the answer is always a compiled fit next to a compiled misfit (or ``limit``)."""
    peaks: dict[int, int] = {}
    probe = max(1, min(int(start), limit))
    while True:
        peaks[probe] = peak_fn(probe)
        fits = [b for b in peaks if peaks[b] <= hbm_bytes]
        misfits = [b for b in peaks if peaks[b] > hbm_bytes]
        low, high = max(fits, default=0), min(misfits, default=limit + 1)
        if high - low <= 1:
            return low, peaks
        near = sorted(peaks, key=lambda b: (abs(b - low) + abs(b - high), b))[:2]
        guess = None
        if len(near) == 2 and peaks[near[0]] != peaks[near[1]]:
            (b1, p1), (b2, p2) = ((b, peaks[b]) for b in near)
            guess = math.floor(b1 + (hbm_bytes - p1) * (b2 - b1) / (p2 - p1))
        if guess is None:
            guess = 2 * low if high > limit else (low + high) // 2
        probe = min(max(guess, low + 1), high - 1)
        if probe in peaks:
            probe = (low + high) // 2


def _fix(config: Any, report: ProgramReport, target: Target, per_chip: int) -> str:
    need = report.peak_bytes / GIB
    have = (report.hbm_bytes or 0) / GIB
    fixes = []
    if report.kind in ("train", "pretrain"):
        fixes.append(
            f"a smaller per-chip batch (now {per_chip}: config.train.batch_size="
            f"{int(config.train.batch_size)} over {target.chips} chips; try --max-batch)"
        )
        if report.kind == "train" and not config.model.remat:
            fixes.append("--config.model.remat=True")
    else:
        fixes.append(f"smaller config.test.scales (largest {max(config.test.scales):g})")
    if config.model.dtype == "float32":
        fixes.append("--config.model.dtype=bfloat16")
    needs = f"needs {need:.2f} GiB per chip" if report.peak_bytes else "does not fit"
    return f"{report.name} {needs}, more than the {have:.0f} GiB of {target.name}; use " + (
        " or ".join(fixes) + "."
    )


def _gib(n: int | None) -> str:
    return f"{'-':>7}" if n is None else f"{n / GIB:7.2f}"


def format_table(report: dict) -> str:
    lines = [
        f"{report['topology']}: {report['chips']} chips, {report['hosts']} hosts, "
        f"{(report['hbm_bytes_per_chip'] or 0) / GIB:.0f} GiB per chip; global batch "
        f"{report['global_batch']} = {report['per_host_batch']} per host = "
        f"{report['per_chip_batch']} per chip",
        f"{'program':<28} {'args':>7} {'temp':>7} {'out':>7} {'code':>7} {'peak':>7} GiB "
        f"{'TFLOP':>7} {'compile':>8}  fits  collectives",
    ]
    for p in report["programs"]:
        coll = ", ".join(f"{k} {v}" for k, v in p["collectives"].items() if v) or "-"
        lines.append(
            f"{p['name']:<28} {_gib(p['argument_bytes'])} {_gib(p['temp_bytes'])} "
            f"{_gib(p['output_bytes'])} {_gib(p['code_bytes'])} {_gib(p['peak_bytes'])}     "
            f"{(p['flops'] or 0) / 1e12:7.3f} {p['compile_s']:7.1f}s  "
            f"{'yes' if p['fits'] else 'NO ':<4}"
            f"  {coll}{' (cached)' if p['cache_hit'] else ''}"
            + (f"\n    compiler: {p['error']}" if p["error"] else "")
        )
    if "max_batch_per_chip" in report:
        lines.append(
            f"largest per-chip batch whose train step fits: {report['max_batch_per_chip']} "
            f"(compiled on {report['max_batch_probe']['topology']})"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def without_persistent_cache(active: bool = True):
    """JAX's persistent compilation cache off for the block (unless not ``active``): libtpu's
    compile-only client writes entries that no process can read back ("PjRtCompiler must be
    constructed with a Client"), so compiling for a named slice never writes to the cache of
    local runs."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", enabled and not active)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def run_preflight(
    config: Any,
    tpu: Slice | None,
    *,
    kinds: Sequence[str] = KINDS,
    max_batch: bool = False,
    log: Callable = print,
) -> dict[str, Any]:
    """The report (the JSON of ``--json``) of every program of ``config`` on ``tpu`` (None:
    the local devices)."""
    if tpu is not None and not os.environ.get("JAX_PLATFORMS"):
        # Abstract shapes are traced on the CPU; no TPU backend is looked for.
        jax.config.update("jax_platforms", "cpu")
    target = tpu_target(tpu) if tpu is not None else local_target()
    per_chip, per_host = check_batch(config, target)
    log(f"compiling for {target.name} ({target.chips} chips, {target.hosts} hosts) ...")
    with without_persistent_cache(tpu is not None):
        programs = compile_all(config, target, kinds)
        search = _max_batch(config, tpu, target, per_chip, log) if max_batch else {}
    report: dict[str, Any] = {
        "topology": target.name,
        "chips": target.chips,
        "hosts": target.hosts,
        "hbm_bytes_per_chip": target.hbm_bytes,
        "fits": all(p.fits for p in programs),
        "programs": [p.as_dict() for p in programs],
        "global_batch": int(config.train.batch_size),
        "per_host_batch": per_host,
        "per_chip_batch": per_chip,
        "device_kind": target.devices[0].device_kind,
    }
    if tpu is not None:
        report["libtpu_topology"] = tpu.topology_name
    report.update(search)
    report["_reports"], report["_target"] = programs, target
    return report


def _max_batch(config, tpu, target, per_chip, log) -> dict[str, Any]:
    probe = tpu_target(tpu.probe_slice()) if tpu is not None else target
    if probe.hbm_bytes is None:
        raise ConfigError(f"--max-batch needs the memory of {probe.name}'s devices; unknown.")
    mesh = probe.mesh()

    def peak(b: int) -> int:
        report = train_program(with_batch(config, b * probe.chips), mesh, probe.hbm_bytes)
        log(f"  per-chip batch {b}: {report.peak_bytes / GIB:.2f} GiB ({report.compile_s:.0f} s)")
        # A refusal without the compiler's figure still counts as more than the chip has.
        return report.peak_bytes if report.fits else max(report.peak_bytes, probe.hbm_bytes + 1)

    log(f"--max-batch: train steps compiled on {probe.name} ({probe.chips} chips)")
    best, peaks = max_batch_per_chip(peak, probe.hbm_bytes, start=per_chip)
    return {
        "max_batch_per_chip": best,
        "max_batch_probe": {
            "topology": tpu.probe_slice().topology_name if tpu is not None else probe.name,
            "peak_bytes": {str(b): p for b, p in sorted(peaks.items())},
        },
    }


def _cache_folder() -> str:
    """Where the persistent compilation cache goes: ``--workdir`` as in training, else
    ``~/.cache/slr_jax`` (``config.compile_cache_dir`` overrides both; 'none' = off)."""
    if main_lib._WORKDIR.value:
        return main_lib._WORKDIR.value
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache_home, "slr_jax")


class DoesNotFit(SlrJaxError):
    """A program does not fit the chip's memory (its message names the fix)."""


def _main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise FlagError(f"unexpected arguments {argv[1:]} (see --help)")
    tpu = parse_slice(_TOPOLOGY.value) if _TOPOLOGY.value else None
    config = main_lib.resolve_config("train")
    validate_config(config, "train")
    if tpu is None:  # for a named slice run_preflight compiles without_persistent_cache
        main_lib.enable_compilation_cache(config, _cache_folder())
    report = run_preflight(config, tpu, kinds=_PROGRAMS.value, max_batch=_MAX_BATCH.value)
    programs, target = report.pop("_reports"), report.pop("_target")
    print(format_table(report))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=2)
    misfit = next((p for p in programs if not p.fits), None)
    if misfit is not None:
        raise DoesNotFit(_fix(config, misfit, target, report["per_chip_batch"]))
    return cli.EXIT_OK


def main(argv: list[str]) -> None:
    """absl's main: :func:`_main` under :func:`slr_jax.cli.run_cli` (one line per user error)."""
    cli.run_cli(functools.partial(_main, argv), debug=main_lib._DEBUG.value)


def run() -> None:
    app.run(functools.partial(main), flags_parser=main_lib.parse_flags)


if __name__ == "__main__":
    run()
