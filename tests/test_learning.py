"""Learning parity (slr_jax.parity.learning): the driver that trains a demo in slr_jax and in
the reference on one data stream from one set of weights.

Without a checkout: on a few steps at a tiny width, the driver's slr_jax run against a
re-expression (the initial state built from the pretrained backbone, the training stream read
afresh, the compiled step applied by hand), the reference loop's lr and seg-loss schedule
against the closed form and slr_jax's logged lr, and its conversion and evaluation path
against slr_jax's own evaluation. With ``SLR_REFERENCE_REPO``: both frameworks in float64 from
the same weights, batches and dropout masks reach the same losses at every step and, after
conversion, the same predictions.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import demo, demo_semi, demo_semi_wo_cls, demo_supervised
from slr_jax import data as data_lib
from slr_jax import train
from slr_jax.models import build_model
from slr_jax.parity import learning, trajectory
from slr_jax.sharding import make_mesh, replicated, shard_batch

torch = pytest.importorskip("torch")

TOTAL_STEPS = 4  # 2 epochs of 2 steps; the seg loss and cosine decay start at step 2


def tiny_config(tmp: Path, module=demo, steps: int = TOTAL_STEPS):
    config = module.get_config()
    config.model.width = 0.0625
    config.pretrain.steps = 2
    config.loss.pamr_dilations = (1, 2)
    config.dataset.manual_dir = str(tmp / "synthetic")
    config.dataset.num_train = 8
    config.dataset.num_val = 2
    config.dataset.image_size = 40
    config.dataset.crop_size = 33
    if "num_labeled" in config.dataset and config.dataset.num_labeled:
        config.dataset.num_labeled = 4
    config.train.batch_size = 2
    config.train.num_epochs = 2
    config.train.pretrain_epochs = 0
    config.train.total_steps = steps
    config.train.log_every_steps = 1
    config.train.image_every_steps = 0
    config.checkpoint.every_steps = steps
    config.test.flip = False
    config.test.use_crf = False
    return config


@pytest.fixture(scope="module")
def driven(tmp_path_factory):
    """The driver's pretraining, data stream and slr_jax run of the tiny WSSS config."""
    tmp = tmp_path_factory.mktemp("learning")
    config = tiny_config(tmp)
    init_checkpoint, variables = learning.initial_variables(config, str(tmp / "pretrain"))
    batches = learning.stream_batches(config, TOTAL_STEPS)
    ours = learning.run_slr_jax(config, str(tmp / "run"), init_checkpoint, batches)
    return dict(config=config, init=init_checkpoint, variables=variables, batches=batches,
                ours=ours, tmp=tmp)  # fmt: skip


def test_slr_jax_run_is_the_stream_from_the_pretrained_start(driven):
    """Pins that the driver's slr_jax run starts from the state ``train_and_evaluate`` builds
    from the pretrained backbone (the weights the reference is given) and consumes the
    config's training stream from position 0 in order: re-expressed here by building that
    state, reading a fresh stream and applying the compiled step by hand."""
    config = driven["config"]
    plan = train.plan_steps(config.train, data_lib.num_train_examples(config))
    lr_fn = plan.learning_rate_fn(config.train.lr)
    state = train.create_train_state(
        config, build_model(config.model), lr_fn, jax.random.key(int(config.seed)),
        init_checkpoint=driven["init"],
    )  # fmt: skip
    initial = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(driven["variables"])):
        np.testing.assert_array_equal(a, b)
    backbone = driven["variables"]["params"]["backbone"]
    assert driven["init"] and any(np.any(leaf != 0) for leaf in jax.tree.leaves(backbone))

    mesh = make_mesh()
    state = jax.device_put(state, replicated(mesh))
    step = train.compile_train_step(config, plan, lr_fn, mesh, state)
    stream = data_lib.train_dataset(config, start_position=0)
    for k in range(TOTAL_STEPS):
        batch = next(stream)
        for key, value in batch.items():
            np.testing.assert_array_equal(np.asarray(value), driven["batches"][k][key])
        state, _ = step(state, shard_batch(batch, mesh))
    final = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    ours = driven["ours"]["variables"]
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ours)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    changed = [np.any(a != b) for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(initial))]
    assert any(changed)


class _FakeNet(torch.nn.Module):
    """Stands in for the reference's ``Net`` in the loop: four parameter groups and the state
    dict of given slr_jax variables (what the conversion back must return)."""

    def __init__(self, state):
        super().__init__()
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(2)) for _ in range(4)])
        self._state = state

    def parameter_groups(self):
        return [[p] for p in self.w]

    def state_dict(self, *args, **kwargs):
        return {k: torch.from_numpy(np.array(v)) for k, v in self._state.items()}


def test_reference_loop_schedule_and_conversion(driven, monkeypatch):
    """Pins the reference loop's schedule as the driver sets it from the config: the lr of
    every step (base group) equals the closed form (constant for ``pretrain_epochs + 1``
    epochs, then cosine with period ``(num_epochs - pretrain_epochs)`` epochs, stepped after
    each step) and slr_jax's logged lr; the seg loss is on from the same step as slr_jax's
    ``seg_weight``; the final state converts back to the variables it came from."""
    config = driven["config"]
    seen = []

    def fake_losses(net, setting, batch, loss_coeff, seg_on):
        seen.append((setting, seg_on, batch is driven["batches"][len(seen)]))
        total = sum((p**2).sum() for p in net.parameters())
        return {"total": total, "seg": total * 0}

    state = learning.to_reference_state(driven["variables"])
    monkeypatch.setattr(learning, "build_reference_net", lambda *a: _FakeNet(state))
    monkeypatch.setattr(trajectory, "reference_losses", fake_losses)
    theirs = learning.run_reference("unused", config, driven["variables"], driven["batches"])
    hparams, spe, total = learning.schedule_of(config)
    start, period = (
        (hparams["pretrain_epochs"] + 1) * spe,
        (hparams["num_epochs"] - hparams["pretrain_epochs"]) * spe,
    )
    closed = [
        hparams["lr"] * (1 + math.cos(math.pi * max(k - start, 0) / period)) / 2
        for k in range(total)
    ]
    lrs = [m["lr"] for m in theirs["metrics"]]
    np.testing.assert_allclose(lrs, closed, rtol=1e-12)
    history = driven["ours"]["history"]
    np.testing.assert_allclose(lrs, [h["lr"] for h in history], rtol=1e-6)
    assert [s[1] for s in seen] == [h["seg_weight"] > 0 for h in history]
    assert [s[1] for s in seen] == [k >= start for k in range(total)] and start < total
    assert all(s[0] == "wsss" and s[2] for s in seen)
    for a, b in zip(jax.tree.leaves(theirs["variables"]), jax.tree.leaves(driven["variables"])):
        np.testing.assert_array_equal(a, b)


def test_converted_weights_score_as_slr_jax_scores_them(driven):
    """Pins the reference side's scoring path: slr_jax's final weights taken to the
    reference's state dict and back (``to_reference_state``/``from_reference_state``) and
    scored by ``learning.evaluate`` give exactly the record of slr_jax's own final evaluation
    in ``train_and_evaluate``."""
    config, ours = driven["config"], driven["ours"]
    back = learning.from_reference_state(learning.to_reference_state(ours["variables"]), config)
    record = learning.evaluate(config, back, str(driven["tmp"] / "eval"), TOTAL_STEPS)
    for key in ("miou", "pseudo_label_miou", "pixel_accuracy"):
        assert record[key] == ours["eval"][key], key
    rows = [learning._row("reference", 0, record, 1.0)]
    assert set(rows[0]) == {"framework", "seed", "miou", "miou_crf", "pseudo_label_miou",
                            "seconds"}  # fmt: skip


def test_windowed_averages_as_the_train_loop_logs():
    """Pins the reference curves' windows: the mean of each run of ``every`` steps ending at a
    logged step, and the remainder ending at the last step."""
    metrics = [{"total": float(k), "cls": 2.0 * k} for k in range(10)]
    curves = learning.windowed(metrics, 4)
    assert curves["step"] == [4, 8, 10]
    assert curves["total"] == [1.5, 5.5, 8.5] and curves["cls"] == [3.0, 11.0, 17.0]


def test_configs_the_reference_cannot_train_fail_in_one_line():
    config = demo.get_config()
    assert learning.check_config(config) == "wsss"
    assert learning.check_config(demo_supervised.get_config()) == "supervised"
    config.loss.bg_scale = 0.5
    with pytest.raises(learning.LearningError, match="bg_scale"):
        learning.check_config(config)


# --------------------------------------------------------------------- with the reference
SETTINGS = {"wsss": (demo, 50), "semi": (demo_semi, 8), "semi_wo_cls": (demo_semi_wo_cls, 8),
            "supervised": (demo_supervised, 8)}  # fmt: skip


@pytest.mark.parametrize("low_rank", [True, False], ids=["", "without_low_rank"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_both_frameworks_learn_the_same(setting, low_rank, reference_repo, tmp_path):
    """Pins that slr_jax and the reference, in float64, from the driver's weights (the
    pretrained backbone converted) and batches with the same dropout and gate masks, reach the
    same loss terms at every step (within the trajectory tool's float64 tolerance; 1e-6 for
    the supervised baseline, whose slr_jax cross-entropy is float32) and, their final weights
    converted, the same validation scores. 50 steps for WSSS (its seg loss and
    cosine decay from step 25), a few for the other settings; with and without the low-rank
    module (the reference's swapped for ``learning.drop_low_rank``'s pass-through)."""
    module, steps = SETTINGS[setting]
    config = tiny_config(tmp_path, module, steps)
    config.model.use_low_rank = low_rank
    config.model.width = 0.125  # a width at which the reference's channel sums stay sums
    config.dataset.num_train = 2 * steps if setting == "wsss" else 8
    assert learning.check_config(config) == setting
    _, variables = learning.initial_variables(config, str(tmp_path / "pretrain"))
    batches = learning.stream_batches(config, steps)
    _, spe, _ = learning.schedule_of(config)
    config64 = config.copy_and_resolve_references()
    config64.model.dtype = "float64"
    with jax.enable_x64(True):
        as64 = lambda x: np.asarray(x, np.float64) if np.issubdtype(x.dtype, np.floating) else x
        ours = trajectory.run_jax(
            config64, jax.tree.map(as64, variables), [{k: as64(v) for k, v in b.items()}
                                                     for b in batches], spe, int(config.seed)
        )  # fmt: skip
    masks = [trajectory.reference_noise(n) for n in ours["noise"]]
    with trajectory.torch_float64():
        theirs = learning.run_reference(
            str(reference_repo), config, variables, batches, masks=masks, dtype=torch.float64
        )
    worst = {}
    for term in (t for t in learning.TERMS if t in theirs["metrics"][0]):
        a = np.array([m[term] for m in ours["metrics"]])
        b = np.array([m[term] for m in theirs["metrics"]])
        worst[term] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
    # slr_jax's supervised cross-entropy takes its log-softmax in float32 (losses.py), so that
    # setting is float32-limited (measured 4.7e-7 over 8 steps).
    assert max(worst.values()) <= (1e-6 if setting == "supervised" else trajectory.TOL64), worst
    as32 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)
    ref_eval = learning.evaluate(config, as32(theirs["variables"]), str(tmp_path / "r"), steps)
    our_eval = learning.evaluate(config, as32(ours["variables"]), str(tmp_path / "o"), steps)
    for key in ("miou", "pseudo_label_miou", "pixel_accuracy"):
        assert math.isclose(our_eval[key], ref_eval[key], abs_tol=1e-6) or (
            math.isnan(our_eval[key]) and math.isnan(ref_eval[key])
        ), key
