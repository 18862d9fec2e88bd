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
step's FLOPs from XLA's cost analysis of the lowered program, on the CPU each side's step
time and peak memory alone in a process of its own (``process_memory``), the achieved
TFLOP/s and, on devices whose bf16 dense peak is tabled below, the MFU. ``--pieces`` adds
timings of parts (backbone forward on both views, forward with every loss term, PAMR;
``backward_and_update`` is the step minus the forward with loss) to show where the time goes.
Results: docs/benchmarks.md.

Modules: ``configfile`` (config file and overrides), ``inputs`` (batch and photograph),
``jax_side`` and ``reference_side`` (what each framework runs), ``timing`` (alternating
calls, medians), ``memory`` (device peaks, process RSS), ``flops`` (XLA's count, bf16 peaks),
``report`` (the JSON report's sections, the summary), ``options`` (flags, the checked config,
XLA settings), ``runner`` (``run``), ``process_memory`` (one side alone), ``cli``. The
reference network and the random images come from ``slr_jax.parity``.
"""

import os as _os
import sys as _sys

# JAX must not grab most of an accelerator's memory when PyTorch shares it (read at backend
# start-up, i.e. on first use, not on import).
_os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from slr_jax.bench.configfile import REPO_ROOT as _REPO_ROOT  # noqa: E402

if str(_REPO_ROOT) not in _sys.path:
    _sys.path.insert(0, str(_REPO_ROOT))  # config files import ``configs.common``

from slr_jax.bench.cli import main  # noqa: E402
from slr_jax.bench.configfile import (  # noqa: E402
    DEFAULT_CONFIG,
    BenchError,
    _override,
    _parse_value,
    load_config,
    split_overrides,
)
from slr_jax.bench.flops import (  # noqa: E402
    PEAK_BF16_TFLOPS,
    count_train_step_flops,
    peak_bf16_tflops,
    xla_flops,
)
from slr_jax.bench.inputs import make_inputs, make_photo  # noqa: E402
from slr_jax.bench.jax_side import JaxSide  # noqa: E402
from slr_jax.bench.memory import (  # noqa: E402
    RssSampler,
    _device_peak_bytes,
    _memory_entry,
    current_rss,
)
from slr_jax.bench.options import MIN_CROP, build_parser  # noqa: E402
from slr_jax.bench.reference_side import ReferenceSide  # noqa: E402
from slr_jax.bench.report import _versions, format_report  # noqa: E402
from slr_jax.bench.runner import run  # noqa: E402
from slr_jax.bench.timing import _print_medians, alternate  # noqa: E402

__all__ = [
    "DEFAULT_CONFIG",
    "MIN_CROP",
    "PEAK_BF16_TFLOPS",
    "BenchError",
    "JaxSide",
    "ReferenceSide",
    "RssSampler",
    "_device_peak_bytes",
    "_memory_entry",
    "_override",
    "_parse_value",
    "_print_medians",
    "_versions",
    "alternate",
    "build_parser",
    "count_train_step_flops",
    "current_rss",
    "format_report",
    "load_config",
    "main",
    "make_inputs",
    "make_photo",
    "peak_bf16_tflops",
    "run",
    "split_overrides",
    "xla_flops",
]
