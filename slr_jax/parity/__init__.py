"""Numerical parity with the official PyTorch SLRNet, from a checkout the user names.

``python -m slr_jax.parity --reference-repo PATH [--setting wsss] [--crop 161] [--batch 2]
[--seed 0 | --seeds 0,1,2,3,4] [--tie-eps 1e-6] [--no-grads] [--dtype float32|bfloat16|float64]
[--scales 1,1.5,2,0.5,0.75] [--json FILE]``

Imports the reference's model class from ``PATH`` (never vendored), builds it with random
weights (BatchNorm statistics and affine parameters randomised too, so no layer is an
identity), converts them with ``slr_jax.convert`` and runs both frameworks on the same random
input in deterministic mode (PyTorch ``eval()``, Flax ``train=False``). Compared, as max |a-b|
and relative L2 error ||a-b|| / ||b||:

- single-scale and two-view test class scores and masks;
- the full multi-scale + flip inference of one photo (``slr_jax.infer.multiscale_predict``
  against the reference's procedure, masks averaged at the photo's size, before CRF);
- the training forward's codes (both views) and dictionary, captured from the reference's
  ``factorization_reconstruction``, and its pseudo labels;
- every loss term and the weighted total, with the seg term on (after pretraining) and, for
  the semi settings, the trainer's extra mean seg loss of pixel-labelled examples;
- the code-consistency term without near-tie pixels (``TIE_EPS``), see below;
- gradients w.r.t. every trainable parameter (frozen ones excluded as in the reference), as
  the worst leaf by name: of the total (PyTorch ``.grad`` after ``backward()``), of the total
  without the code term, and of the tie-free code term.

Near ties: the code-consistency term keeps each pixel's largest code. Where the two largest
codes differ by less than float32 rounding, the two frameworks may keep different atoms, so
the raw term and the gradient of the total can differ by more than rounding. Those two rows
are reported as ``tie-limited`` (not failing) when tie pixels exist and both the tie-free term
and the gradient without the code term pass. The gradient of the tie-free code term is an
``info`` row (reported, not judged).

Float32 rounding: a gradient leaf that sums over many pixels (e.g. a head BatchNorm's scale)
can differ between two float32 implementations by ~1e-4 relative from summation order alone.
The reference is therefore also run in float64 (without the code term, whose argmax is
tie-prone): per leaf, JAX's float32 gradient must be within max(1e-4, 2 x PyTorch float32's
own error) of the float64 one. When it is, an excess of the fp32-vs-fp32 row is reported as
``rounding-limited`` (not failing).

float64 (``--dtype float64``, module ``exact``): both frameworks in float64 from the same
weights and inputs, every row judged at 1e-11. It separates a real difference from rounding:
a float32 row that exceeds its tolerance while the float64 run passes is rounding amplified
by the computation's discontinuities, not a different computation.

Several seeds (``--seeds``): one run per random draw of weights and inputs, every seed's rows
named ``seed S/...`` in one report that passes only if every seed passes.

Exit status 1 when a row fails (outputs and losses 1e-5, gradients 1e-4, relative).
Needs ``torch`` (CPU is enough).

Modules: ``settings`` (reference settings, tolerances), ``inputs`` (the random batch),
``reference`` (loading and building the reference network, its multi-scale inference),
``reference_train`` (its training forward, loss and gradients), ``jax_side`` (our model and
jitted training forward), ``ties`` (near-tie rules), ``grads`` (leaf-by-leaf gradient rows),
``report`` (rows, JSON report, tables), ``runner`` (``run``: the comparison), ``exact``
(``run_float64``), ``cli``.
"""

from slr_jax.parity.cli import build_parser, main
from slr_jax.parity.grads import (
    _frozen_grad_norm,
    _trainable_leaves_row,
    _worst_grad_row,
    _worst_leaf,
    canonical_name,
    rounding_tolerances,
)
from slr_jax.parity.inputs import add_labels, make_inputs
from slr_jax.parity.jax_side import _jax_train_fn, converted_model, loss_config
from slr_jax.parity.reference import (
    _nchw,
    _nhwc,
    build_reference,
    load_reference,
    reference_module,
    reference_multiscale_predict,
)
from slr_jax.parity.reference_train import (
    _torch_float64_grads,
    _torch_grads,
    _torch_masked_code_consistency,
    _torch_train,
    weighted_terms,
)
from slr_jax.parity.report import (
    CHECK,
    INFO,
    LIMITED_KINDS,
    ROUNDING_LIMITED,
    TIE_LIMITED,
    Row,
    compare,
    format_markdown,
    format_table,
    make_report,
    merge_seed_reports,
)
from slr_jax.parity.runner import run
from slr_jax.parity.settings import (
    CLASSIFIER_BIAS,
    CLASSIFIER_SCALE,
    DEFAULT_SCALES,
    GRAD_TOL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LOSS_COEFF,
    LOSS_TOL,
    OUTPUT_TOL,
    SETTINGS,
    TIE_EPS,
)
from slr_jax.parity.ties import (
    _near_tie_mask_jnp,
    masked_code_consistency,
    near_tie_mask,
    near_ties,
    top2_gap,
)

__all__ = [
    "CHECK",
    "CLASSIFIER_BIAS",
    "CLASSIFIER_SCALE",
    "DEFAULT_SCALES",
    "GRAD_TOL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INFO",
    "LIMITED_KINDS",
    "LOSS_COEFF",
    "LOSS_TOL",
    "OUTPUT_TOL",
    "ROUNDING_LIMITED",
    "SETTINGS",
    "TIE_EPS",
    "TIE_LIMITED",
    "Row",
    "_frozen_grad_norm",
    "_jax_train_fn",
    "_nchw",
    "_near_tie_mask_jnp",
    "_nhwc",
    "_torch_float64_grads",
    "_torch_grads",
    "_torch_masked_code_consistency",
    "_torch_train",
    "_trainable_leaves_row",
    "_worst_grad_row",
    "_worst_leaf",
    "add_labels",
    "build_parser",
    "build_reference",
    "canonical_name",
    "compare",
    "converted_model",
    "format_markdown",
    "format_table",
    "load_reference",
    "loss_config",
    "main",
    "make_inputs",
    "make_report",
    "merge_seed_reports",
    "masked_code_consistency",
    "near_tie_mask",
    "near_ties",
    "reference_module",
    "reference_multiscale_predict",
    "rounding_tolerances",
    "run",
    "top2_gap",
    "weighted_terms",
]
