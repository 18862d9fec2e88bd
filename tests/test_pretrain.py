"""Backbone pretraining on image labels (slr_jax/pretrain.py): it learns, its checkpoint drops
into the segmentation model as a backbone-only start, a restarted run reuses it, bad settings
are refused, and train_and_evaluate runs it when asked."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import demo  # noqa: E402
from slr_jax import checkpoint, pretrain, sharding, train  # noqa: E402
from slr_jax.checkpoint import load_variables  # noqa: E402
from slr_jax.data.synthetic import make_synthetic_examples  # noqa: E402
from slr_jax.errors import Preempted  # noqa: E402
from slr_jax.models import build_model, init_variables  # noqa: E402

STEPS = 24


def small_config(tmp: Path):
    config = demo.get_config()
    config.model.width = 0.0625
    config.dataset.manual_dir = str(tmp / "synthetic")
    config.dataset.crop_size = 32
    config.train.batch_size = 4
    config.train.log_every_steps = 4
    config.pretrain.steps = STEPS
    config.pretrain.lr = 0.02
    return config


def fixed_batches(num_classes: int = 6):
    """The same 4 synthetic images (32 px) and their image labels, forever."""
    examples = make_synthetic_examples(4, 32, num_classes, seed=3)
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    labels = np.zeros((4, num_classes - 1), np.float32)
    for i, e in enumerate(examples):
        present = [c for c in np.unique(e["mask"]) if 0 < c < num_classes]
        labels[i, np.asarray(present, int) - 1] = 1.0
    return itertools.repeat({"image": images, "labels": labels})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    config = small_config(tmp)
    path = pretrain.pretrain_backbone(
        config, str(tmp / "workdir"), sharding.make_mesh(), batches=fixed_batches()
    )
    return config, tmp / "workdir", Path(path)


def test_the_classifier_fits_the_image_labels(pretrained):
    _, workdir, _ = pretrained
    text = (workdir / pretrain.METRICS_FILE).read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["step"] for line in lines] == list(range(4, STEPS + 1, 4))
    losses = [line["loss"] for line in lines]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_the_checkpoint_is_a_backbone_only_start(pretrained, tmp_path):
    config, _, path = pretrained
    saved, metadata = load_variables(path)
    assert metadata["source"] == checkpoint.IMAGE_LABEL_BACKBONE
    assert metadata["pretrain"]["steps"] == STEPS
    assert set(saved["params"]) == {"backbone"} and set(saved["batch_stats"]) == {"backbone"}
    model = build_model(config.model)
    start = init_variables(model, jax.random.key(0))
    merged = checkpoint.load_initial_weights(start, str(path))
    for collection in ("params", "batch_stats"):
        same = jax.tree_util.tree_map(
            np.array_equal, merged[collection]["backbone"], saved[collection]["backbone"]
        )
        assert all(jax.tree_util.tree_leaves(same))
        heads = {k: v for k, v in merged[collection].items() if k != "backbone"}
        start_heads = {k: v for k, v in start[collection].items() if k != "backbone"}
        same = jax.tree_util.tree_map(np.array_equal, heads, start_heads)
        assert all(jax.tree_util.tree_leaves(same))
    # Trained running statistics: not the initial mean 0 / variance 1 any more.
    means = [
        v for p, v in jax.tree_util.tree_leaves_with_path(saved["batch_stats"]) if "mean" in str(p)
    ]
    assert means and max(float(np.abs(m).max()) for m in means) > 1e-3


def test_a_restart_reuses_the_checkpoint_and_new_settings_retrain(pretrained, tmp_path):
    config, workdir, path = pretrained

    def unused():
        raise AssertionError("pretraining ran again")
        yield  # pragma: no cover

    again = pretrain.pretrain_backbone(config, str(workdir), sharding.make_mesh(), batches=unused())
    assert Path(again) == path
    changed = small_config(tmp_path)
    changed.pretrain.steps = 2
    with pytest.raises(AssertionError, match="ran again"):
        pretrain.pretrain_backbone(changed, str(workdir), sharding.make_mesh(), batches=unused())


@pytest.mark.parametrize(
    "override, message",
    [
        (("pretrain", "lr", 0.0), "lr > 0"),
        (("pretrain", "momentum", 1.0), "momentum must be in"),
    ],
)
def test_bad_settings_are_refused_before_any_work(override, message, tmp_path):
    config = small_config(tmp_path)
    section, key, value = override
    config[section][key] = value
    with pytest.raises(pretrain.PretrainError, match=message):
        pretrain.pretrain_backbone(config, str(tmp_path), sharding.make_mesh(), batches=iter(()))


def test_train_and_evaluate_starts_from_the_pretrained_backbone(tmp_path, monkeypatch):
    """With pretrain.steps > 0 and no init_checkpoint, the SLRNet state is built from the
    pretraining checkpoint; with an init_checkpoint, pretraining is skipped."""
    calls = []

    def fake_pretrain(config, workdir, mesh, **_):
        calls.append(workdir)
        return "/pretrained/here"

    class Stop(Exception):
        pass

    def capture(config, model, plan, rng, *, init_checkpoint=None):
        raise Stop(init_checkpoint)

    monkeypatch.setattr(pretrain, "pretrain_backbone", fake_pretrain)
    monkeypatch.setattr(train, "create_train_state", capture)
    config = small_config(tmp_path)
    config.dataset.num_train, config.dataset.num_val, config.dataset.image_size = 8, 2, 32
    with pytest.raises(Stop, match="/pretrained/here"):
        train.train_and_evaluate(config, str(tmp_path / "a"))
    assert calls == [str(tmp_path / "a")]
    config.train.init_checkpoint = "/imagenet/backbone"
    with pytest.raises(Stop, match="/imagenet/backbone"):
        train.train_and_evaluate(config, str(tmp_path / "b"))
    assert len(calls) == 1


def test_a_non_finite_loss_stops_pretraining_with_a_clear_error(tmp_path):
    config = small_config(tmp_path)
    config.pretrain.steps = 4
    batch = next(fixed_batches())
    poisoned = itertools.repeat({**batch, "labels": np.full_like(batch["labels"], np.nan)})
    with pytest.raises(pretrain.PretrainError, match="non-finite loss by step 4"):
        pretrain.pretrain_backbone(
            config, str(tmp_path / "w"), sharding.make_mesh(), batches=poisoned
        )
    assert not (tmp_path / "w" / pretrain.CHECKPOINT_DIR).exists()


def test_sigterm_saves_pretraining_and_a_rerun_resumes_to_the_same_backbone(pretrained, tmp_path):
    """SIGTERM part way: the pretraining state is saved and Preempted raised (nothing lost);
    the rerun resumes at the next step and ends with the uninterrupted run's backbone."""
    config, workdir_full, path = pretrained
    workdir = tmp_path / "w"

    def interrupting():
        for count, batch in enumerate(fixed_batches()):
            if count == 9:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    with pytest.raises(Preempted):
        pretrain.pretrain_backbone(
            config, str(workdir), sharding.make_mesh(), batches=interrupting()
        )
    assert (workdir / pretrain.PROGRESS_DIR).is_dir()
    assert not (workdir / pretrain.CHECKPOINT_DIR).exists()
    again = pretrain.pretrain_backbone(
        config, str(workdir), sharding.make_mesh(), batches=fixed_batches()
    )
    resumed, _ = load_variables(again)
    full, _ = load_variables(path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, full)
    assert not (workdir / pretrain.PROGRESS_DIR).exists()
    lines = (workdir / pretrain.METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(4, STEPS + 1, 4))


def test_a_preempted_run_exits_with_its_own_status(tmp_path):
    """SIGTERM during pretraining, through the entry point: saved, one line, exit 75 (not 0
    as a finished run, not 1 as a failure), so a scheduler can requeue it."""
    from slr_jax.main import EXIT_PREEMPTED

    overrides = [
        "--config.model.width=0.0625", "--config.dataset.crop_size=32",
        f"--config.dataset.manual_dir={tmp_path / 'synthetic'}", "--config.dataset.num_train=8",
        "--config.dataset.num_val=2", "--config.dataset.image_size=32",
        "--config.train.batch_size=4", "--config.train.log_every_steps=1",
        "--config.pretrain.steps=100000",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "slr_jax.main", "--config=configs/demo.py",
         f"--workdir={tmp_path / 'w'}", *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "backbone pretraining step 2/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, "".join(seen)[-3000:] + err[-3000:]
    assert "rerun the same command to resume" in out
    assert (tmp_path / "w" / pretrain.PROGRESS_DIR).is_dir()
