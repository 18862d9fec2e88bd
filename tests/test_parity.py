"""Tests of slr_jax.parity: near-tie diagnostics and report formatting (fast, no reference),
and the full comparison against a PyTorch SLRNet checkout named by ``SLR_REFERENCE_REPO``."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from slr_jax import parity
from slr_jax.losses import code_consistency


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
def test_wsss_matches_reference(tmp_path):
    """The whole tool at a small crop: outputs, codes, losses and gradients (~2-5 min CPU)."""
    pytest.importorskip("torch")
    out = tmp_path / "parity.json"
    code = parity.main(["--reference-repo", REFERENCE, "--crop", "65", "--json", str(out)])
    report = json.loads(out.read_text())
    failed = [r["name"] for r in report["rows"] if not r["passed"]]
    assert code == 0 and report["passed"], failed
    names = [r["name"] for r in report["rows"]]
    for expected in ("train/codes", "train/codes2 (resized to view 1)",
                     "loss/code_consistency (tie-free)", "loss/seg"):  # fmt: skip
        assert expected in names
    assert sum(name.startswith("grad/") for name in names) == 7


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
