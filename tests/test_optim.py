"""slr_jax.optim vs torch.optim.SGD / CosineAnnealingLR and the reference's parameter groups."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from slr_jax import optim

torch = pytest.importorskip("torch")

TRAINABLE = optim.TRAINABLE_GROUPS


def train_config(**overrides):
    """``config.train`` of configs/common.py with ``overrides``."""
    cfg = common.get_config().train
    cfg.update(overrides)
    return cfg


def reference_schedule(base_lr, num_epochs, pretrain_epochs, steps_per_epoch):
    """The lr schedule the trainer builds for these epochs (``train.StepPlan``)."""
    pretrain_steps, decay_steps = optim.reference_schedule_steps(
        num_epochs, pretrain_epochs, steps_per_epoch
    )
    total_steps = num_epochs * steps_per_epoch
    return optim.learning_rate_schedule(base_lr, pretrain_steps, total_steps, decay_steps)


def _fake_params(rng: np.random.Generator, dtype=np.float32) -> dict:
    """A small tree with the real naming: frozen blocks, backbone BN, heads with BN and biases."""

    def arr(*shape):
        return rng.standard_normal(shape).astype(dtype)

    bn = lambda c: {"scale": arr(c), "bias": arr(c)}
    return {
        "backbone": {
            "conv1a": {"kernel": arr(3, 3, 3, 4)},
            "b2": {"bn_branch2a": bn(4), "conv_branch2a": {"kernel": arr(3, 3, 4, 4)}},
            "b2_1": {"conv_branch2b1": {"kernel": arr(3, 3, 4, 4)}},
            "b3": {
                "bn_branch2a": bn(4),
                "conv_branch2a": {"kernel": arr(3, 3, 4, 6)},
                "conv_branch1": {"kernel": arr(1, 1, 4, 6), "bias": arr(6)},
            },
            "b7": {"conv_branch2b2": {"kernel": arr(1, 1, 6, 8)}},
            "bn7": bn(8),
        },
        "aspp": {"aspp1": {"atrous_conv": {"kernel": arr(1, 1, 8, 5)}, "bn": bn(5)}},
        "fc8_x": {"0": {"kernel": arr(1, 1, 5, 3)}, "1": bn(3)},
        "last_conv": {"8": {"kernel": arr(1, 1, 3, 21), "bias": arr(21)}},
        "factorization_reconstruction": {"transform1": {"kernel": arr(5, 5), "bias": arr(5)}},
    }


FAKE_EXPECTED = {
    ("backbone", "conv1a", "kernel"): "frozen",
    ("backbone", "b2", "bn_branch2a", "scale"): "frozen",
    ("backbone", "b2", "bn_branch2a", "bias"): "frozen",
    ("backbone", "b2", "conv_branch2a", "kernel"): "frozen",
    ("backbone", "b2_1", "conv_branch2b1", "kernel"): "frozen",
    ("backbone", "b3", "bn_branch2a", "scale"): "frozen",
    ("backbone", "b3", "bn_branch2a", "bias"): "frozen",
    ("backbone", "b3", "conv_branch2a", "kernel"): "backbone_weight",
    ("backbone", "b3", "conv_branch1", "kernel"): "backbone_weight",
    ("backbone", "b3", "conv_branch1", "bias"): "backbone_bias",
    ("backbone", "b7", "conv_branch2b2", "kernel"): "backbone_weight",
    ("backbone", "bn7", "scale"): "frozen",
    ("backbone", "bn7", "bias"): "frozen",
    ("aspp", "aspp1", "atrous_conv", "kernel"): "head_weight",
    ("aspp", "aspp1", "bn", "scale"): "head_weight",
    ("aspp", "aspp1", "bn", "bias"): "head_bias",
    ("fc8_x", "0", "kernel"): "head_weight",
    ("fc8_x", "1", "scale"): "head_weight",
    ("fc8_x", "1", "bias"): "head_bias",
    ("last_conv", "8", "kernel"): "head_weight",
    ("last_conv", "8", "bias"): "head_bias",
    ("factorization_reconstruction", "transform1", "kernel"): "head_weight",
    ("factorization_reconstruction", "transform1", "bias"): "head_bias",
}


def _flat(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def test_labels_of_fake_tree():
    labels = _flat(optim.param_group_labels(_fake_params(np.random.default_rng(0))))
    assert labels == FAKE_EXPECTED


def test_labels_match_reference_model_groups(reference_file):
    """Every parameter of the reference WSSS net, renamed to Flax paths, gets the reference's group.

    Reference group = its ``parameter_groups()`` index, or 'frozen' where ``requires_grad`` is off
    after ``model.train()``.
    """
    root = str(reference_file("models", "slrnet.py").parents[1])
    sys.path.insert(0, root)
    try:
        from models.slrnet import Net
    except Exception as err:  # any import problem means "no reference here"
        pytest.skip(f"reference models.slrnet does not import: {err}")
    finally:
        sys.path.remove(root)
    model = Net(pretrained=False)
    model.train()
    group_of = {}
    for index, group in enumerate(model.parameter_groups()):
        for p in group:
            group_of[id(p)] = TRAINABLE[index]
    # Flax names follow the module attribute path; the reference also reaches two heads through
    # its ``newly_added`` list, so prefer the attribute name.
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in names or names[id(p)].startswith("newly_added."):
            names[id(p)] = name
    bn_type = torch.nn.modules.batchnorm._BatchNorm
    batchnorms = {name for name, m in model.named_modules() if isinstance(m, bn_type)}
    params, expected = {}, {}
    for p in model.parameters():
        *modules, leaf = names[id(p)].split(".")
        assert not modules[0] == "newly_added", names[id(p)]
        is_bn = ".".join(modules) in batchnorms
        flax_leaf = {"weight": "scale" if is_bn else "kernel", "bias": "bias"}[leaf]
        node = params
        for m in modules:
            node = node.setdefault(m, {})
        node[flax_leaf] = np.zeros((), np.float32)
        expected[(*modules, flax_leaf)] = group_of[id(p)] if p.requires_grad else "frozen"
    got = _flat(optim.param_group_labels(params))
    assert len(got) == len(expected) == 165
    wrong = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert not wrong, f"labels differ from the reference (got, want): {wrong}"
    counts = {g: list(expected.values()).count(g) for g in optim.GROUP_LABELS}
    # resnet38 convs have no bias, so the x2 group is empty in the real network.
    assert counts["backbone_bias"] == 0 and counts["frozen"] > 0 and counts["head_bias"] > 0


def _reference_lrs(base_lr, num_epochs, pretrain_epochs, steps_per_epoch):
    """The lr each optimiser step of the reference training loop uses (torch scheduler)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, (num_epochs - pretrain_epochs) * steps_per_epoch, eta_min=0.0
    )
    lrs = []
    for epoch in range(num_epochs):
        for _ in range(steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if epoch > pretrain_epochs:
                sched.step()
    return np.asarray(lrs)


@pytest.mark.parametrize("num_epochs,pretrain_epochs,steps_per_epoch", [(10, 2, 7), (4, 0, 25)])
def test_schedule_matches_torch_reference_loop(num_epochs, pretrain_epochs, steps_per_epoch):
    base_lr = 5e-4
    want = _reference_lrs(base_lr, num_epochs, pretrain_epochs, steps_per_epoch)
    schedule = reference_schedule(base_lr, num_epochs, pretrain_epochs, steps_per_epoch)
    got = np.asarray([schedule(t) for t in range(len(want))], np.float64)
    err = np.max(np.abs(got - want)) / base_lr
    assert err < 1e-6, f"max |lr_jax - lr_torch| / base_lr = {err:.3g}"
    # The reference's cosine does not reach 0 within the run: last lr is one epoch short of it.
    decay = (num_epochs - pretrain_epochs) * steps_per_epoch
    last_t = decay - steps_per_epoch - 1
    assert want[-1] == pytest.approx(base_lr * (1 + math.cos(math.pi * last_t / decay)) / 2)
    assert want[(pretrain_epochs + 1) * steps_per_epoch] == base_lr  # still constant there
    assert want[(pretrain_epochs + 1) * steps_per_epoch + 1] < base_lr


def test_schedule_formula_and_clamp():
    schedule = optim.learning_rate_schedule(0.1, pretrain_steps=5, total_steps=15)
    lrs = np.asarray([schedule(t) for t in range(20)])
    np.testing.assert_allclose(lrs[:6], 0.1, rtol=1e-7)
    want = [0.1 * (1 + math.cos(math.pi * k / 10)) / 2 for k in range(11)]
    np.testing.assert_allclose(lrs[5:16], want, rtol=1e-6, atol=1e-9)
    assert np.all(lrs[15:] == 0.0)


def _torch_sgd_run(params, grads_per_step, base_lr, multipliers, weight_decay, lr_at):
    """torch.optim.SGD over the trainable leaves, groups as in the reference trainer."""
    labels = _flat(optim.param_group_labels(params))
    flat = _flat(params)
    tensors = {k: torch.nn.Parameter(torch.from_numpy(np.array(v))) for k, v in flat.items()}
    groups = []
    for group, mult in zip(TRAINABLE, multipliers):
        members = [tensors[k] for k in flat if labels[k] == group]
        decay = weight_decay if group.endswith("weight") else 0.0
        groups.append({"params": members, "lr": mult * base_lr, "weight_decay": decay})
    opt = torch.optim.SGD(groups, lr=base_lr, momentum=0.9, nesterov=True)
    for step, grads in enumerate(grads_per_step):
        for group, mult in zip(opt.param_groups, multipliers):
            group["lr"] = mult * lr_at(step)
        for k, t in tensors.items():
            t.grad = None if labels[k] == "frozen" else torch.from_numpy(np.array(grads[k]))
        opt.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, 2e-6), (np.float64, 1e-12)])
def test_optimizer_matches_torch_sgd(dtype, tolerance):
    """Whole optimiser (groups, decay, Nesterov, schedule) vs torch over 30 steps.

    float64 checks the formulas exactly; float32 is what training runs.
    """
    with jax.enable_x64(dtype == np.float64):
        _compare_with_torch_sgd(dtype, tolerance)


def _compare_with_torch_sgd(dtype, tolerance):
    rng = np.random.default_rng(1)
    params = _fake_params(rng, dtype)
    num_epochs, pretrain_epochs, steps_per_epoch = 5, 1, 6
    base_lr, weight_decay = 0.02, 5e-4
    cfg = train_config(
        weight_decay=weight_decay, momentum=0.9, lr_multipliers=(1.0, 2.0, 10.0, 20.0)
    )
    num_steps = num_epochs * steps_per_epoch
    flat = _flat(params)
    grads_per_step = [
        {k: rng.standard_normal(v.shape).astype(dtype) for k, v in flat.items()}
        for _ in range(num_steps)
    ]
    ref_lrs = _reference_lrs(base_lr, num_epochs, pretrain_epochs, steps_per_epoch)
    want = _torch_sgd_run(
        params, grads_per_step, base_lr, cfg["lr_multipliers"], weight_decay, lambda s: ref_lrs[s]
    )

    schedule = reference_schedule(base_lr, num_epochs, pretrain_epochs, steps_per_epoch)
    tx = optim.make_optimizer(cfg, schedule, params)
    treedef = jax.tree_util.tree_structure(params)
    keys = list(_flat(params))  # same leaf order as tree_flatten
    state = tx.init(params)
    jax_params = jax.tree_util.tree_map(jnp.asarray, params)

    @jax.jit
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    for grads in grads_per_step:
        g = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(grads[k]) for k in keys])
        jax_params, state = step(jax_params, state, g)
    got = _flat(jax_params)

    labels = _flat(optim.param_group_labels(params))
    worst_abs, worst_rel, moved = 0.0, 0.0, 0.0
    for k in keys:
        a, b = np.asarray(got[k]), want[k]
        assert a.dtype == dtype, (k, a.dtype)
        if labels[k] == "frozen":
            assert np.array_equal(a, flat[k]), f"frozen leaf {k} changed"
            continue
        # Error relative to the leaf's magnitude (elementwise ratios blow up where b crosses 0).
        worst_abs = max(worst_abs, float(np.max(np.abs(a - b))))
        worst_rel = max(worst_rel, float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
        moved = max(moved, float(np.max(np.abs(b - flat[k]))))
    assert moved > 1.0, "the comparison is vacuous: torch barely moved the parameters"
    assert worst_rel < tolerance, f"max abs {worst_abs:.3g}, max abs / max |param| {worst_rel:.3g}"


def test_wrong_decay_or_multipliers_are_detected():
    """The torch comparison is sensitive to the settings it checks (guards against tautology)."""
    rng = np.random.default_rng(2)
    params = _fake_params(rng)
    flat = _flat(params)
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in flat.items()}]
    grads *= 3
    base = _torch_sgd_run(params, grads, 0.1, (1, 2, 10, 20), 5e-4, lambda s: 0.1)
    swapped = _torch_sgd_run(params, grads, 0.1, (1, 2, 20, 10), 5e-4, lambda s: 0.1)
    no_decay = _torch_sgd_run(params, grads, 0.1, (1, 2, 10, 20), 0.0, lambda s: 0.1)
    key = ("fc8_x", "0", "kernel")
    assert np.max(np.abs(base[key] - swapped[key])) > 1e-2
    assert np.max(np.abs(base[key] - no_decay[key])) > 1e-5


def test_frozen_leaves_get_zero_updates_and_no_state():
    params = _fake_params(np.random.default_rng(3))
    tx = optim.make_optimizer(train_config(), 1.0, params)
    state = tx.init(params)
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 7.0), params)
    updates, _ = tx.update(grads, state, params)
    labels = _flat(optim.param_group_labels(params))
    for k, u in _flat(updates).items():
        if labels[k] == "frozen":
            assert np.array_equal(np.asarray(u), np.zeros_like(u)), k
        else:
            assert np.all(np.asarray(u) != 0), k
    # Momentum buffers exist only for trainable leaves.
    buffers = [x for x in jax.tree_util.tree_leaves(state) if np.ndim(x) > 0]
    assert len(buffers) == sum(v != "frozen" for v in labels.values())


def test_frozen_leaves_are_constants_of_the_gradient():
    """``without_frozen_gradients``: zero gradients at frozen leaves, the same gradient at the
    others, and no weight-gradient convolution for frozen kernels in the compiled program."""
    params = _fake_params(np.random.default_rng(4))
    x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 8, 8, 3)), jnp.float32)

    def loss(p):
        y = jax.lax.conv_general_dilated(
            x, p["backbone"]["conv1a"]["kernel"], (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        y = jax.lax.conv_general_dilated(
            y, p["backbone"]["b3"]["conv_branch2a"]["kernel"], (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        return jnp.sum(y**2) + sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(p))

    plain = jax.grad(loss)(params)
    frozen_out = jax.grad(lambda p: loss(optim.without_frozen_gradients(p)))(params)
    labels = _flat(optim.param_group_labels(params))
    for k, g in _flat(frozen_out).items():
        expected = np.zeros_like(g) if labels[k] == "frozen" else _flat(plain)[k]
        np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-6, err_msg=str(k))
    count = lambda f: jax.jit(jax.grad(f)).lower(params).as_text().count("convolution(")
    assert count(lambda p: loss(optim.without_frozen_gradients(p))) < count(loss)


def test_bad_inputs_raise_clear_errors():
    params = _fake_params(np.random.default_rng(4))
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        optim.param_group_labels({"params": params, "batch_stats": {}})
    with pytest.raises(ValueError, match="lr_multipliers needs 4 values"):
        optim.make_optimizer(train_config(lr_multipliers=(1.0, 10.0)), 0.1, params)
    with pytest.raises(ValueError, match="pretrain_epochs < num_epochs"):
        optim.reference_schedule_steps(num_epochs=2, pretrain_epochs=2, steps_per_epoch=2)
    with pytest.raises(ValueError, match="cosine phase needs at least one step"):
        optim.learning_rate_schedule(0.1, pretrain_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="Nesterov momentum needs"):
        optim.make_optimizer(train_config(momentum=0.0), 0.1, params)
