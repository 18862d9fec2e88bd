"""Benchmark: the WSSS training step and multi-scale inference, optionally against the reference.

    python -m slr_jax.bench [--config configs/voc.py] [--config.model.width=0.25 ...]
        [--crop 321] [--batch 2] [--steps 5] [--warmup 1] [--dtype float32|bfloat16]
        [--infer-size 321] [--reference-repo PATH] [--pieces [--piece-steps 3]]
        [--xla-cache-dir DIR] [--xla-option KEY=VALUE ...] [--json FILE]

What is timed (wall clock, after ``--warmup`` untimed calls, median of ``--steps`` calls):

- ``train_step``: one full step of ``slr_jax.train`` (two-view forward in training mode, PAMR,
  pseudo labels, every loss term, backward, SGD update with the reference's parameter groups)
  on a global batch sharded over the current devices, compiled once with ``jax.jit``.
- ``infer``: ``slr_jax.infer.multiscale_predict`` of one ``infer_size`` square photograph at
  the config's ``test.scales`` (with ``test.flip``), pre-processing included.

With ``--reference-repo`` (a checkout of github.com/DesertsP/SLRNet; width 1.0, ``wsss`` only)
the same two things run with the official PyTorch ``Net`` on the same input: its forward in
training mode, the loss as ``tools/train_voc_wss.py`` weighs it after pretraining, backward and
its Nesterov SGD with the four parameter groups; inference runs its single-scale test forward
per scale on the image and its mirror, as ``tools/infer_voc.py``. PyTorch runs on CUDA when it
sees a GPU, else on the CPU. Calls alternate (slr_jax, reference, slr_jax, ...) so that a
change of machine load hits both sides alike. The reference script also turns on
``torch.autograd.set_detect_anomaly(True)``; that debugging aid is off here unless
``--reference-detect-anomaly`` asks for it.

Reported besides the medians: their ratio slr_jax / reference (< 1: slr_jax is faster), the
compile time (first call minus median; for slr_jax also lowering and XLA compilation apart),
peak memory (device ``memory_stats()`` / ``torch.cuda.max_memory_allocated`` on accelerators;
on the CPU the process RSS, sampled during each call, peak minus the RSS before the call), the
step's FLOPs from XLA's cost analysis of the lowered program, the achieved TFLOP/s and, on
devices whose bf16 dense peak is tabled below, the MFU. ``--pieces`` adds timings of parts
(backbone forward on both views, forward with every loss term, PAMR; ``backward_and_update`` is
the step minus the forward with loss) to show where the time goes. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# JAX must not grab most of an accelerator's memory when PyTorch shares it (read at backend
# start-up, i.e. on first use, not on import).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))  # config files import ``configs.common``

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from slr_jax import infer as infer_lib  # noqa: E402
from slr_jax import parity, sharding, train  # noqa: E402
from slr_jax.errors import TrainingError  # noqa: E402
from slr_jax.losses import slrnet_objective  # noqa: E402
from slr_jax.models import build_model  # noqa: E402
from slr_jax.ops.pamr import pamr  # noqa: E402

DEFAULT_CONFIG = "configs/voc.py"
MIN_CROP = 33
# Dense (no sparsity) bf16 peak per chip in TFLOP/s, from the vendors' data sheets; the first
# matching substring of the lower-cased ``device_kind`` wins.
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100", 989.4),
    ("h200", 989.4),
    ("a100", 312.0),
    ("v5 lite", 197.0),
    ("v5e", 197.0),
    ("v5p", 459.0),
    ("tpu v5", 459.0),
    ("v4", 275.0),
)


class BenchError(ValueError):
    """The benchmark cannot run with these settings."""


# ----------------------------------------------------------------------------- config


def load_config(path: str, overrides: list[tuple[str, str]] = ()) -> Any:
    """``get_config()`` of an ml_collections config file, with ``key=value`` overrides.

    ``overrides``: ``[('model.width', '0.25'), ...]``; values are parsed to the type of the
    current value (tuples and lists as Python literals).
    """
    file = Path(path)
    if not file.is_file() and not file.is_absolute():
        file = _REPO_ROOT / path
    if not file.is_file():
        raise BenchError(f"config file {path!r} not found; e.g. --config {DEFAULT_CONFIG}")
    spec = importlib.util.spec_from_file_location(f"_bench_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, text in overrides:
        _override(config, key, text)
    return config


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise BenchError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            return type(current)(float(text)) if isinstance(current, float) else int(text)
        except ValueError:
            raise BenchError(f"expected a number, got {text!r}") from None
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise BenchError(f"cannot parse {text!r} as a Python literal") from None
    return tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value


def _override(config: Any, key: str, text: str) -> None:
    *parents, leaf = key.split(".")
    node = config
    try:
        for name in parents:
            node = node[name]
        current = node[leaf]
    except (KeyError, AttributeError, TypeError):
        raise BenchError(
            f"unknown config key {key!r}; the keys are those of configs/common.py"
        ) from None
    try:
        node[leaf] = _parse_value(text, current)
    except (BenchError, TypeError) as e:
        raise BenchError(f"--config.{key}: {e}") from None


# ----------------------------------------------------------------------------- measuring


def _current_rss() -> int | None:
    """Resident set size of this process in bytes (Linux ``/proc``), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """Samples the process RSS every ``interval`` s while active; ``peak_delta``: the largest
    (peak during a call - RSS before that call) over the calls, in bytes."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_delta: int | None = None

    @contextlib.contextmanager
    def measure(self):
        start = _current_rss()
        if start is None:
            yield
            return
        peak = [start]
        stop = threading.Event()

        def sample():
            while not stop.wait(self.interval):
                peak[0] = max(peak[0], _current_rss() or 0)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            peak[0] = max(peak[0], _current_rss() or 0)
            delta = peak[0] - start
            self.peak_delta = delta if self.peak_delta is None else max(self.peak_delta, delta)


def alternate(
    fns: dict[str, Callable[[], Any]],
    warmup: int,
    steps: int,
    samplers: dict | None = None,
    label: str | None = None,
) -> dict[str, dict]:
    """Calls every function ``warmup`` times, then ``steps`` timed times, in turn (a, b, a, b).

    Returns ``{name: {'first_s', 'times_s', 'median_s'}}``; ``first_s`` is the first warm-up
    call (compilation, caches). ``samplers[name]`` (an ``RssSampler``) watches the timed calls.
    With ``label``, every call's time is printed as it ends (slow machines).
    """
    samplers = samplers or {}
    out = {name: {"times_s": []} for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            sampler = samplers.get(name)
            timed = i >= warmup
            scope = sampler.measure() if (timed and sampler) else contextlib.nullcontext()
            with scope:
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
            if label:
                kind = "timed" if timed else "warm-up"
                print(f"  {label} {name} call {i + 1} ({kind}): {elapsed:.2f} s", flush=True)
            if i == 0:
                out[name]["first_s"] = elapsed
            if timed:
                out[name]["times_s"].append(elapsed)
            if len(fns) > 1:
                time.sleep(0.1)  # let the other framework's worker threads go idle
    for result in out.values():
        result["median_s"] = statistics.median(result["times_s"])
    return out


def xla_flops(program: Any) -> float | None:
    """FLOPs from the cost analysis of a lowered or compiled XLA program (None if unavailable)."""
    try:
        cost = program.cost_analysis()
    except Exception:  # some backends and releases do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def count_train_step_flops(config: Any, plan: Any, state: Any, batch: dict) -> float | None:
    """FLOPs of one global train step, counted on a one-device CPU mesh whatever the backend.

    Counted on the host because the accelerator's own count is wrong: on an H200, XLA's cost
    analysis of the compiled GPU step left out the convolutions that run as cuDNN custom calls
    (36 GFLOP for a ~14 TFLOP step), and JAX 0.11's lowered GPU program gave none. The lowered
    CPU program (before optimisation) counts every convolution; where a JAX release cannot
    analyse it, the CPU-compiled program is analysed instead (slower: a host compilation).
    Inputs are abstract (shapes only), so nothing is copied or run.
    """
    cpu_mesh = Mesh(np.asarray(jax.devices("cpu")[:1]), ("data",))
    schedule = plan.learning_rate_fn(config.train.lr)
    step = train.compile_train_step(config, plan, schedule, cpu_mesh, state)
    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    lowered = step.lower(
        jax.tree_util.tree_map(abstract, state), jax.tree_util.tree_map(abstract, batch)
    )
    flops = xla_flops(lowered)
    if flops is None:
        try:
            flops = xla_flops(lowered.compile())
        except Exception:
            return None
    return flops


def peak_bf16_tflops(device_kind: str) -> float | None:
    """Dense bf16 peak TFLOP/s of one chip of this ``device_kind`` (None if not tabled)."""
    kind = device_kind.lower()
    for name, peak in PEAK_BF16_TFLOPS:
        if name in kind:
            return peak
    return None


def _device_peak_bytes(device: Any) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None


def make_inputs(batch: int, crop: int, num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """A random training batch in the layout of ``docs/design.md`` (NumPy, NHWC): smoothed
    noise images (``parity.make_inputs``), one or two image labels each, no pixel labels."""
    inputs = parity.make_inputs("wsss", batch, crop, num_classes, seed)
    labels = np.zeros((batch, num_classes - 1), np.float32)
    for i in range(batch):
        labels[i, [i % (num_classes - 1), (3 * i + 7) % (num_classes - 1)]] = 1.0
    return dict(
        inputs,
        labels=labels,
        mask=np.full((batch, crop, crop), 255, np.int32),
        is_labeled=np.zeros(batch, bool),
    )


def make_photo(size: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB: smooth random colours (the inference input)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (max(size // 16, 2), max(size // 16, 2), 3))
    from PIL import Image

    return (
        np.stack(
            [
                np.asarray(
                    Image.fromarray(coarse[..., c].astype(np.float32)).resize(
                        (size, size), Image.Resampling.BILINEAR
                    )
                )
                for c in range(3)
            ],
            axis=-1,
        )
        .clip(0, 255)
        .astype(np.uint8)
    )


# ----------------------------------------------------------------------------- slr_jax side


class JaxSide:
    """slr_jax's compiled train step and multi-scale inference on the current devices."""

    def __init__(
        self,
        config: Any,
        inputs: dict[str, np.ndarray],
        seed: int,
        compiler_options: dict[str, Any] | None = None,
    ):
        self.config = config
        self.compiler_options = compiler_options or None
        self.mesh = sharding.make_mesh()
        sharding.check_batch_size(int(config.train.batch_size), self.mesh)
        # The post-pretraining step: seg loss on, cosine lr (the work is the same either way).
        self.plan = train.StepPlan(
            steps_per_epoch=1000, total_steps=30000, pretrain_steps=0, decay_steps=30000
        )
        self.model = build_model(config.model)
        t0 = time.perf_counter()
        self.schedule = self.plan.learning_rate_fn(config.train.lr)
        state = train.create_train_state(
            config, self.model, self.schedule, jax.random.key(seed), init_checkpoint=""
        )
        self.state = jax.device_put(state, sharding.replicated(self.mesh))
        jax.block_until_ready(self.state)
        self.init_s = time.perf_counter() - t0
        self.batch = sharding.shard_batch(inputs, self.mesh)
        self.compiled = None
        self.timings: dict[str, float] = {}
        self.metrics: dict[str, float] = {}

    def compile(self) -> None:
        """Lowers and compiles the train step (timed apart: ``lower_s``, ``xla_compile_s``)."""
        step = train.compile_train_step(
            self.config, self.plan, self.schedule, self.mesh, self.state
        )
        t0 = time.perf_counter()
        lowered = step.lower(self.state, self.batch)
        t1 = time.perf_counter()
        self.compiled = lowered.compile(self.compiler_options)
        t2 = time.perf_counter()
        self.timings.update(lower_s=t1 - t0, xla_compile_s=t2 - t1)

    def count_flops(self) -> float | None:
        """FLOPs of the global step (``count_train_step_flops``; timed as ``flop_count_s``)."""
        t0 = time.perf_counter()
        flops = count_train_step_flops(self.config, self.plan, self.state, self.batch)
        self.timings["flop_count_s"] = time.perf_counter() - t0
        return flops

    def step(self) -> None:
        if self.compiled is None:
            self.compile()
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state.step, metrics))
        self._last_metrics = metrics

    def finish_training(self) -> dict[str, float]:
        metrics = jax.device_get(self._last_metrics)
        self.metrics = {k: float(v) for k, v in metrics.items()}
        return self.metrics

    def variables(self) -> dict:
        """Copies of the trained variables (the state's buffers are donated to the step)."""
        tree = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        return jax.tree_util.tree_map(jnp.copy, tree)

    def inference_fn(self, photo: np.ndarray) -> Callable[[], Any]:
        variables = self.variables()
        test = self.config.test

        def run():
            return infer_lib.multiscale_predict(self.model.apply, variables, photo, test)

        return run

    def piece_fns(self, inputs: dict[str, np.ndarray]) -> dict[str, Callable[[], Any]]:
        """Jitted parts of the step, forward only: the backbone on both views, the network with
        PAMR, pseudo labels and every loss term, PAMR alone."""
        model, cfg = self.model, self.config
        variables = self.variables()
        batch = {k: jnp.asarray(v) for k, v in inputs.items()}
        key = jax.random.key(1)
        rngs = {"dropout": key}

        def backbone(v, images):
            from slr_jax.ops import resize_bilinear_align_corners, scaled_size

            size = scaled_size(images.shape[1:3], cfg.model.scale_factor)
            small = resize_bilinear_align_corners(images, size)
            run = lambda m, x: m.backbone(x, True)
            out1, _ = model.apply(v, images, method=run, rngs=rngs, mutable=["batch_stats"])
            out2, _ = model.apply(v, small, method=run, rngs=rngs, mutable=["batch_stats"])
            return out1["conv6"], out2["conv6"]

        def network(v, images):
            out, _ = model.apply(
                v, images, mode="train", train=True, rngs=rngs, mutable=["batch_stats"]
            )
            return out

        def objective(outputs, b):
            return slrnet_objective(
                outputs, b, loss_cfg=cfg.loss, variant=cfg.model.variant, seg_weight=1.0
            )[0]

        def forward_with_loss(v, b):
            return objective(network(v, b["image"]), b)

        outputs = jax.jit(network)(variables, batch["image"])
        masks = jax.lax.stop_gradient((outputs["masks"] + outputs["masks2"]) / 2.0)
        from slr_jax.ops import resize_bilinear_align_corners

        raw = resize_bilinear_align_corners(batch["raw_image"], masks.shape[1:3])
        pamr_fn = jax.jit(
            lambda r, m: pamr(
                r, m, num_iters=cfg.loss.pamr_iters, dilations=tuple(cfg.loss.pamr_dilations)
            )
        )
        jitted = {
            "backbone_forward": (jax.jit(backbone), (variables, batch["image"])),
            "forward_with_loss": (jax.jit(forward_with_loss), (variables, batch)),
            "pamr": (pamr_fn, (raw, masks)),
        }
        return {
            name: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for name, (f, a) in jitted.items()
        }


# ----------------------------------------------------------------------------- reference side


class ReferenceSide:
    """The official PyTorch ``Net`` (wsss) in training mode with its trainer's optimiser."""

    def __init__(
        self,
        repo: str,
        config: Any,
        inputs: dict[str, np.ndarray],
        seed: int,
        threads: int,
        detect_anomaly: bool,
    ):
        import torch

        self.torch = torch
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as tools/train_voc_wss.py
        torch.autograd.set_detect_anomaly(detect_anomaly)
        t0 = time.perf_counter()
        net, _ = parity.build_reference(repo, "wsss", seed, int(config.model.num_classes))
        self.net = net.to(self.device)
        self.init_s = time.perf_counter() - t0
        self.config = config
        tr = config.train
        groups = self.net.parameter_groups()
        decays = (tr.weight_decay, 0.0, tr.weight_decay, 0.0)
        self.optimizer = torch.optim.SGD(
            [
                {"params": g, "lr": m * tr.lr, "weight_decay": d}
                for g, m, d in zip(groups, tr.lr_multipliers, decays)
            ],
            lr=tr.lr,
            momentum=tr.momentum,
            weight_decay=tr.weight_decay,
            nesterov=tr.nesterov,
        )
        to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        self.x = to(np.transpose(inputs["image"], (0, 3, 1, 2)))
        self.raw = to(np.transpose(inputs["raw_image"], (0, 3, 1, 2)))
        self.labels = to(inputs["labels"])
        self.loss = float("nan")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def forward_loss(self):
        c_cls, c_mask, c_code, c_seg = (float(c) for c in self.config.loss.loss_coeff)
        self.net.train()  # the reference's override also keeps frozen layers frozen
        cls_l, seg_l, reg_l, code_l, _, _ = self.net(self.x, self.raw, self.labels)
        return (
            c_cls * cls_l.mean()
            + c_mask * reg_l.mean()
            + c_code * code_l.mean()
            + c_seg * seg_l.mean()
        )

    def step(self) -> None:
        loss = self.forward_loss()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self._sync()
        self._last_loss = loss

    def finish_training(self) -> float:
        self.loss = float(self._last_loss.detach())
        return self.loss

    def inference_fn(self, photo: np.ndarray) -> Callable[[], Any]:
        test = self.config.test

        def run():
            self.net.eval()
            out = parity.reference_multiscale_predict(
                self.net,
                photo,
                tuple(test.scales),
                flip=bool(test.flip),
                single_scale=str(test.mode) == "test",
                device=self.device,
            )
            self._sync()
            return out

        return run

    def piece_fns(self) -> dict[str, Callable[[], Any]]:
        """Backbone on both views (graph recorded), forward with loss, PAMR alone."""
        torch = self.torch
        net = self.net
        h, w = self.x.shape[-2:]
        small = torch.nn.functional.interpolate(
            self.x,
            (int(h * net.scale_factor), int(w * net.scale_factor)),
            mode="bilinear",
            align_corners=True,
        )
        stride4 = ((h - 1) // 4 + 1, (w - 1) // 4 + 1)
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn((self.x.shape[0], self.net.num_classes, *stride4), generator=gen)
        masks = logits.softmax(1).to(self.device)

        def backbone():
            net.train()
            net.backbone.forward_as_dict(self.x)
            net.backbone.forward_as_dict(small)
            self._sync()

        def forward_with_loss():
            self.forward_loss()
            self._sync()

        def run_pamr():
            with torch.no_grad():
                net.run_pamr(self.raw, masks)
            self._sync()

        return {
            "backbone_forward": backbone,
            "forward_with_loss": forward_with_loss,
            "pamr": run_pamr,
        }


# ----------------------------------------------------------------------------- the run


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


def _memory_entry(sampler: RssSampler | None, device_bytes: int | None, kind: str) -> dict:
    if device_bytes is not None:
        return {"bytes": device_bytes, "kind": kind}
    if sampler is not None and sampler.peak_delta is not None:
        return {
            "bytes": sampler.peak_delta,
            "kind": "process RSS: peak during a call minus RSS before it (CPU)",
        }
    return {"bytes": None, "kind": "unavailable"}


def run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> dict:
    """Runs the benchmark described by the parsed command line; returns the JSON report."""
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
    from slr_jax.config import ConfigError, validate_config

    try:
        validate_config(config)
    except ConfigError as e:
        raise BenchError(str(e)) from None
    with_ref = args.reference_repo is not None
    if with_ref and (config.model.width != 1.0 or config.model.variant != "wsss"):
        raise BenchError(
            "the reference is the wsss network at width 1.0; drop the --config.model.width / "
            f"variant overrides (got width={config.model.width}, variant="
            f"{config.model.variant!r}) or leave out --reference-repo"
        )
    if with_ref:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise BenchError(
                "--reference-repo needs PyTorch (CPU is enough): pip install torch"
            ) from None
        parity.load_reference(args.reference_repo, "wsss")  # a bad path fails before any work
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

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    num_classes = int(config.model.num_classes)
    inputs = make_inputs(batch, crop, num_classes, args.seed)
    photo = make_photo(infer_size, args.seed) if infer_size else None
    ours = JaxSide(config, inputs, args.seed, compiler_options)
    sides: dict[str, Any] = {"slr_jax": ours}
    if with_ref:
        sides["reference"] = ReferenceSide(
            args.reference_repo,
            config,
            inputs,
            args.seed,
            args.torch_threads,
            args.reference_detect_anomaly,
        )
    samplers = {name: RssSampler() for name in sides}
    device = jax.devices()[0]

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
    ours.finish_training()
    torch_cuda = with_ref and sides["reference"].device.type == "cuda"
    if torch_cuda:
        torch_peak_train = sides["reference"].torch.cuda.max_memory_allocated()
        sides["reference"].finish_training()
        sides["reference"].torch.cuda.reset_peak_memory_stats()
    elif with_ref:
        torch_peak_train = None
        sides["reference"].finish_training()
    memory = {
        "slr_jax_train": _memory_entry(
            samplers["slr_jax"],
            train_device_peak,
            "jax device peak_bytes_in_use (process lifetime)",
        ),
    }
    if with_ref:
        memory["reference_train"] = _memory_entry(
            samplers["reference"], torch_peak_train, "torch.cuda.max_memory_allocated"
        )

    infer_times = None
    if photo is not None:
        print(
            f"inference: {infer_size}x{infer_size}, scales {tuple(config.test.scales)}, "
            f"flip {config.test.flip}",
            flush=True,
        )
        infer_samplers = {name: RssSampler() for name in sides}
        infer_times = alternate(
            {n: s.inference_fn(photo) for n, s in sides.items()},
            args.warmup,
            args.steps,
            infer_samplers,
            "infer",
        )
        _print_medians("inference", infer_times)
        infer_device_peak = _device_peak_bytes(device) if not on_cpu else None
        memory["slr_jax_infer"] = _memory_entry(
            infer_samplers["slr_jax"],
            infer_device_peak,
            "jax device peak_bytes_in_use (process lifetime)",
        )
        if with_ref:
            ref_peak = sides["reference"].torch.cuda.max_memory_allocated() if torch_cuda else None
            memory["reference_infer"] = _memory_entry(
                infer_samplers["reference"], ref_peak, "torch.cuda.max_memory_allocated"
            )
    memory["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    pieces = None
    if args.pieces:
        piece_fns = {"slr_jax": ours.piece_fns(inputs)}
        if with_ref:
            piece_fns["reference"] = sides["reference"].piece_fns()
        pieces = {name: {} for name in piece_fns}
        for piece in piece_fns["slr_jax"]:
            fns = {name: fns[piece] for name, fns in piece_fns.items() if piece in fns}
            times = alternate(fns, 1, args.piece_steps, label=piece)
            for name, result in times.items():
                pieces[name][piece] = result["median_s"]
        for name in pieces:
            pieces[name]["backward_and_update"] = (
                train_times[name]["median_s"] - pieces[name]["forward_with_loss"]
            )

    median = lambda times, name: times[name]["median_s"] if times and name in times else None
    ratio = lambda times: (
        median(times, "slr_jax") / median(times, "reference") if with_ref and times else None
    )
    step_s = median(train_times, "slr_jax")
    flops = ours.count_flops()  # after the timed calls: host work, never inside a measurement
    peak = peak_bf16_tflops(device.device_kind)
    # Per chip: the lowered program is the global step, spread over every device.
    achieved = flops / step_s / 1e12 / jax.device_count() if flops else None
    compile_s = {
        "slr_jax_train": train_times["slr_jax"]["first_s"] - step_s,
        "slr_jax_train_lower": ours.timings["lower_s"],
        "slr_jax_train_xla_compile": ours.timings["xla_compile_s"],
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
    report = {
        "train_step_s": {"slr_jax": step_s, "reference": median(train_times, "reference")},
        "train_step_ratio": ratio(train_times),
        "train_step_times_s": {n: t["times_s"] for n, t in train_times.items()},
        "infer_s": {
            "slr_jax": median(infer_times, "slr_jax"),
            "reference": median(infer_times, "reference"),
        },
        "infer_ratio": ratio(infer_times),
        "infer_times_s": {n: t["times_s"] for n, t in (infer_times or {}).items()},
        "compile_s": compile_s,
        "init_s": {n: s.init_s for n, s in sides.items()},
        "memory": memory,
        "flops": {
            "train_step": flops,
            "source": "XLA cost_analysis() of the global train step lowered for one CPU device",
            "count_s": ours.timings["flop_count_s"],
            "achieved_tflops": achieved,
            "peak_bf16_tflops": peak,
            "mfu": achieved / peak if (achieved and peak) else None,
        },
        "pieces_s": pieces,
        "final_loss": {
            "slr_jax": ours.metrics.get("total"),
            "reference": sides["reference"].loss if with_ref else None,
        },
        "device": {
            "jax_backend": jax.default_backend(),
            "jax_device_kind": device.device_kind,
            "num_devices": jax.device_count(),
            "reference": str(sides["reference"].device) if with_ref else None,
            "torch_threads": args.torch_threads if with_ref else None,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        },
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
        "versions": _versions(),
        "load_average": {
            "start": load_start,
            "end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    return report


def _print_medians(what: str, times: dict) -> None:
    text = ", ".join(f"{name} {t['median_s']:.3f} s" for name, t in times.items())
    print(f"{what} medians: {text}", flush=True)


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


def _split_overrides(extra: list[str]) -> list[tuple[str, str]]:
    """``['--config.a.b=1', '--config.c', '2']`` -> ``[('a.b', '1'), ('c', '2')]``."""
    out, i = [], 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--config."):
            raise BenchError(f"unrecognised argument {token!r}")
        key = token[len("--config.") :]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(extra):
            i += 1
            value = extra[i]
        else:
            raise BenchError(f"{token} needs a value")
        out.append((key, value))
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slr_jax.bench",
        description=__doc__.split("\n\n")[0],
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
