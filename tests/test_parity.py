"""Tests of slr_jax.parity: near-tie diagnostics and report formatting (fast, no reference),
and the full comparison against a PyTorch SLRNet checkout named by ``SLR_REFERENCE_REPO``."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slr_jax import convert, parity
from slr_jax.losses import code_consistency, slrnet_objective


def _codes_with_gaps(gaps, k=5, seed=0):
    """(1, len(gaps), 1, k) codes whose top-2 gap per pixel is ``gaps``, max at varying atoms."""
    rng = np.random.default_rng(seed)
    codes = np.zeros((1, len(gaps), 1, k), np.float64)
    for i, gap in enumerate(gaps):
        row = rng.uniform(0.0, 0.1, k)
        first, second = rng.choice(k, 2, replace=False)
        row[first], row[second] = 0.5 + gap, 0.5
        codes[0, i, 0] = row
    return codes


def test_near_ties_counts_pixels_below_eps():
    gaps = [0.0, 5e-7, 2e-6, 1e-3, 0.3]
    codes = _codes_with_gaps(gaps)
    np.testing.assert_allclose(parity.top2_gap(codes)[0, :, 0], gaps, atol=1e-12)
    assert parity.near_ties(codes, eps=1e-6) == 2
    assert parity.near_ties(codes, eps=1e-2) == 4
    np.testing.assert_array_equal(
        parity.near_tie_mask(codes, eps=1e-6)[0, :, 0], [True, True, False, False, False]
    )


def test_near_ties_rejects_single_atom():
    with pytest.raises(ValueError, match="at least 2 atoms"):
        parity.near_ties(np.zeros((1, 2, 2, 1)))


def test_jax_tie_mask_matches_numpy():
    codes = _codes_with_gaps([0.0, 3e-7, 4e-6, 0.2, 0.0, 1e-1], k=7, seed=3).astype(np.float32)
    ours = np.asarray(parity._near_tie_mask_jnp(jnp.asarray(codes), 1e-6))
    np.testing.assert_array_equal(ours, parity.near_tie_mask(codes, 1e-6))


def test_masked_code_consistency():
    rng = np.random.default_rng(1)
    codes = rng.uniform(size=(2, 3, 4, 6)).astype(np.float32)
    codes2 = rng.uniform(size=(2, 3, 4, 6)).astype(np.float32)
    everything = np.ones((2, 3, 4), bool)
    np.testing.assert_allclose(
        parity.masked_code_consistency(codes, codes2, everything),
        code_consistency(jnp.asarray(codes), jnp.asarray(codes2)),
        rtol=1e-6,
    )
    # Independent NumPy computation on the kept pixels only.
    keep = rng.uniform(size=(2, 3, 4)) > 0.4
    one_max = lambda c: np.where(c == c.max(-1, keepdims=True), c, 0.0)
    expected = np.abs(one_max(codes) - one_max(codes2))[keep].mean()
    got = parity.masked_code_consistency(codes, codes2, keep)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert float(parity.masked_code_consistency(codes, codes2, ~everything)) == 0.0


def test_canonical_name_resolves_reference_aliases():
    assert (
        parity.canonical_name("newly_added.6.transform1.weight")
        == "factorization_reconstruction.transform1.weight"
    )
    assert parity.canonical_name("newly_added.8.4.bias") == "aux_head.4.bias"
    assert parity.canonical_name("backbone.b4.bn_branch2a.weight") == (
        "backbone.b4.bn_branch2a.weight"
    )


def test_rounding_tolerances_and_worst_leaf():
    """Float32 rounding rule: a leaf may differ from the float64 reference by up to twice the
    float32 reference's own error (never less than GRAD_TOL); the worst leaf is the one
    furthest beyond its own allowance, not the largest error."""
    exact = {"a": np.array([1.0, -2.0, 3.0]), "b": np.array([4.0, 5.0])}
    ref32 = {"a": exact["a"] * (1 + 1e-3), "b": exact["b"] * (1 + 1e-6)}
    tols = parity.rounding_tolerances(ref32, exact)
    assert tols["a"] == pytest.approx(2e-3, rel=1e-6)
    assert tols["b"] == parity.GRAD_TOL

    within = {"a": exact["a"] * (1 - 1.5e-3), "b": exact["b"] * (1 + 8e-5)}
    row = parity._worst_leaf("grad", within, exact, tols)
    assert row.within_tol and row.name == "grad [b]" and row.tol == parity.GRAD_TOL
    beyond = {"a": exact["a"] * (1 - 1.5e-3), "b": exact["b"] * (1 + 2e-4)}
    row = parity._worst_leaf("grad", beyond, exact, tols)
    assert not row.within_tol and row.name == "grad [b]"
    assert row.rel == pytest.approx(2e-4, rel=1e-3)
    with pytest.raises(RuntimeError, match=r"without a JAX gradient: \['b'\]"):
        parity._worst_leaf("grad", {"a": exact["a"]}, exact)


def test_limited_rows_pass_with_their_own_status():
    row = parity.Row("grad/x", 1e-6, 2e-4, 1e-4, kind=parity.ROUNDING_LIMITED)
    assert row.passed and row.status == "rounding-limited"
    row.rel = 5e-5
    assert row.status == "pass"
    assert not parity.Row("grad/x", 1e-6, 2e-4, 1e-4).passed


def test_compare_reports_max_abs_and_relative_error():
    row = parity.compare("x", [1.0, 2.0, 2.0], [1.0, 2.0, 2.0 + 1e-3], 1e-5)
    assert row.max_abs == pytest.approx(1e-3)
    assert row.rel == pytest.approx(1e-3 / 3.0, rel=1e-3)
    assert row.status == "FAIL" and not row.passed
    with pytest.raises(ValueError, match=r"shape \(2,\) \(JAX\) vs \(3,\)"):
        parity.compare("x", np.zeros(2), np.zeros(3), 1e-5)


def _rows():
    return [
        parity.Row("test/masks", 1e-6, 2e-7, 1e-5),
        parity.Row("loss/code_consistency", 7e-7, 2e-4, 1e-5, "ties", parity.TIE_LIMITED),
        parity.Row("grad/total [a.weight]", 1e-8, 5e-5, 1e-4, "", parity.TIE_LIMITED),
        parity.Row("grad/frozen", 2.0, 0.0, np.inf, "ignored", parity.INFO),
    ]


META = dict(setting="wsss", crop=65, batch=2, seed=0, tie_eps=1e-6)


def test_report_table_and_json():
    report = parity.make_report(META, _rows(), {"run_s": 1.234})
    assert report["passed"]
    assert [r["status"] for r in report["rows"]] == ["pass", "tie-limited", "pass", "info"]
    assert report["timings"] == {"run_s": 1.23}
    assert json.loads(json.dumps(report)) == report
    table = parity.format_table(report)
    lines = table.splitlines()
    assert lines[0] == "setting=wsss crop=65 batch=2 seed=0 tie_eps=1e-06"
    code_line = next(line for line in lines if line.startswith("loss/code_consistency"))
    assert code_line.split()[1:] == ["7.000e-07", "2.000e-04", "1e-05", "tie-limited"]
    assert "    ties" in lines and lines[-1] == "PASSED"

    markdown = parity.format_markdown(report).splitlines()
    assert len(markdown) == 2 + len(_rows())
    assert (
        markdown[3]
        == "| `loss/code_consistency` | 7.00e-07 | 2.00e-04 | 1e-05 | tie-limited | ties |"
    )

    failing = _rows() + [parity.Row("loss/seg", 1e-3, 1e-3, 1e-5)]
    report = parity.make_report(META, failing, {})
    assert not report["passed"]
    assert parity.format_table(report).splitlines()[-1] == "FAILED"


def test_seed_reports_merge_into_one_that_passes_only_if_every_seed_passes():
    good = parity.make_report(dict(META, seed=0), _rows(), {"run_s": 1.0})
    bad = parity.make_report(
        dict(META, seed=3), _rows() + [parity.Row("loss/seg", 1e-3, 1e-3, 1e-5)], {"run_s": 2.0}
    )
    merged = parity.merge_seed_reports([good, bad])
    assert merged["seeds"] == [0, 3] and not merged["passed"] and "seed" not in merged
    assert merged["timings"] == {"run_s": 3.0}
    names = [r["name"] for r in merged["rows"]]
    assert names[0] == "seed 0/test/masks" and names[-1] == "seed 3/loss/seg"
    assert {k for r in merged["rows"] for k in r} >= {"name", "max_abs", "rel", "status"}
    assert parity.merge_seed_reports([good, good])["passed"]


def test_main_rejects_bad_seed_lists(capsys):
    for seeds in ("0,x", "1,1", ","):
        with pytest.raises(SystemExit):
            parity.main(["--reference-repo", ".", "--seeds", seeds])
        assert "--seeds" in capsys.readouterr().err


def test_main_rejects_a_path_that_is_not_a_checkout(tmp_path, capsys):
    pytest.importorskip("torch")
    assert parity.main(["--reference-repo", str(tmp_path), "--no-grads"]) == 2
    assert "git clone https://github.com/DesertsP/SLRNet" in capsys.readouterr().err


REFERENCE = os.environ.get("SLR_REFERENCE_REPO")


@pytest.mark.skipif(
    not REFERENCE,
    reason="set SLR_REFERENCE_REPO to a checkout of github.com/DesertsP/SLRNet (and install "
    "torch) to compare against the PyTorch reference",
)
def test_wsss_matches_reference_for_two_seeds(tmp_path):
    """The whole tool at a small crop, two draws of weights and inputs: outputs, codes, losses
    and gradients, every seed passing (~5-10 min CPU)."""
    pytest.importorskip("torch")
    out = tmp_path / "parity.json"
    args = ["--reference-repo", REFERENCE, "--crop", "65", "--seeds", "0,1", "--json", str(out)]
    code = parity.main(args)
    report = json.loads(out.read_text())
    failed = [r["name"] for r in report["rows"] if not r["passed"]]
    assert code == 0 and report["passed"] and report["seeds"] == [0, 1], failed
    for seed in (0, 1):
        prefix = f"seed {seed}/"
        names = [r["name"][len(prefix) :] for r in report["rows"] if r["name"].startswith(prefix)]
        for expected in ("train/codes", "train/codes2 (resized to view 1)",
                         "loss/code_consistency (tie-free)", "loss/seg"):  # fmt: skip
            assert expected in names, (seed, expected)
        assert sum(name.startswith("grad/") for name in names) >= 7


@pytest.mark.skipif(not REFERENCE, reason="set SLR_REFERENCE_REPO (see above)")
def test_float64_on_both_sides_agrees_to_1e_11_for_two_seeds(tmp_path):
    """float64 against float64: no row may exceed 1e-11, so any float32 excess is rounding."""
    pytest.importorskip("torch")
    out = tmp_path / "parity64.json"
    args = ["--reference-repo", REFERENCE, "--setting", "semi_wo_cls", "--crop", "49",
            "--batch", "2", "--dtype", "float64", "--seeds", "0,1", "--json", str(out)]  # fmt: skip
    code = parity.main(args)
    report = json.loads(out.read_text())
    assert code == 0 and report["passed"] and report["seeds"] == [0, 1]
    judged = [r for r in report["rows"] if r["status"] != "info" and r["tol"] > 0]
    assert judged and all(r["tol"] == 1e-11 and r["rel"] <= 1e-11 for r in judged)


def test_relu_kink_hook_reproduces_float64_gradient_from_float32():
    """The kink proof's machinery (``parity.kinks``) on a small network: with every ReLU
    switched as in the float64 run, our float32 gradient is within float32 rounding of the
    float64 one; the hook counts the inputs whose own sign differs, and leaves ``nn.relu`` as
    it was."""
    import flax.linen as nn

    from slr_jax.models import SLRNet, variable_shapes
    from slr_jax.parity import kinks

    model = SLRNet(variant="wsss", num_classes=5, width=0.0625, use_low_rank=False)
    rng = np.random.default_rng(0)

    def draw(s):  # He-scaled kernels, small biases/means, variances and scales near 1
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0
        scale = np.sqrt(2.0 / fan_in) if fan_in else 0.1
        return (scale * rng.normal(size=s.shape)).astype(np.float32)

    variables = jax.tree_util.tree_map(draw, variable_shapes(model))
    variables["batch_stats"] = jax.tree_util.tree_map(
        lambda a: np.abs(a) + 0.5, variables["batch_stats"]
    )
    image = rng.normal(size=(1, 33, 33, 3)).astype(np.float32)
    batch = dict(image=image, raw_image=np.abs(image) / 4, labels=np.ones((1, 4), np.float32),
                 mask=np.zeros((1, 33, 33), np.int32), is_labeled=np.zeros(1, bool))  # fmt: skip
    loss_cfg = parity.loss_config("wsss", 5)
    relu_before = nn.relu
    signs = kinks.float64_relu_signs(model, variables, batch)
    assert nn.relu is relu_before and len(signs) > 20 and all(s.dtype == bool for s in signs)
    forced, flips, worst = kinks.forced_sign_gradients(
        model, variables, batch, signs, loss_cfg, "wsss"
    )
    assert nn.relu is relu_before
    assert flips >= 0 and (flips == 0 or worst < 1e-3)
    # The same gradient in float64 (x64) with the network's own ReLUs.
    with jax.enable_x64(True):
        as64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
        model64 = model.clone(dtype=jnp.float64)
        batch64 = {k: jnp.asarray(v) for k, v in batch.items()}
        batch64["image"] = jnp.asarray(image, jnp.float64)
        batch64["raw_image"] = jnp.asarray(batch["raw_image"], jnp.float64)

        def objective(params):
            out = model64.apply({"params": params, "batch_stats": as64(variables["batch_stats"])},
                                batch64["image"], mode="train", train=False)  # fmt: skip
            _, terms, _ = slrnet_objective(out, batch64, loss_cfg=loss_cfg,
                                                  variant="wsss", seg_weight=1.0)  # fmt: skip
            return terms["total"] - 4.0 * terms["code_consistency"]

        exact = jax.jit(jax.grad(objective))(as64(variables["params"]))
    exact = convert.flax_to_torch({"params": exact})
    worst_rel = max(
        parity.compare(k, forced[k], v, 1e-4).rel for k, v in exact.items() if np.any(v)
    )
    assert worst_rel < 1e-4, worst_rel
