"""The comparison itself: builds both networks on the same random input, runs every mode of
each and collects the rows of the report (``run``)."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from slr_jax import convert
from slr_jax import infer as infer_lib
from slr_jax.parity.grads import (
    _frozen_grad_norm,
    _trainable_leaves_row,
    _worst_grad_row,
    _worst_leaf,
    rounding_tolerances,
)
from slr_jax.parity.inputs import add_labels, make_inputs
from slr_jax.parity.jax_side import _jax_train_fn, converted_model, loss_config
from slr_jax.parity.kinks import float64_relu_signs, forced_sign_gradients
from slr_jax.parity.reference import (
    _nchw,
    _nhwc,
    build_reference,
    reference_module,
    reference_multiscale_predict,
)
from slr_jax.parity.reference_train import (
    _torch_backward_grads,
    _torch_float64_grads,
    _torch_grads,
    _torch_masked_code_consistency,
    _torch_train,
    trainable_parameters,
)
from slr_jax.parity.report import (
    INFO,
    ROUNDING_LIMITED,
    TIE_LIMITED,
    Row,
    add_note,
    compare,
    make_report,
)
from slr_jax.parity.settings import (
    DEFAULT_SCALES,
    LOSS_COEFF,
    LOSS_TOL,
    OUTPUT_TOL,
    TIE_EPS,
    num_classes_of,
)
from slr_jax.parity.ties import near_tie_mask

C_CODE = LOSS_COEFF[2]


def run(
    repo: str,
    setting: str,
    crop: int,
    batch: int,
    seed: int,
    with_grads: bool = True,
    tie_eps: float = TIE_EPS,
    dtype: str = "float32",
    scales: tuple[float, ...] = DEFAULT_SCALES,
) -> dict:
    """Builds both networks, compares them and returns the report (see ``make_report``).

    ``dtype='bfloat16'`` computes the JAX side in bfloat16 (``model.dtype``) against the
    float32 reference: a measurement of mixed precision's error, every row ``info``.
    ``scales``: those of the multi-scale inference rows (empty: no such rows)."""
    import torch

    if crop < 33 or batch < 1:
        raise ValueError(f"need crop >= 33 and batch >= 1, got crop={crop} batch={batch}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    jax.config.update("jax_default_matmul_precision", "highest")
    num_classes = num_classes_of(setting)
    net, _ = build_reference(repo, setting, seed, num_classes)
    max_onehot = reference_module(repo, setting).max_onehot
    model, variables = converted_model(net, setting, num_classes, dtype)
    inputs = make_inputs(setting, batch, crop, num_classes, seed)
    timings = {}
    rows, inputs = _test_rows(net, model, variables, inputs, setting, timings)
    if scales:
        rows += _multiscale_rows(net, model, variables, inputs, setting, crop, scales, timings)
    ref = _reference_training(net, setting, inputs, num_classes, with_grads, tie_eps, timings)
    ref_ties = ref["ties"][0] | ref["ties"][1]
    aux, grads = _jax_training(
        model, variables, inputs, ref_ties, setting, num_classes, with_grads, tie_eps, timings
    )
    train_rows = _training_rows(aux, ref)
    max_code_diff = max(r.max_abs for r in train_rows[:2])  # the codes of both views
    rows += train_rows
    loss_rows, ref_tie_free, n_ties = _loss_rows(aux, ref, max_onehot, tie_eps, max_code_diff)
    rows += loss_rows
    limited = [r for r in rows if r.name in ("loss/code_consistency", "loss/total")]
    checks = loss_rows[-2:]  # the total without the code term, the tie-free code term
    if with_grads:
        grad_rows, (total_row, wo_row) = _grad_rows(grads, ref, ref_tie_free, timings)
        f64_rows, exact_row, grads64 = _float64_rows(
            net, setting, inputs, num_classes, grads, ref, timings
        )
        if not exact_row.within_tol:
            f64_rows.insert(1, _kink_row(model, variables, inputs, setting, num_classes,
                                         ref, grads64, exact_row, timings))  # fmt: skip
        if not wo_row.within_tol and exact_row.passed:
            wo_row.kind = ROUNDING_LIMITED
            add_note(wo_row, "float32 rounding: JAX is as close to the float64 reference as "
                     "PyTorch" if exact_row.within_tol else "float32 rounding across ReLU "
                     "kinks (see the float64 rows)")  # fmt: skip
        rows += grad_rows + f64_rows
        limited.append(total_row)
        checks += [wo_row, exact_row]
    _explain_ties(limited, checks, n_ties)
    if dtype != "float32":
        for row in rows:
            row.kind = INFO
            add_note(row, f"JAX in {dtype} (measurement)")
    meta = dict(setting=setting, crop=crop, batch=batch, seed=seed, tie_eps=tie_eps, dtype=dtype)
    return make_report(meta, rows, timings)


def _test_rows(net, model, variables, inputs: dict, setting: str, timings: dict):
    """Single-scale and two-view test modes of both networks: ``(rows, inputs)``, the inputs
    with image labels from our two-view masks (``add_labels``)."""
    import torch

    x = _nchw(inputs["image"])
    t0 = time.time()
    with torch.no_grad():
        ref_cls, ref_masks = net(x, single_scale=True)
        ref_cls2, ref_masks2 = net(x)
    timings["torch_test_s"] = time.time() - t0
    t0 = time.time()
    test = jax.jit(model.apply, static_argnames="mode")
    ours = test(variables, inputs["image"], mode="test")
    ours2 = test(variables, inputs["image"], mode="test_two_view")
    timings["jax_test_compile_and_run_s"] = time.time() - t0
    peaks = np.max(np.asarray(ours2["masks"]), axis=(1, 2))[:, 1:]
    inputs = add_labels(inputs, setting, peaks)
    rows = []
    if setting != "semi_wo_cls":  # that variant's class scores are constant ones
        rows.append(compare("test/cls", ours["cls"], ref_cls.numpy(), OUTPUT_TOL))
        rows.append(compare("test_two_view/cls", ours2["cls"], ref_cls2.numpy(), OUTPUT_TOL))
    rows.append(compare("test/masks", ours["masks"], _nhwc(ref_masks), OUTPUT_TOL))
    rows.append(compare("test_two_view/masks", ours2["masks"], _nhwc(ref_masks2), OUTPUT_TOL))
    return rows, inputs


def _multiscale_rows(net, model, variables, inputs, setting, crop, scales, timings) -> list[Row]:
    """Multi-scale + flip inference of one (non-square) photo, as tools/infer_voc.py."""
    photo = np.round(255 * inputs["raw_image"][0, :, : max(33, crop * 3 // 4)])
    photo = photo.astype(np.uint8)
    t0 = time.time()
    ref_ms_cls, ref_ms_masks = reference_multiscale_predict(net, photo, scales)
    timings["torch_multiscale_s"] = time.time() - t0
    t0 = time.time()
    test_cfg = common.get_config().test
    test_cfg.scales = tuple(scales)
    ms_cls, ms_masks = infer_lib.multiscale_predict(model.apply, variables, photo, test_cfg)
    timings["jax_multiscale_compile_and_run_s"] = time.time() - t0
    note = f"{photo.shape[0]}x{photo.shape[1]} photo, scales {tuple(scales)} + flips"
    rows = []
    if setting != "semi_wo_cls":
        rows.append(compare("infer/multiscale cls", ms_cls, ref_ms_cls, OUTPUT_TOL, note))
    rows.append(compare("infer/multiscale masks (averaged, before CRF)", ms_masks,
                        ref_ms_masks, OUTPUT_TOL, note))  # fmt: skip
    return rows


def _reference_training(net, setting, inputs, num_classes, with_grads, tie_eps, timings) -> dict:
    """The reference's training forward (``_torch_train``'s dict) with, besides: its codes in
    our layout (``codes_nhwc``, ``codes2_nhwc``), their near ties (``ties``), its trainable
    parameters (``named_params``) and, ``with_grads``, the gradients of the total without the
    code term (``grads_wo_code``) and of the total (``grads_total``)."""
    t0 = time.time()
    ref = _torch_train(net, setting, inputs, num_classes)
    timings["torch_train_forward_s"] = time.time() - t0
    ref["codes_nhwc"], ref["codes2_nhwc"] = _nhwc(ref["codes"]), _nhwc(ref["codes2"])
    ref["ties"] = tuple(near_tie_mask(c, tie_eps) for c in (ref["codes_nhwc"], ref["codes2_nhwc"]))
    ref["named_params"] = named_params = trainable_parameters(net)
    terms = ref["terms"]
    if with_grads:
        t0 = time.time()
        ref["grads_wo_code"] = _torch_grads(
            terms["total"] - C_CODE * terms["code_consistency"], named_params
        )
        ref["grads_total"] = _torch_backward_grads(net, terms["total"], named_params)
        timings["torch_two_backward_s"] = time.time() - t0
    return ref


def _jax_training(
    model, variables, inputs, ref_ties, setting, num_classes, with_grads, tie_eps, timings
):
    """Our training forward (and backward), compiled then run: ``(aux, grads)``."""
    loss_cfg = loss_config(setting, num_classes)
    batch_j = {k: jnp.asarray(v) for k, v in inputs.items()}
    args = (variables["params"], variables["batch_stats"], batch_j, jnp.asarray(ref_ties))
    t0 = time.time()
    train = jax.jit(_jax_train_fn(model, loss_cfg, setting, with_grads, tie_eps))
    compiled = train.lower(*args).compile()
    timings["jax_train_compile_s"] = time.time() - t0
    t0 = time.time()
    aux, grads = jax.block_until_ready(compiled(*args))
    timings["jax_train_run_s"] = time.time() - t0
    return aux, grads


def _training_rows(aux: dict, ref: dict) -> list[Row]:
    """Codes (both views, first), dictionary and pseudo labels of the training forward."""
    differing = int(np.sum(np.asarray(aux["pseudo"]) != ref["pseudo"]))
    seg_images = np.round(ref["seg_per_image"], 5).tolist()
    return [
        compare("train/codes", aux["codes"], ref["codes_nhwc"], OUTPUT_TOL),
        compare("train/codes2 (resized to view 1)", aux["codes2"], ref["codes2_nhwc"], OUTPUT_TOL),
        compare("train/dictionary", aux["dictionary"], ref["dictionary"], OUTPUT_TOL),
        compare("train/pseudo_label", aux["pseudo"], ref["pseudo"], OUTPUT_TOL,
                f"{differing} differing entries; reference seg loss per image {seg_images}"),
    ]  # fmt: skip


def _loss_rows(aux: dict, ref: dict, max_onehot, tie_eps: float, max_code_diff: float):
    """Every loss term, the total without the code term, then the code term without near
    ties (last):
    ``(rows, the reference's tie-free term, number of tie pixels)``. ``max_code_diff``: the
    largest codes difference of the two frameworks (for the note)."""
    terms, ref_terms = aux["terms"], ref["terms"]
    out = [
        compare(f"loss/{name}", terms[name], ref_value.detach().numpy(), LOSS_TOL)
        for name, ref_value in ref_terms.items()
    ]
    ties = np.asarray(aux["ties"])
    keep = ~ties
    ref_tie_free = _torch_masked_code_consistency(max_onehot, ref["codes"], ref["codes2"], keep)
    hooked = _torch_masked_code_consistency(
        max_onehot, ref["codes"], ref["codes2"], np.ones_like(keep)
    )
    hook_gap = abs(float(hooked.detach()) - float(ref_terms["code_consistency"].detach()))
    without_code = lambda t: t["total"] - C_CODE * t["code_consistency"]
    out.append(compare(f"loss/total-{C_CODE:g}*code_consistency", without_code(terms),
                       without_code(ref_terms).detach().numpy(), LOSS_TOL))  # fmt: skip
    own = [int(np.sum(t)) for t in aux["own_ties"]]
    theirs = [int(np.sum(t)) for t in ref["ties"]]
    n_ties = int(np.sum(ties))
    tie_note = (
        f"{n_ties} of {ties.size} pixels excluded: top-2 code gap < {tie_eps:g} (view 1, view 2)"
        f" JAX {own}, PyTorch {theirs}; flips need gap < 2 max|codes diff| = "
        f"{2 * max_code_diff:.1e}; the hooked reference codes give the reference's term "
        f"to {hook_gap:.1e}"
    )
    out.append(compare(
        "loss/code_consistency (tie-free)", terms["code_consistency_tie_free"],
        ref_tie_free.detach().numpy(), LOSS_TOL, tie_note,
    ))  # fmt: skip
    return out, ref_tie_free, n_ties


def _grad_rows(grads, ref: dict, ref_tie_free, timings: dict):
    """Gradients of the total, of the total without the code term and of the tie-free code
    term, and the trainable leaves: ``(rows, (total row, without-code row))``."""
    t0 = time.time()
    ref_grads_tie_free = _torch_grads(C_CODE * ref_tie_free, ref["named_params"])
    timings["torch_tie_free_backward_s"] = time.time() - t0
    g_total, g_wo_code, g_tie_free = grads
    c = f"{C_CODE:g}*code_consistency"
    total_row = _worst_grad_row("grad/total", g_total, ref["grads_total"])
    ours_wo_code = convert.flax_to_torch({"params": g_wo_code})
    wo_row = _worst_leaf(f"grad/total-{c}", ours_wo_code, ref["grads_wo_code"])
    tf_row = _worst_grad_row(f"grad/{c} (tie-free)", g_tie_free, ref_grads_tie_free)
    # Not part of the pass rule: this term's gradients are ~1e-3 of the total's, and on
    # such small leaves float32 accumulation alone moves them by ~1e-4 (docs/parity.md).
    tf_row.kind = INFO
    tf_row.note += "; diagnostic, not in the pass rule"
    leaves_row = _trainable_leaves_row(g_total, ref["grads_total"])
    return [total_row, wo_row, tf_row, leaves_row], (total_row, wo_row)


def _float64_rows(net, setting, inputs, num_classes, grads, ref: dict, timings: dict):
    """Float32 rounding: both float32 gradients (without the code term) against the reference
    run in float64 (``net`` is converted: call it last), and the norm of the frozen leaves'
    gradients: ``(rows, the JAX-vs-float64 row)``."""
    t0 = time.time()
    grads64, pseudo64 = _torch_float64_grads(net, setting, inputs, num_classes, C_CODE)
    timings["torch_float64_train_and_backward_s"] = time.time() - t0
    c = f"{C_CODE:g}*code_consistency"
    g_total, g_wo_code, _ = grads
    ours_wo_code = convert.flax_to_torch({"params": g_wo_code})
    exact_row = _worst_leaf(f"grad/total-{c} vs PyTorch float64", ours_wo_code, grads64,
                            rounding_tolerances(ref["grads_wo_code"], grads64))  # fmt: skip
    pseudo_flips = int(np.sum(pseudo64 != ref["pseudo"]))
    exact_row.note = (
        "JAX float32 vs the reference in float64, per leaf within max(1e-4, 2 x PyTorch "
        f"float32's own error); {exact_row.note}; pseudo labels float64 vs float32: "
        f"{pseudo_flips} differing entries"
    )
    floor_row = _worst_leaf(
        f"grad/total-{c}: PyTorch float32 vs float64", ref["grads_wo_code"], grads64
    )
    floor_row.kind = INFO
    floor_row.note += "; the reference's own float32 rounding"
    frozen_row = Row("grad/frozen_leaves_norm (JAX, ignored by optimiser)",
                     _frozen_grad_norm(g_total), 0.0, np.inf,
                     "frozen parameters get zero updates in slr_jax.optim", INFO)  # fmt: skip
    return [exact_row, floor_row, frozen_row], exact_row, grads64


def _kink_row(model, variables, inputs, setting, num_classes, ref, grads64, exact_row, timings):
    """Whether ReLU kinks explain ``exact_row``'s excess (module ``kinks``): our float32
    gradient with float64's ReLU signs against the float64 reference. When it passes,
    ``exact_row`` becomes rounding-limited."""
    t0 = time.time()
    signs = float64_relu_signs(model, variables, inputs)
    forced, flips, worst = forced_sign_gradients(
        model, variables, inputs, signs, loss_config(setting, num_classes), setting
    )
    timings["jax_relu_kink_check_s"] = time.time() - t0
    c = f"{C_CODE:g}*code_consistency"
    row = _worst_leaf(f"grad/total-{c} with float64's ReLU signs vs PyTorch float64", forced,
                      grads64, rounding_tolerances(ref["grads_wo_code"], grads64))  # fmt: skip
    total = sum(int(s.size) for s in signs)
    add_note(row, f"{flips} of {total} ReLU inputs of JAX float32 on the other side of zero "
                  f"than in float64, all within {worst:.1e} of it")  # fmt: skip
    if row.within_tol:
        exact_row.kind = ROUNDING_LIMITED
        add_note(exact_row, "ReLU kinks: with float64's ReLU signs it passes (next row)")
    return row


def _explain_ties(limited: list[Row], checks: list[Row], n_ties: int) -> None:
    """Near ties explain the raw code term and the total's gradient (``limited``) only when
    ties exist and everything that excludes them (``checks``) passes."""
    explained = n_ties > 0 and all(r.passed for r in checks)
    for row in limited:
        if explained:
            row.kind = TIE_LIMITED
            if not row.within_tol:
                add_note(row, f"argmax near ties ({n_ties} pixels): the tie-free rows pass")
                if any(r.kind == ROUNDING_LIMITED for r in checks):
                    row.note += " (within float32 rounding, see the float64 row)"
