"""Rows of the parity report (one compared quantity each), their kinds and the report's JSON
and text forms."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import jax
import numpy as np

# Row kinds: "check" rows decide the exit status; "tie-limited" and "rounding-limited" rows are
# checks whose excess is explained by argmax near-ties or by float32 rounding (see the package
# docstring); "info" rows are never judged.
CHECK, TIE_LIMITED, ROUNDING_LIMITED, INFO = "check", "tie-limited", "rounding-limited", "info"
LIMITED_KINDS = (TIE_LIMITED, ROUNDING_LIMITED)


@dataclass
class Row:
    name: str
    max_abs: float
    rel: float
    tol: float
    note: str = ""
    kind: str = CHECK

    @property
    def within_tol(self) -> bool:
        return bool(np.isfinite(self.rel) and self.rel <= self.tol)

    @property
    def passed(self) -> bool:
        return self.kind != CHECK or self.within_tol

    @property
    def status(self) -> str:
        if self.kind == INFO:
            return "info"
        if self.within_tol:
            return "pass"
        return self.kind if self.kind in LIMITED_KINDS else "FAIL"


def compare(name: str, ours, theirs, tol: float, note: str = "") -> Row:
    a = np.asarray(ours, np.float64)
    b = np.asarray(theirs, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{name}: shape {a.shape} (JAX) vs {b.shape} (PyTorch)")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    norm = float(np.linalg.norm(b))
    rel = float(np.linalg.norm(a - b) / norm) if norm > 0 else diff
    return Row(name, diff, rel, tol, note)


def add_note(row: Row, text: str) -> None:
    """Appends ``text`` to the row's note ("; "-separated)."""
    row.note = (row.note + "; " if row.note else "") + text


def make_report(meta: dict, rows: list[Row], timings: dict) -> dict:
    """The JSON-able report: ``meta`` keys, ``rows`` (with ``status`` and ``passed``),
    overall ``passed``, ``timings`` (seconds) and the machine."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        **meta,
        "rows": [dict(asdict(r), status=r.status, passed=r.passed) for r in rows],
        "passed": all(r.passed for r in rows),
        "timings": {k: round(float(v), 2) for k, v in timings.items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "torch": torch_version,
        },
        "date": time.strftime("%Y-%m-%d"),
    }


def format_table(report: dict) -> str:
    """Plain-text table of a report from ``run`` / ``make_report``."""
    keys = ("setting", "crop", "batch", "seed", "tie_eps", "dtype")
    meta = " ".join(f"{k}={report[k]}" for k in keys if k in report)
    lines = [meta, f"{'quantity':<62} {'max |a-b|':>10} {'rel err':>10} {'tol':>7}  status"]
    for r in report["rows"]:
        lines.append(f"{r['name']:<62} {r['max_abs']:>10.3e} {r['rel']:>10.3e} {r['tol']:>7.0e}"
                     f"  {r['status']}")  # fmt: skip
        if r["note"]:
            lines.append(f"    {r['note']}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """Markdown table of a report (as in docs/parity.md); notes go into the last column."""
    lines = [
        "| quantity | max abs err | rel err | tol | status | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        note = r["note"].replace("|", "\\|")
        lines.append(f"| `{r['name']}` | {r['max_abs']:.2e} | {r['rel']:.2e} | {r['tol']:.0e} "
                     f"| {r['status']} | {note} |")  # fmt: skip
    return "\n".join(lines)


def merge_seed_reports(reports: list[dict]) -> dict:
    """One report of several seeds' (same setting): every row, named ``seed S/<name>``;
    ``passed`` only if every seed passed; ``seeds`` lists them, ``timings`` are summed."""
    first = reports[0]
    rows, timings = [], {}
    for report in reports:
        rows += [dict(r, name=f"seed {report['seed']}/{r['name']}") for r in report["rows"]]
        for k, v in report["timings"].items():
            timings[k] = round(timings.get(k, 0.0) + v, 2)
    merged = {k: v for k, v in first.items() if k not in ("rows", "passed", "timings", "seed")}
    return dict(merged, seeds=[r["seed"] for r in reports], rows=rows,
                passed=all(r["passed"] for r in reports), timings=timings)  # fmt: skip
