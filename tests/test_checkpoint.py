"""Variables checkpoints: round trip, metadata, and clear errors."""

import numpy as np
import pytest

from slr_jax.checkpoint import CheckpointError, check_tree_shapes, load_variables, save_variables


def test_round_trip(tmp_path):
    variables = {
        "params": {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
        "batch_stats": {"bn": {"mean": np.ones(3, np.float32)}},
    }
    save_variables(tmp_path / "ck", variables, {"variant": "wsss", "num_classes": 21})
    restored, meta = load_variables(tmp_path / "ck")
    np.testing.assert_array_equal(
        restored["params"]["a"]["kernel"], variables["params"]["a"]["kernel"]
    )
    np.testing.assert_array_equal(restored["batch_stats"]["bn"]["mean"], np.ones(3))
    assert meta == {"variant": "wsss", "num_classes": 21}


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_variables(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="slr_jax.convert"):
        load_variables(tmp_path / "empty")


def test_shape_check_lists_every_problem():
    expected = {"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros(1)}
    actual = {"a": np.zeros((3, 2)), "b": np.zeros(4), "d": np.zeros(1)}
    with pytest.raises(CheckpointError) as err:
        check_tree_shapes(expected, actual)
    msg = str(err.value)
    assert "missing: ['c']" in msg and "unexpected: ['d']" in msg
    assert "wrong shape: ['a'] expected (2, 3), got (3, 2)" in msg


def _train_state(value: float):
    import jax
    import optax

    from slr_jax.train import TrainState

    params = {"head": {"kernel": np.full((2, 3), value, np.float32)}}
    return TrainState.create(
        apply_fn=None, params=params, tx=optax.sgd(0.1, momentum=0.9),
        batch_stats={"bn": {"mean": np.full(3, value, np.float32)}},
        rng=jax.random.key_data(jax.random.key(0)),
    ).replace(step=np.int32(int(value)))  # fmt: skip


def _damage(step_dir):
    """Truncates every data file of a saved step to half its size."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 16]
    assert files
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_restore_falls_back_to_the_newest_intact_step(tmp_path, caplog):
    """A damaged newest checkpoint: resume from the previous step, say which step was skipped
    and why, keep the damaged files aside, and save that step number again afterwards."""
    import jax
    import ml_collections

    from slr_jax import checkpoint, sharding

    cfg = ml_collections.ConfigDict(dict(keep=3, async_save=False))
    saver = checkpoint.TrainCheckpoints(str(tmp_path), cfg)
    for value in (1.0, 2.0, 3.0):
        saver.save(_train_state(value), {"data_position": int(value)})
    saver.wait()
    saver.close()
    _damage(tmp_path / "checkpoints" / "3")
    resumer = checkpoint.TrainCheckpoints(str(tmp_path), cfg)
    with caplog.at_level("WARNING"):
        state, extra = resumer.restore_latest(_train_state(0.0), sharding.make_mesh())
    assert int(jax.device_get(state.step)) == 2 and extra == {"data_position": 2}
    np.testing.assert_array_equal(state.params["head"]["kernel"], np.full((2, 3), 2.0))
    assert "step 3" in caplog.text and "cannot be restored" in caplog.text
    assert (tmp_path / "damaged_checkpoints" / "3").is_dir()  # kept, not deleted
    assert 3 not in resumer.latest.all_steps()
    resumer.save(_train_state(3.0), {"data_position": 3})
    resumer.wait()
    assert 3 in resumer.latest.all_steps()
    resumer.close()
    # Every step damaged: one error naming them, not an Orbax traceback.
    for step in (1, 2, 3):
        _damage(tmp_path / "checkpoints" / str(step))
    broken = checkpoint.TrainCheckpoints(str(tmp_path), cfg)
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be restored .*step 3"):
        broken.restore_latest(_train_state(0.0), sharding.make_mesh())
    broken.close()


def test_workdir_variables_skip_a_damaged_best_checkpoint(tmp_path, caplog):
    import ml_collections

    from slr_jax import checkpoint

    cfg = ml_collections.ConfigDict(dict(keep=2, async_save=False))
    saver = checkpoint.TrainCheckpoints(str(tmp_path), cfg)
    saver.save(_train_state(4.0), {})
    saver.save_best(_train_state(5.0), 0.5, {"miou": 0.5})
    saver.wait()
    saver.close()
    variables, step = checkpoint.latest_variables(str(tmp_path))
    assert step == 5
    _damage(tmp_path / "best" / "5")
    with caplog.at_level("WARNING"):
        variables, step = checkpoint.latest_variables(str(tmp_path))
    assert step == 4 and "cannot be restored" in caplog.text
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"], np.full((2, 3), 4.0))


def test_a_checkpoint_of_other_settings_names_the_settings(tmp_path):
    """Not ~290 'wrong shape' lines: the settings that differ, read from the checkpoint."""
    import json

    from configs import common
    from slr_jax import checkpoint

    save_variables(tmp_path / "ck", {"params": {}}, {"variant": "wsss", "num_classes": 6,
                                                     "width": 0.125})  # fmt: skip
    model_cfg = common.get_config().model
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_model_variables(model_cfg, str(tmp_path / "ck"))
    message = str(err.value)
    assert "has model num_classes 6, width 0.125" in message
    assert "the config has model num_classes 21, width 1.0" in message
    assert "Drop --config" in message and "\n" not in message
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"model": {"variant": "semi", "width": 1.0}}))
    with pytest.raises(CheckpointError, match="has model variant 'semi'; the config has model "
                       "variant 'wsss'"):  # fmt: skip
        checkpoint.load_model_variables(model_cfg, str(workdir))


def test_shape_errors_are_counted_and_capped():
    expected = {f"leaf{i:03d}": np.zeros(2) for i in range(300)}
    actual = {f"leaf{i:03d}": np.zeros(3) for i in range(300)}
    with pytest.raises(CheckpointError) as err:
        check_tree_shapes(expected, actual)
    lines = str(err.value).splitlines()
    assert "(0 missing, 0 unexpected, 300 wrong-shaped leaves)" in lines[0]
    assert len(lines) == 14 and lines[-1] == "  ... and 288 more"
