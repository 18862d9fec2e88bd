"""slr_jax's side: the model with the reference's weights converted, and the jitted training
forward (and backward) that gives every compared quantity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from slr_jax import convert
from slr_jax.losses import slrnet_objective
from slr_jax.models import SLRNet, variable_shapes
from slr_jax.models.layers import compute_dtype
from slr_jax.parity.settings import LOSS_COEFF, SETTINGS
from slr_jax.parity.ties import _near_tie_mask_jnp, masked_code_consistency


def converted_model(net, setting: str, num_classes: int, dtype: str):
    """Our ``SLRNet`` of ``setting`` in ``dtype`` and the reference ``net``'s (float32) weights
    converted to its variables: ``(model, variables)``. For float64 (x64 on) the variables are
    the float32 weights held exactly in float64."""
    model = SLRNet(variant=setting, num_classes=num_classes, dtype=compute_dtype(dtype))
    # COCO's ``class_weights`` buffer is a loss constant (our ``loss.class_weights``).
    state = {k: v for k, v in net.state_dict().items() if k != "class_weights"}
    variables = convert.convert_checkpoint(state, variable_shapes(model))
    leaf_dtype = jnp.float64 if dtype == "float64" else jnp.float32
    return model, jax.tree_util.tree_map(lambda a: jnp.asarray(a, leaf_dtype), variables)


def loss_config(setting: str, num_classes: int) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            loss_coeff=LOSS_COEFF, aux_weight=0.4, pamr_iters=10, pamr_bg_pow=3.0,
            pamr_dilations=(1, 2, 4, 8, 12, 24), pos_weight=1.0, class_weights=None,
        )
    )  # fmt: skip
    cfg.update(SETTINGS[setting][2])
    if setting == "coco":
        cfg.class_weights = tuple(float(w) for w in np.linspace(0.5, 1.5, num_classes - 1))
    return cfg


def _jax_train_fn(model: SLRNet, loss_cfg, setting: str, with_grads: bool, tie_eps: float):
    """``f(params, batch_stats, batch, ref_ties) -> (aux, grads)``, to be jitted.

    Variables and batch are arguments, not closed-over constants, so XLA does not fold the
    weights into the program. ``ref_ties`` (B, h, w) bool are PyTorch's near-tie pixels; the
    tie-free code term excludes them and JAX's own. ``grads`` (None without ``with_grads``)
    are the gradients of: the total, the total without the code term, the tie-free code term.
    """
    c_code = float(loss_cfg.loss_coeff[2])

    def forward(params, batch_stats, batch, ref_ties):
        outputs = model.apply(
            {"params": params, "batch_stats": batch_stats}, batch["image"], mode="train",
            train=False,
        )  # fmt: skip
        total, terms, visuals = slrnet_objective(
            outputs, batch, loss_cfg=loss_cfg, variant=setting, seg_weight=1.0
        )
        codes, codes2 = outputs["codes"], outputs["codes2"]
        own_ties = (_near_tie_mask_jnp(codes, tie_eps), _near_tie_mask_jnp(codes2, tie_eps))
        ties = ref_ties | own_ties[0] | own_ties[1]
        tie_free = masked_code_consistency(codes, codes2, ~ties)
        objectives = (total, total - c_code * terms["code_consistency"], c_code * tie_free)
        aux = {
            "terms": dict(terms, code_consistency_tie_free=tie_free),
            "pseudo": visuals["pseudo"],
            "codes": codes,
            "codes2": codes2,
            "dictionary": outputs["dictionary"],
            "ties": ties,
            "own_ties": own_ties,
        }
        return objectives, aux

    if not with_grads:
        return lambda *args: (forward(*args)[1], None)

    def forward_backward(params, batch_stats, batch, ref_ties):
        objectives, pullback, aux = jax.vjp(
            lambda p: forward(p, batch_stats, batch, ref_ties), params, has_aux=True
        )
        grads = []
        for i in range(len(objectives)):
            cotangent = tuple(
                jnp.ones_like(o) if j == i else jnp.zeros_like(o) for j, o in enumerate(objectives)
            )
            grads.append(pullback(cotangent)[0])
        return aux, grads

    return forward_backward
