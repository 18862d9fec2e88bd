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
