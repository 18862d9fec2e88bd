"""Optimiser: the reference's four SGD parameter groups, frozen parameters and the lr schedule.

Parameter groups (labels returned by :func:`param_group_labels`):

================  ==========================================  =========  ============
label             leaves                                      lr         weight decay
================  ==========================================  =========  ============
frozen            backbone BatchNorm leaves; all of backbone  0 (none)   none
                  ``conv1a``, ``b2``, ``b2_1``, ``b2_2``
                  (the stem, ``FROZEN_BACKBONE_BLOCKS``)
backbone_weight   other backbone ``kernel``                   x1         yes
backbone_bias     other backbone ``bias``                     x2         no
head_weight       head ``kernel`` / ``scale`` / other leaves  x10        yes
head_bias         head ``bias``                               x20        no
================  ==========================================  =========  ============

The update is PyTorch's ``SGD(momentum=0.9, nesterov=True)`` with *coupled* weight decay:
the decay term is added to the gradient before the momentum buffer, as in
``torch.optim.SGD(weight_decay=...)``. Frozen leaves get exactly zero updates and carry no
optimiser state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

from slr_jax.constants import FROZEN_BACKBONE_BLOCKS

FROZEN = "frozen"
BACKBONE_WEIGHT = "backbone_weight"
BACKBONE_BIAS = "backbone_bias"
HEAD_WEIGHT = "head_weight"
HEAD_BIAS = "head_bias"
TRAINABLE_GROUPS = (BACKBONE_WEIGHT, BACKBONE_BIAS, HEAD_WEIGHT, HEAD_BIAS)
GROUP_LABELS = (FROZEN, *TRAINABLE_GROUPS)

_DECAYED_GROUPS = frozenset({BACKBONE_WEIGHT, HEAD_WEIGHT})
_VARIABLE_COLLECTIONS = frozenset({"params", "batch_stats"})


def _key_name(entry: Any) -> str:
    """The string name of one pytree path entry (dict key, attribute or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _is_batchnorm_module(name: str) -> bool:
    """True for module names the backbone uses for BatchNorm (``bn7``, ``bn_branch2a``, ...)."""
    return name.startswith("bn") or name.startswith("BatchNorm")


def _label_for_path(names: Sequence[str]) -> str:
    """Group label of one leaf given its path names, e.g. ``('backbone', 'b3', 'bn7', 'bias')``."""
    if len(names) < 2:
        raise ValueError(
            f"Parameter {'/'.join(names) or '<root>'} is not inside a module; pass the Flax "
            "'params' dict (top-level keys 'backbone', 'aspp', ...), not a bare array."
        )
    top, modules, leaf = names[0], names[1:-1], names[-1]
    if top == "backbone":
        if modules and modules[0] in FROZEN_BACKBONE_BLOCKS:
            return FROZEN
        # Backbone convolutions carry no 'scale', so any backbone 'scale' is a BatchNorm one.
        if leaf == "scale" or any(_is_batchnorm_module(m) for m in modules):
            return FROZEN
        if leaf == "bias":
            return BACKBONE_BIAS
        if leaf == "kernel":
            return BACKBONE_WEIGHT
        # The reference sends backbone parameters that are neither weight nor bias to group 2.
        return HEAD_WEIGHT
    # New (head) modules: only biases get the x20 group; every other leaf, BatchNorm 'scale'
    # included, is a weight as in the reference's fallback to group 2.
    return HEAD_BIAS if leaf == "bias" else HEAD_WEIGHT


def param_group_labels(params: Any) -> Any:
    """Labels every leaf of a Flax ``params`` tree with its group name (see module docstring).

    Args:
      params: the ``params`` collection (nested dicts ending in ``kernel``/``bias``/``scale``),
        i.e. ``variables['params']``, not the whole ``variables`` dict.
    Returns:
      A pytree with the structure of ``params`` whose leaves are strings in ``GROUP_LABELS``.
    """
    if isinstance(params, Mapping):
        collections = _VARIABLE_COLLECTIONS.intersection(params.keys())
        if collections:
            raise ValueError(
                "param_group_labels got a variables dict with collection(s) "
                f"{sorted(collections)}; pass variables['params'] instead."
            )
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _label_for_path([_key_name(p) for p in path]), params
    )


def without_frozen_gradients(params: Any) -> Any:
    """``params`` with every frozen leaf behind ``jax.lax.stop_gradient``: differentiating a
    loss of the result gives exact zeros there without computing them (no weight-gradient
    convolutions for the frozen stem, no gradient buffers), the rest unchanged."""
    return jax.tree_util.tree_map(
        lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p,
        params,
        param_group_labels(params),
    )


def learning_rate_schedule(
    base_lr: float,
    pretrain_steps: int,
    total_steps: int,
    decay_steps: int | None = None,
) -> optax.Schedule:
    """Constant ``base_lr`` for ``pretrain_steps`` steps, then cosine annealing to 0.

    Matches ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=decay_steps, eta_min=0)`` stepped
    once after every optimiser step that follows pretraining: the lr used at (0-based) step ``t``
    is ``base_lr * (1 + cos(pi * max(t - pretrain_steps, 0) / decay_steps)) / 2``. After
    ``pretrain_steps + decay_steps`` steps the lr stays at 0 (PyTorch's would rise again).

    Args:
      base_lr: learning rate before any multiplier.
      pretrain_steps: steps run at constant ``base_lr`` (the seg loss is off during them).
      total_steps: length of the whole run; ``decay_steps`` defaults to
        ``total_steps - pretrain_steps``.
      decay_steps: cosine period if it differs from the steps left (see
        :func:`reference_schedule_steps`).
    Returns:
      An optax schedule ``step -> lr`` (jit-able).
    """
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}.")
    if pretrain_steps < 0:
        raise ValueError(f"pretrain_steps must be >= 0, got {pretrain_steps}.")
    if decay_steps is None:
        decay_steps = total_steps - pretrain_steps
    if decay_steps <= 0:
        raise ValueError(
            f"The cosine phase needs at least one step: total_steps={total_steps}, "
            f"pretrain_steps={pretrain_steps}, decay_steps={decay_steps}. Make total_steps larger "
            "than pretrain_steps (fewer pretrain epochs or more epochs)."
        )
    constant = optax.constant_schedule(base_lr)
    cosine = optax.cosine_decay_schedule(init_value=base_lr, decay_steps=decay_steps, alpha=0.0)
    return optax.join_schedules([constant, cosine], boundaries=[pretrain_steps])


def reference_schedule_steps(
    num_epochs: int, pretrain_epochs: int, steps_per_epoch: int
) -> tuple[int, int]:
    """``(pretrain_steps, decay_steps)`` as the reference's training loop produces them.

    The reference counts epochs from 0 and turns the seg loss and the scheduler on only for
    ``epoch > pretrain_epochs``, so ``pretrain_epochs + 1`` epochs run at constant lr, while the
    cosine period is ``(num_epochs - pretrain_epochs) * steps_per_epoch``: the run ends one
    epoch before the lr reaches 0.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
    if not 0 <= pretrain_epochs < num_epochs:
        raise ValueError(
            f"Need 0 <= pretrain_epochs < num_epochs, got pretrain_epochs={pretrain_epochs}, "
            f"num_epochs={num_epochs}."
        )
    pretrain_steps = (pretrain_epochs + 1) * steps_per_epoch
    decay_steps = (num_epochs - pretrain_epochs) * steps_per_epoch
    return pretrain_steps, decay_steps


def _group_transform(
    schedule: optax.Schedule,
    multiplier: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
) -> optax.GradientTransformation:
    """SGD for one group: optional coupled decay, then momentum and ``-multiplier * lr``."""
    scaled = lambda step: multiplier * schedule(step)
    steps = [] if weight_decay == 0 else [optax.add_decayed_weights(weight_decay)]
    steps.append(optax.sgd(scaled, momentum=momentum, nesterov=nesterov))
    return optax.chain(*steps)


def make_optimizer(
    cfg_train: Any, learning_rate: optax.Schedule | float, params: Any = None
) -> optax.GradientTransformation:
    """The reference optimiser: 4 SGD groups (lr x1/x2/x10/x20) plus zero updates when frozen.

    Args:
      cfg_train: ``config.train``; reads ``weight_decay``, ``momentum``, ``nesterov`` and
        ``lr_multipliers`` (in ``TRAINABLE_GROUPS`` order).
      learning_rate: the base (multiplier 1) schedule, or a constant.
      params: optional ``params`` tree; when given, its labels are checked here so a bad tree
        fails early. Labels are recomputed from whatever tree ``init`` receives.
    Returns:
      An ``optax.GradientTransformation`` over the whole ``params`` tree.
    """
    schedule = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)
    multipliers = tuple(cfg_train.lr_multipliers)
    if len(multipliers) != len(TRAINABLE_GROUPS):
        raise ValueError(
            f"train.lr_multipliers needs {len(TRAINABLE_GROUPS)} values for "
            f"{TRAINABLE_GROUPS}, got {multipliers}."
        )
    weight_decay, momentum = float(cfg_train.weight_decay), float(cfg_train.momentum)
    nesterov = bool(cfg_train.nesterov)
    if weight_decay < 0 or not 0 <= momentum < 1:
        raise ValueError(
            f"Need weight_decay >= 0 and 0 <= momentum < 1, got {weight_decay}, {momentum}."
        )
    if nesterov and momentum == 0:
        raise ValueError("Nesterov momentum needs train.momentum > 0 (the reference uses 0.9).")
    if params is not None:
        param_group_labels(params)  # raises on a malformed tree
    transforms = {FROZEN: optax.set_to_zero()}
    for group, multiplier in zip(TRAINABLE_GROUPS, multipliers):
        decay = weight_decay if group in _DECAYED_GROUPS else 0.0
        transforms[group] = _group_transform(schedule, float(multiplier), decay, momentum, nesterov)
    return optax.multi_transform(transforms, param_group_labels)
