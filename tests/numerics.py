"""The one closeness check of the numerical tests: max |a-b| against a tolerance relative to
max |ref|, failing with both figures quoted (the form docs/parity.md reports)."""

from __future__ import annotations

import numpy as np


def assert_close(ours, ref, rtol: float = 1e-5, what: str = "", atol: float = 0.0):
    """Asserts finite ``ours`` of ``ref``'s shape with max |a-b| <= atol + rtol * max |ref|.

    Returns ``(max_abs, rel)`` so a test can print or record the figures.
    """
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    assert np.all(np.isfinite(ours)), f"{what}: non-finite values"
    max_abs = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = max_abs / max(scale, 1e-30)
    assert max_abs <= atol + rtol * max(scale, 1e-30), (
        f"{what}: max |a-b| = {max_abs:.3g}, rel err = {rel:.3g} (rtol {rtol:g}, atol {atol:g})"
    )
    return max_abs, rel
