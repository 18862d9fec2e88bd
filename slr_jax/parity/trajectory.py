"""Trajectory parity: the same short training run in slr_jax and in the PyTorch reference.

``python -m slr_jax.parity.trajectory --reference-repo PATH [--setting wsss|semi] [--steps 10]
[--steps-per-epoch 1] [--crop 81] [--batch 2] [--seed 0] [--width 0.25] [--json FILE]``

Both frameworks start from the same weights (the reference's ``Net`` with random weights as in
``slr_jax.parity``, converted with ``slr_jax.convert``), see the same fixed NumPy batches
(random smooth images, labels from the initial network's predictions, as ``parity``) and the
same dropout and stochastic-gate masks, and take ``steps`` optimiser steps:

- slr_jax: the state of ``train.create_train_state`` (``optim.make_optimizer`` on the schedule
  of ``train.plan_steps``) and the jit-compiled ``train.train_step``, configured by
  ``configs/voc.py`` (wsss) or ``configs/voc_semi.py`` (semi). Each step's masks are read from a
  forward with the step's key, which reports them (``slr_jax.models.noise``).
- the reference: those masks replace its own draws (``F.dropout``/``F.dropout2d`` as called by
  its ``Dropout``/``Dropout2d`` modules and its stochastic gate ``sg``), and the optimiser and
  schedule are built as ``tools/train_voc_wss.py``/``tools/train_voc_semi.py`` build them: the
  four ``parameter_groups()`` at lr x1/x2/x10/x20 with weight decay on the two weight groups,
  ``SGD(momentum=0.9, nesterov=True)``, ``CosineAnnealingLR`` stepped after each step once
  ``epoch > pretrain_epochs``, the seg loss added from then on, ``model.train()`` before every
  step (head BatchNorms update their running statistics; backbone and ASPP ones are frozen).
  lr, weight decay, epochs and loss coefficients come from its experiment YAML.

With ``steps_per_epoch=1`` the seg loss and the cosine decay start at step
``(pretrain_epochs + 1) * steps_per_epoch = 6``, inside a 10-step run. ``width < 1`` builds the
reference with every channel count scaled like slr_jax's ``model.width`` (its counts are
literals in its code; see :func:`scaled_reference_channels`).

The reference runs in float32 and in float64; slr_jax in float32, and also in float64 where
its model offers that dtype. Rows (``traj/...``): every loss term and the lr at every step
(the worst step is the row, every step's error is in the note); after the last step the change
(final - initial) of every parameter and BatchNorm running statistic (the worst leaf is the
row); frozen leaves unchanged. Tolerances (docs/parity.md, "Trajectory"): slr_jax float32 is
judged against the float64 reference within max(base, 2 x the float32 reference's own error
at that step or leaf), base 1e-5 for losses and 1e-4 for changes, because float32 rounding
compounds over steps; slr_jax float64 against the float64 reference within ``TOL64``. A
float32 row over its tolerance is ``rounding-limited`` (not failing) only when every float64
row passes: float32 rounding can tip a discrete choice (an arg-max, a pseudo-label threshold)
in one float32 run and not in the other, after which the two float32 runs drift apart.

Exit status 1 when a row fails. Needs ``torch`` and PyYAML (CPU is enough).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import json
import os
import sys
import time
from collections.abc import Collection, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from slr_jax import constants, convert
from slr_jax import train as train_lib
from slr_jax.losses import make_objective
from slr_jax.models import build_model, variable_shapes
from slr_jax.models.backbone import scale_channels
from slr_jax.models.noise import NOISE
from slr_jax.parity.inputs import add_labels, make_inputs
from slr_jax.parity.reference import _nchw, build_reference
from slr_jax.parity.report import ROUNDING_LIMITED, Row, compare, format_table, make_report

NUM_CLASSES = 21
LOSS_TOL = 1e-5
CHANGE_TOL = 1e-4
LR_TOL = 1e-6  # the float32 schedule against PyTorch's float64 lr
TOL64 = 1e-10  # slr_jax float64 against the float64 reference (measured <= 1e-12)
ROUNDING_FACTOR = 2.0  # as parity.rounding_tolerances
TERMS = ("cls", "seg", "mask_consistency", "code_consistency", "seg_labeled", "total")
# setting -> (slr_jax config module, the reference's experiment YAML)
SETTINGS = {
    "wsss": ("configs.voc", "experiments/slrnet_voc_wss_v100x2.yaml"),
    "semi": ("configs.voc_semi", "experiments/slrnet_voc_semi_w_cls_v100x2.yaml"),
}
# The reference trainers' lr multipliers for the resnet38 backbone, in parameter_groups() order.
REFERENCE_LR_MULTIPLIERS = (1.0, 2.0, 10.0, 20.0)
# slr_jax noise paths (models/noise.py) -> the reference's module names. Backbone b6/b7 are
# handled by rule: one Flax channel dropout serves the reference's dropout_2b1 and dropout_2b2.
NOISE_MODULES = {
    ("gate",): "sg",
    ("aspp", "Dropout_0", "keep"): "aspp.dropout",
    ("last_conv", "Dropout_0", "keep"): "last_conv.3",
    ("last_conv", "Dropout_1", "keep"): "last_conv.7",
    ("aux_head", "Dropout_0", "keep"): "aux_head.3",
}


# ----------------------------------------------------------------------- configuration
@contextlib.contextmanager
def scaled_reference_channels(width: float, fixed: Collection[int]) -> Iterator[None]:
    """While active, PyTorch ``Conv2d``, ``BatchNorm`` and ``Linear`` layers are built with each
    channel count ``c`` not in ``fixed`` (image channels, class counts) replaced by
    ``scale_channels(c, width)``: the reference's architecture at slr_jax's ``model.width``.
    The reference writes its channel counts as literals (256, 48, 304 = 256 + 48, ...), so this
    needs widths at which the scaled sums stay sums (1/4 and 1/8 do); a width that breaks one
    fails loudly at the first forward or at conversion (shape mismatch)."""
    import torch

    if width == 1.0:
        yield
        return
    scale = lambda c: c if c in fixed else scale_channels(c, width)
    nn = torch.nn
    inits = {
        nn.Conv2d: nn.Conv2d.__init__,
        nn.Linear: nn.Linear.__init__,
        nn.modules.batchnorm._BatchNorm: nn.modules.batchnorm._BatchNorm.__init__,
    }
    conv = lambda self, i, o, *a, **k: inits[nn.Conv2d](self, scale(i), scale(o), *a, **k)
    linear = lambda self, i, o, *a, **k: inits[nn.Linear](self, scale(i), scale(o), *a, **k)
    norm = lambda self, c, *a, **k: inits[nn.modules.batchnorm._BatchNorm](self, scale(c), *a, **k)
    patched = {nn.Conv2d: conv, nn.Linear: linear, nn.modules.batchnorm._BatchNorm: norm}
    try:
        for cls, init in patched.items():
            cls.__init__ = init
        yield
    finally:
        for cls, init in inits.items():
            cls.__init__ = init


def reference_hparams(repo: str, setting: str) -> dict:
    """lr, weight decay, epochs, pretrain epochs and loss coefficients of the reference's
    experiment YAML for ``setting``."""
    import yaml

    with open(os.path.join(repo, SETTINGS[setting][1])) as f:
        train = yaml.safe_load(f)["train"]
    keys = ("lr", "weight_decay", "num_epochs", "pretrain_epochs", "loss_coeff")
    return {k: train[k] for k in keys}


def jax_config(setting: str, width: float, dtype: str, batch: int):
    """The slr_jax config of ``setting`` at ``width``, ``dtype`` and global batch ``batch``."""
    config = importlib.import_module(SETTINGS[setting][0]).get_config()
    config.model.width = float(width)
    config.model.dtype = dtype
    config.train.batch_size = int(batch)
    config.train.total_steps = 0
    config.model.bn_stat_groups = 1  # the reference runs here as one process on one device
    return config


def config_row(config, hparams: Mapping) -> Row:
    """Whether slr_jax's config has the reference's optimiser and loss hyperparameters; max_abs
    and rel count the differing ones."""
    t = config.train
    ours = dict(
        lr=t.lr,
        weight_decay=t.weight_decay,
        num_epochs=t.num_epochs,
        pretrain_epochs=t.pretrain_epochs,
        loss_coeff=tuple(config.loss.loss_coeff),
        momentum=t.momentum,
        nesterov=t.nesterov,
        lr_multipliers=tuple(t.lr_multipliers),
    )
    theirs = dict(
        hparams,
        loss_coeff=tuple(hparams["loss_coeff"]),
        momentum=0.9,
        nesterov=True,
        lr_multipliers=REFERENCE_LR_MULTIPLIERS,
    )
    differ = sorted(k for k in theirs if not np.allclose(ours[k], theirs[k], rtol=1e-12))
    note = f"differing: {differ}" if differ else "lr, weight decay, momentum, Nesterov, "
    note += "" if differ else "multipliers, epochs, pretrain epochs, loss coefficients"
    return Row(
        "traj/config (slr_jax config vs reference trainer)", len(differ), len(differ), 0.0, note
    )


# ------------------------------------------------------------------------------ inputs
def make_batches(model, variables, setting: str, steps: int, batch: int, crop: int, seed: int):
    """``steps`` fixed NumPy batches (``image``, ``raw_image``, ``labels``, ``mask``,
    ``is_labeled``), images from ``parity.make_inputs`` and labels from the initial network's
    predictions (``parity.add_labels``), so that pseudo labels have structure."""
    test = jax.jit(functools.partial(model.apply, mode="test_two_view"))
    batches = []
    for k in range(steps):
        inputs = make_inputs(setting, batch, crop, NUM_CLASSES, seed + 1 + k)
        peaks = np.max(np.asarray(test(variables, inputs["image"])["masks"]), axis=(1, 2))
        batches.append(add_labels(inputs, setting, peaks[:, 1:]))
    return batches


# ---------------------------------------------------------------------------- slr_jax
def _step_noise(state, batch):
    """The masks ``train_step(state, batch)`` draws: a training forward with its key."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    _, reported = state.apply_fn(
        variables,
        batch["image"],
        mode="train",
        train=True,
        rngs={"dropout": train_lib.dropout_key(state)},
        mutable=["batch_stats", NOISE],
    )
    return reported[NOISE]


def run_jax(config, variables: Mapping, batches, steps_per_epoch: int, seed: int) -> dict:
    """slr_jax's training run: ``metrics`` and ``noise`` per step, final ``variables``."""
    model = build_model(config.model)
    plan = train_lib.plan_steps(config.train, steps_per_epoch * int(config.train.batch_size))
    lr_fn = plan.learning_rate_fn(config.train.lr)
    state = train_lib.create_train_state(
        config, model, lr_fn, jax.random.key(seed), init_checkpoint=""
    )
    params = variables["params"]
    state = state.replace(
        params=params, batch_stats=variables["batch_stats"], opt_state=state.tx.init(params)
    )
    step = jax.jit(
        functools.partial(
            train_lib.train_step,
            objective=make_objective(config),
            pretrain_steps=plan.pretrain_steps,
            learning_rate_fn=lr_fn,
        )
    )
    noise_fn = jax.jit(_step_noise)
    metrics, noise = [], []
    for batch in batches:
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        noise.append(jax.device_get(noise_fn(state, batch)))
        state, step_metrics = step(state, batch)
        metrics.append({k: float(v) for k, v in jax.device_get(step_metrics).items()})
    final = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    return {"metrics": metrics, "noise": noise, "variables": final}


def reference_noise(noise: Mapping) -> dict[str, list[np.ndarray]]:
    """One step's reported masks (``models/noise.py``) as the reference's per-module lists of
    keep masks in NCHW, in call order (view 1 then view 2)."""
    from flax import traverse_util

    out: dict[str, list[np.ndarray]] = {}
    for path, masks in traverse_util.flatten_dict(dict(noise)).items():
        masks = [np.transpose(np.asarray(m), (0, 3, 1, 2)) for m in masks]
        if path in NOISE_MODULES:
            out[NOISE_MODULES[path]] = masks
        elif path[0] == "backbone" and path[2:] == ("Dropout_0", "keep"):
            # Per view: after bn_branch2b1, then after bn_branch2b2.
            out[f"backbone.{path[1]}.dropout_2b1"] = masks[0::2]
            out[f"backbone.{path[1]}.dropout_2b2"] = masks[1::2]
        else:
            raise ValueError(f"no reference module for the noise of {'/'.join(path)}")
    return out


# -------------------------------------------------------------------------- reference
@contextlib.contextmanager
def injected_noise(net, masks: Mapping[str, list[np.ndarray]]) -> Iterator[None]:
    """While active, each ``F.dropout``/``F.dropout2d`` call made inside the module named by a
    key of ``masks`` takes that module's next keep mask instead of drawing one, with PyTorch's
    own arithmetic (``input * (keep / (1 - p))``). Every mask must be used exactly once."""
    import torch
    import torch.nn.functional as F

    queues = {name: list(m) for name, m in masks.items()}
    active: list[str | None] = [None]

    def dropout(x, p=0.5, training=True, inplace=False):
        if active[0] is None or not queues.get(active[0]):
            raise RuntimeError(f"a dropout call without an injected mask (in {active[0]!r})")
        noise = torch.from_numpy(np.array(queues[active[0]].pop(0))).to(x.dtype)
        return x * noise.div_(1 - p)

    hooks = []
    for name in queues:
        module = net.get_submodule(name)
        hooks.append(
            module.register_forward_pre_hook(lambda m, a, n=name: active.__setitem__(0, n))
        )
        hooks.append(module.register_forward_hook(lambda m, a, o: active.__setitem__(0, None)))
    saved = F.dropout, F.dropout2d
    F.dropout = F.dropout2d = dropout
    try:
        yield
    finally:
        F.dropout, F.dropout2d = saved
        for hook in hooks:
            hook.remove()
    unused = {n: len(q) for n, q in queues.items() if q}
    if unused:
        raise RuntimeError(f"injected masks left unused: {unused}")


def reference_optimizer(net, hparams: Mapping, steps_per_epoch: int):
    """``(SGD, CosineAnnealingLR)`` as the reference's trainers build them."""
    import torch

    lr, wd = float(hparams["lr"]), float(hparams["weight_decay"])
    decays = (wd, 0.0, wd, 0.0)
    groups = [
        {"params": params, "lr": m * lr, "weight_decay": d}
        for params, m, d in zip(net.parameter_groups(), REFERENCE_LR_MULTIPLIERS, decays)
    ]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd, nesterov=True)
    decay_steps = (int(hparams["num_epochs"]) - int(hparams["pretrain_epochs"])) * steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, decay_steps, eta_min=0.0)
    return optimizer, schedule


def reference_losses(net, setting: str, batch: Mapping, loss_coeff, seg_on: bool) -> dict:
    """The reference's training forward and its trainer's loss terms (batch means) and total,
    in the dtype of ``net``. ``setting``: ``wsss`` (tools/train_voc_wss.py), ``semi`` or
    ``semi_wo_cls`` (both tools/train_voc_semi.py: the mean seg loss of pixel-labelled images
    always on), or ``supervised`` (:func:`reference_supervised_losses`)."""
    import torch

    if setting == "supervised":
        return reference_supervised_losses(net, batch, SUPERVISED_AUX_WEIGHT)
    dtype = next(net.parameters()).dtype
    nchw = lambda a: _nchw(a).to(dtype)
    x, raw = nchw(batch["image"]), nchw(batch["raw_image"])
    labels = torch.from_numpy(batch["labels"]).to(dtype)
    semi = setting in ("semi", "semi_wo_cls")
    if semi:
        indicators = torch.from_numpy(batch["is_labeled"])
        classes = torch.arange(net.num_classes)[None, :, None, None]
        if setting == "semi_wo_cls":  # its Net counts background in num_classes + 1
            classes = classes[:, :-1]
        seg_labels = torch.eq(torch.from_numpy(batch["mask"]).long()[:, None], classes).to(dtype)
        cls_l, seg_l, reg_l, code_l, _, _ = net(x, raw, labels, seg_labels, indicators)
    else:
        cls_l, seg_l, reg_l, code_l, _, _ = net(x, raw, labels)
    c_cls, c_mask, c_code, c_seg = (float(c) for c in loss_coeff)
    terms = {
        "cls": cls_l.mean(),
        "seg": seg_l.mean(),
        "mask_consistency": reg_l.mean(),
        "code_consistency": code_l.mean(),
    }
    total = (
        c_cls * terms["cls"]
        + c_mask * terms["mask_consistency"]
        + c_code * terms["code_consistency"]
    )
    if semi:
        # A batch without a pixel-labelled image: the reference's trainer takes the mean of an
        # empty selection (NaN, which then reaches every weight); slr_jax's loss counts the
        # term as 0, and so does this loop (the demos' streams hold such batches).
        labelled = seg_l[indicators]
        terms["seg_labeled"] = labelled.mean() if labelled.numel() else seg_l.sum() * 0
        total = total + c_seg * terms["seg_labeled"]
    if seg_on:
        total = total + c_seg * terms["seg"]
    terms["total"] = total
    return terms


# The supervised-only baseline's aux-head weight (slr_jax's loss.aux_weight, the reference's
# 0.4 of its seg losses).
SUPERVISED_AUX_WEIGHT = 0.4


def reference_supervised_losses(net, batch: Mapping, aux_weight: float) -> dict:
    """The supervised-only baseline on the reference's network (the reference has no such
    trainer): its two-view forward (``net(x)``, which stops before its losses), the logits of
    view 1 from ``last_conv`` and of ``aux_head`` captured, and PyTorch's cross-entropy with
    ignore 255 against ``mask`` after an align-corners upsampling to the mask's size:
    ``seg + aux_weight * aux`` (slr_jax's ``losses.supervised_objective``)."""
    import torch
    import torch.nn.functional as F

    dtype = next(net.parameters()).dtype
    captured: dict = {}
    keep_first = lambda name: lambda m, a, out: captured.setdefault(name, out)
    hooks = [
        net.last_conv.register_forward_hook(keep_first("seg")),
        net.aux_head.register_forward_hook(keep_first("aux")),
    ]
    try:
        net(_nchw(batch["image"]).to(dtype))
    finally:
        for hook in hooks:
            hook.remove()
    mask = torch.from_numpy(np.asarray(batch["mask"])).long()

    def ce(logits):
        logits = F.interpolate(logits, mask.shape[-2:], mode="bilinear", align_corners=True)
        return F.cross_entropy(logits, mask, ignore_index=255)

    terms = {"seg": ce(captured["seg"]), "aux": ce(captured["aux"])}
    terms["total"] = terms["seg"] + aux_weight * terms["aux"]
    return terms


def run_reference(
    net,
    setting: str,
    hparams: Mapping,
    batches,
    masks,
    steps_per_epoch: int,
    progress=None,
):
    """The reference's training loop over ``batches``, with the injected ``masks`` (one dict of
    ``reference_noise`` per step) or, for ``masks=None``, the reference's own dropout and gate
    draws: ``terms`` and ``lr`` (base group) per step and the final ``state`` (NumPy state
    dict). ``progress(step, metrics)`` (if given) is called after every step."""
    optimizer, schedule = reference_optimizer(net, hparams, steps_per_epoch)
    pretrain_epochs = int(hparams["pretrain_epochs"])
    history = []
    for k, batch in enumerate(batches):
        seg_on = k // steps_per_epoch > pretrain_epochs
        net.train()
        lr = optimizer.param_groups[0]["lr"]
        noise = contextlib.nullcontext() if masks is None else injected_noise(net, masks[k])
        with noise:
            terms = reference_losses(net, setting, batch, hparams["loss_coeff"], seg_on)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        if seg_on:
            schedule.step()
        history.append(dict({k: float(v.detach()) for k, v in terms.items()}, lr=lr))
        if progress is not None:
            progress(k, history[-1])
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    return {"metrics": history, "state": state}


@contextlib.contextmanager
def torch_float64() -> Iterator[None]:
    """Tensors the reference creates without a dtype are float64 while active."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ------------------------------------------------------------------------- comparison
def _steps(values) -> str:
    return "[" + ", ".join(f"{v:.1e}" for v in values) + "]"


def _term(term: str, run: list[dict]) -> list[float]:
    return [m[term] for m in run]


def _worst(errors: list[float], tols: list[float]) -> int:
    return int(np.argmax(np.asarray(errors) / np.asarray(tols)))


def schedule_rows(ours: list[dict], ref: list[dict], seg_start: int) -> list[Row]:
    """The lr of every step, and whether the seg loss is on at the same steps."""
    lr_row = compare(
        "traj/lr (every step)",
        [m["lr"] for m in ours],
        [m["lr"] for m in ref],
        LR_TOL,
        f"reference lr per step {_steps(m['lr'] for m in ref)}",
    )
    on_ours = np.array([m["seg_weight"] > 0 for m in ours])
    on_ref = np.arange(len(ref)) >= seg_start
    differ = int(np.sum(on_ours != on_ref))
    note = f"seg loss and cosine lr from step {seg_start} (0-based) in both"
    seg_row = Row(
        "traj/seg loss on (steps that differ)",
        differ,
        differ,
        0.0,
        note if not differ else f"differ at {np.flatnonzero(on_ours != on_ref)}",
    )
    return [lr_row, seg_row]


def loss_rows(
    ours: list[dict], ref32: list[dict], ref64: list[dict], label: str, floor: bool = True
) -> list[Row]:
    """One row per loss term: the step where ``ours`` is worst against the float64 reference,
    relative to its tolerance. ``floor``: tolerance max(LOSS_TOL, 2 x the float32 reference's
    own error at that step) (slr_jax float32); else ``TOL64`` (slr_jax float64)."""
    rows = []
    for term in (t for t in TERMS if t in ref64[0]):
        pick = functools.partial(_term, term)
        errs = [compare(term, a, b, 0).rel for a, b in zip(pick(ours), pick(ref64))]
        own = [compare(term, a, b, 0).rel for a, b in zip(pick(ref32), pick(ref64))]
        tols = [max(LOSS_TOL, ROUNDING_FACTOR * e) if floor else TOL64 for e in own]
        k = _worst(errs, tols)
        row = compare(
            f"traj/loss/{term} {label} [step {k}]", pick(ours)[k], pick(ref64)[k], tols[k]
        )
        row.note = f"per step {_steps(errs)}"
        if floor:
            vs32 = [compare(term, a, b, 0).rel for a, b in zip(pick(ours), pick(ref32))]
            row.note += f"; PyTorch float32's own {_steps(own)}; vs PyTorch float32 {_steps(vs32)}"
        rows.append(row)
    return rows


def change_rows(
    init: Mapping,
    ours: Mapping,
    ref32: Mapping,
    ref64: Mapping,
    what: str,
    label: str,
    floor: bool = True,
) -> list[Row]:
    """The leaf whose change (final - initial) in ``ours`` is worst against the float64
    reference's, relative to its tolerance: max(CHANGE_TOL, 2 x the float32 reference's own
    error on that leaf) with ``floor``, else ``TOL64``. Dicts: PyTorch name -> array."""
    worst, worst_score, moved = None, -1.0, 0
    for name, start in init.items():
        start = np.asarray(start, np.float64)
        exact = ref64[name] - start
        own = compare(name, ref32[name] - start, exact, 0).rel
        tol = max(CHANGE_TOL, ROUNDING_FACTOR * own) if floor else TOL64
        row = compare(name, np.asarray(ours[name], np.float64) - start, exact, tol)
        moved += int(np.any(exact != 0))
        if row.rel / tol > worst_score:
            worst, worst_score = row, row.rel / tol
            worst.note = f"PyTorch float32's own error on this leaf {own:.1e}" if floor else ""
    worst.name = f"traj/{what} change {label} [{worst.name}]"
    note = f"worst of {len(init)} leaves ({moved} changed by the reference)"
    worst.note = note + (f"; {worst.note}" if worst.note else "")
    return [worst]


def unchanged_row(init: Mapping, ours: Mapping, ref: Mapping) -> Row:
    """Leaves that training leaves unchanged (frozen parameters and statistics) must be the
    same in both; max_abs and rel count the leaves unchanged on one side only."""
    same = lambda final, name: np.array_equal(np.asarray(final[name]), init[name])
    ours_fixed = {n for n in init if same(ours, n)}
    ref_fixed = {n for n in init if same(ref, n)}
    only = sorted(ours_fixed ^ ref_fixed)
    note = f"{len(ref_fixed)} of {len(init)} leaves unchanged in both (frozen)"
    return Row(
        "traj/unchanged leaves (slr_jax vs reference)",
        len(only),
        len(only),
        0.0,
        note if not only else f"unchanged on one side only: {only}",
    )


def state_rows(
    init: Mapping,
    jax_variables: Mapping,
    ref32: Mapping,
    ref64: Mapping,
    label: str,
    floor: bool = True,
) -> list[Row]:
    """Change rows for parameters and BatchNorm statistics (``init``/``ref*``: PyTorch state
    dicts as NumPy; ``jax_variables``: Flax variables)."""
    rows = []
    for collection, what in (("params", "parameter"), ("batch_stats", "BatchNorm statistic")):
        start = convert.flax_to_torch({collection: init[collection]})
        ours = convert.flax_to_torch({collection: jax_variables[collection]})
        rows += change_rows(start, ours, ref32, ref64, what, label, floor)
    return rows


# ------------------------------------------------------------------------------ the run
def jax_float64_available() -> bool:
    """Whether slr_jax's model offers ``model.dtype='float64'``."""
    return "float64" in getattr(constants, "COMPUTE_DTYPES", ())


def _build(repo: str, setting: str, seed: int, width: float, config):
    """The reference ``Net`` (random weights, ``width``) and the same weights as slr_jax
    variables (NumPy)."""
    with scaled_reference_channels(width, {3, NUM_CLASSES - 1, NUM_CLASSES}):
        net, _ = build_reference(repo, setting, seed, NUM_CLASSES)
    model = build_model(config.model)
    variables = convert.convert_checkpoint(net.state_dict(), variable_shapes(model))
    # Copies: the converted arrays share memory with the reference's tensors, which train in place.
    return net, model, jax.tree_util.tree_map(np.array, variables)


def _run_jax64(setting, width, batch, variables, batches, steps_per_epoch, seed, noise32):
    """slr_jax in float64 (``jax_enable_x64``, ``model.dtype='float64'``); its masks must be
    those of the float32 run."""
    config = jax_config(setting, width, "float64", batch)
    with jax.enable_x64(True):
        as64 = lambda x: np.asarray(x, np.float64) if np.issubdtype(x.dtype, np.floating) else x
        variables = jax.tree_util.tree_map(as64, variables)
        batches = [{k: as64(v) for k, v in batch.items()} for batch in batches]  # exact
        run = run_jax(config, variables, batches, steps_per_epoch, seed)
    same = all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(run["noise"]), jax.tree_util.tree_leaves(noise32))
    )
    if not same:
        raise RuntimeError("slr_jax's float64 run drew other masks than its float32 run")
    return run


def trajectory_rows(
    reference_repo: str,
    setting: str,
    crop: int = 81,
    batch: int = 2,
    steps: int = 10,
    seed: int = 0,
    width: float = 0.25,
    steps_per_epoch: int = 1,
    timings: dict | None = None,
) -> list[Row]:
    """Runs both trainings (see the module docstring) and returns the ``traj/...`` rows;
    ``timings`` (if given) receives the seconds of each run."""
    import torch

    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {setting!r}")
    if steps < 1 or steps_per_epoch < 1 or batch < 2 or crop < 33:
        raise ValueError("need steps >= 1, steps_per_epoch >= 1, batch >= 2 and crop >= 33")
    timings = {} if timings is None else timings
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    jax.config.update("jax_default_matmul_precision", "highest")
    hparams = reference_hparams(reference_repo, setting)
    config = jax_config(setting, width, "float32", batch)
    net, model, variables = _build(reference_repo, setting, seed, width, config)
    net64 = copy.deepcopy(net)
    batches = make_batches(model, variables, setting, steps, batch, crop, seed)
    clock = time.perf_counter()
    jax32 = run_jax(config, variables, batches, steps_per_epoch, seed)
    timings["jax_float32_s"] = time.perf_counter() - clock
    masks = [reference_noise(n) for n in jax32["noise"]]
    clock = time.perf_counter()
    ref32 = run_reference(net, setting, hparams, batches, masks, steps_per_epoch)
    timings["torch_float32_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    with torch_float64():
        ref64 = run_reference(net64.double(), setting, hparams, batches, masks, steps_per_epoch)
    timings["torch_float64_s"] = time.perf_counter() - clock
    seg_start = (int(hparams["pretrain_epochs"]) + 1) * steps_per_epoch
    label = "vs PyTorch float64"
    rows = [config_row(config, hparams)]
    rows += schedule_rows(jax32["metrics"], ref32["metrics"], seg_start)
    rows += loss_rows(jax32["metrics"], ref32["metrics"], ref64["metrics"], label)
    rows += state_rows(variables, jax32["variables"], ref32["state"], ref64["state"], label)
    start = convert.flax_to_torch(variables)
    rows.append(unchanged_row(start, convert.flax_to_torch(jax32["variables"]), ref32["state"]))
    if jax_float64_available():
        clock = time.perf_counter()
        jax64 = _run_jax64(
            setting, width, batch, variables, batches, steps_per_epoch, seed, jax32["noise"]
        )
        timings["jax_float64_s"] = time.perf_counter() - clock
        label = "slr_jax float64 vs PyTorch float64"
        rows64 = loss_rows(jax64["metrics"], ref32["metrics"], ref64["metrics"], label, False)
        rows64 += state_rows(
            variables, jax64["variables"], ref32["state"], ref64["state"], label, False
        )
        explain_float32(rows, rows64)
        rows += rows64
    return rows


def explain_float32(rows32: list[Row], rows64: list[Row]) -> None:
    """Marks float32 rows over their tolerance as ``rounding-limited`` when every float64 row
    passes: both float64 runs then compute the same trajectory, and the float32 excess is
    rounding carried through a discrete choice (an arg-max or a pseudo-label threshold that
    slr_jax's float32 run decides otherwise), which the float32 reference happened not to meet."""
    if not rows64 or not all(r.passed for r in rows64):
        return
    for row in rows32:
        if "vs PyTorch float64" in row.name and not row.within_tol:
            row.kind = ROUNDING_LIMITED
            row.note += "; float32 rounding (the float64 runs agree, rows below)"


def run(
    reference_repo: str,
    setting: str,
    crop: int = 81,
    batch: int = 2,
    steps: int = 10,
    seed: int = 0,
    width: float = 0.25,
    steps_per_epoch: int = 1,
) -> dict:
    """:func:`trajectory_rows` as a report (``parity.make_report``)."""
    timings: dict = {}
    rows = trajectory_rows(
        reference_repo, setting, crop, batch, steps, seed, width, steps_per_epoch, timings
    )
    meta = dict(
        setting=setting,
        crop=crop,
        batch=batch,
        seed=seed,
        steps=steps,
        width=width,
        steps_per_epoch=steps_per_epoch,
    )
    return make_report(meta, rows, timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slr_jax.parity.trajectory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--reference-repo", required=True, help="checkout of github.com/DesertsP/SLRNet"
    )
    parser.add_argument("--setting", default="wsss", choices=sorted(SETTINGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=1)
    parser.add_argument("--crop", type=int, default=81)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=float, default=0.25, help="channel multiplier")
    parser.add_argument("--json", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
        import yaml  # noqa: F401
    except ImportError:
        print(
            "the trajectory tool needs PyTorch and PyYAML: pip install torch pyyaml",
            file=sys.stderr,
        )
        return 2
    try:
        report = run(
            args.reference_repo,
            args.setting,
            args.crop,
            args.batch,
            args.steps,
            args.seed,
            args.width,
            args.steps_per_epoch,
        )
    except (FileNotFoundError, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
