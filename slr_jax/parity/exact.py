"""Both frameworks in float64: the comparison that tells a real difference from rounding.

In float32, two correct implementations differ by rounding, and rounding is amplified where
the computation is discontinuous (ReLU kinks, argmax near-ties, pseudo-label thresholds): a
float32 excess alone cannot say whether the JAX side computes the same function. In float64
(JAX with x64 on, the reference after ``net.double()``), from the same float32 weights and
inputs held exactly in float64, the rounding is ~1e-16 and a value must flip across a kink by
less than that to matter, so every row is judged at ``FLOAT64_TOL`` (1e-11): any row above it
is a real difference, whatever float32 says.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from slr_jax.parity import runner
from slr_jax.parity.inputs import make_inputs
from slr_jax.parity.jax_side import converted_model
from slr_jax.parity.reference import build_reference, reference_module
from slr_jax.parity.report import CHECK, INFO, add_note, make_report
from slr_jax.parity.settings import num_classes_of

# Relative error allowed between the two float64 computations. Measured: at most ~1e-14
# (outputs, losses, every gradient leaf); float32 rounding alone would be ~1e-7 to 1e-4.
FLOAT64_TOL = 1e-11
# Near-tie threshold of the code term in float64 (the ties float32 needs do not arise).
FLOAT64_TIE_EPS = 1e-12


def run_float64(repo: str, setting: str, crop: int, batch: int, seed: int, with_grads: bool):
    """The parity report with both sides in float64; every check row judged at FLOAT64_TOL.

    ``jax_enable_x64`` is on while it runs and as before afterwards (a process that goes on,
    such as a test session, keeps its float32 defaults and random draws)."""
    with jax.enable_x64(True):
        return _run_float64(repo, setting, crop, batch, seed, with_grads)


def _run_float64(repo: str, setting: str, crop: int, batch: int, seed: int, with_grads: bool):
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    num_classes = num_classes_of(setting)
    net, _ = build_reference(repo, setting, seed, num_classes)
    model, variables = converted_model(net, setting, num_classes, "float64")
    inputs = make_inputs(setting, batch, crop, num_classes, seed)
    inputs = {k: v.astype(np.float64) for k, v in inputs.items()}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # tensors the reference creates without a dtype
    timings: dict = {}
    try:
        net.double()
        rows, inputs = runner._test_rows(net, model, variables, inputs, setting, timings)
        ref = runner._reference_training(
            net, setting, inputs, num_classes, with_grads, FLOAT64_TIE_EPS, timings
        )
        ref_ties = ref["ties"][0] | ref["ties"][1]
        aux, grads = runner._jax_training(
            model, variables, inputs, ref_ties, setting, num_classes, with_grads,
            FLOAT64_TIE_EPS, timings,
        )  # fmt: skip
        train_rows = runner._training_rows(aux, ref)
        rows += train_rows
        max_onehot = reference_module(repo, setting).max_onehot
        max_code_diff = max(r.max_abs for r in train_rows[:2])
        loss_rows, tie_free, _ = runner._loss_rows(
            aux, ref, max_onehot, FLOAT64_TIE_EPS, max_code_diff
        )
        rows += loss_rows
        if with_grads:
            rows += runner._grad_rows(grads, ref, tie_free, timings)[0]
    finally:
        torch.set_default_dtype(previous)
    for row in rows:
        if row.kind == INFO and row.name.startswith("grad/") and "tie-free" in row.name:
            row.kind = CHECK  # no near ties in float64: the tie-free term's gradient is judged
            row.note = row.note.replace("; diagnostic, not in the pass rule", "")
        if row.kind == CHECK and np.isfinite(row.tol) and row.tol > 0:
            row.tol = FLOAT64_TOL
        add_note(row, "both sides float64")
    meta = dict(setting=setting, crop=crop, batch=batch, seed=seed,
                tie_eps=FLOAT64_TIE_EPS, dtype="float64")  # fmt: skip
    return make_report(meta, rows, timings)
