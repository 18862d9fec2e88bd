"""The benchmark (``python -m slr_jax.bench``): a tiny run end to end, its JSON report, its
argument checks and helpers; with ``SLR_REFERENCE_REPO`` also a tiny run against the reference.

XLA:CPU compiles the train step slowly (minutes at any width: the time goes with the number of
ops), so the tiny runs keep one scale of inference and use the session's persistent compilation
cache (tests/conftest.py; a temporary folder when that is turned off): the first session
compiles, later ones load the executables.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from slr_jax import bench

# The smallest run: crop 33, batch 2, one warm-up call, one inference scale.
SMALL = ["--config.test.scales=(1.0,)", "--crop", "33", "--batch", "2", "--warmup", "1"]
SMALL += ["--infer-size", "33"]
TINY = [
    *SMALL,
    "--config.model.width=0.0625",
    "--config.loss.pamr_dilations=(1, 2)",
    "--steps",
    "2",
    # LLVM at -O0: the cold compile of the step takes about 2.5x less time; speed is not tested.
    "--xla-option",
    "xla_backend_optimization_level=0",
]


@pytest.fixture(scope="module")
def xla_cache(xla_cache_dir):
    folder = xla_cache_dir or os.path.join(tempfile.gettempdir(), "slr_jax_test_xla_cache")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    yield folder
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # later modules must not write into this folder


def _run(tmp: Path, args: list[str], cache: str) -> dict:
    out = tmp / "bench.json"
    assert bench.main([*args, "--xla-cache-dir", cache, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory, xla_cache):
    return _run(tmp_path_factory.mktemp("bench"), TINY, xla_cache)


def test_tiny_run_reports_every_figure(tiny_report):
    r = tiny_report
    assert r["crop"] == 33 and r["batch"] == 2 and r["dtype"] == "float32"
    assert r["width"] == 0.0625 and r["scales"] == [1.0] and r["flip"] is True
    assert len(r["train_step_times_s"]["slr_jax"]) == 2
    assert len(r["infer_times_s"]["slr_jax"]) == 2
    for key in ("train_step_s", "infer_s"):
        assert _positive(r[key]["slr_jax"]), (key, r[key])
        assert r[key]["reference"] is None
    assert r["train_step_ratio"] is None and r["infer_ratio"] is None
    # The step times are a median of the timed calls.
    times = sorted(r["train_step_times_s"]["slr_jax"])
    assert r["train_step_s"]["slr_jax"] == pytest.approx(sum(times) / 2)
    compile_s = r["compile_s"]
    for key in ("slr_jax_train_lower", "slr_jax_train_xla_compile"):
        assert _positive(compile_s[key]), (key, compile_s)
    assert math.isfinite(compile_s["slr_jax_train"]) and math.isfinite(compile_s["slr_jax_infer"])
    # A real step ran: its loss is finite, and XLA counted its FLOPs.
    assert math.isfinite(r["final_loss"]["slr_jax"])
    assert _positive(r["flops"]["train_step"]) and _positive(r["flops"]["achieved_tflops"])
    assert r["flops"]["peak_bf16_tflops"] is None and r["flops"]["mfu"] is None  # CPU
    for key in ("slr_jax_train", "slr_jax_infer"):
        entry = r["memory"][key]
        assert entry["bytes"] is None or entry["bytes"] >= 0, entry
        assert entry["kind"]
    assert r["memory"]["process_peak_rss_bytes"] > 0
    # Every VOC-like size pads to 512 x 512: one program per scale, one scale here.
    assert r["eval_programs_compiled"] == 1
    # On CPU the train step's memory comes from a process of its own (comparable figures).
    own = r["memory"]["slr_jax_train"]
    assert own["kind"] == bench.process_memory.PROCESS_KIND and own["bytes"] > 0, own
    assert own["baseline_bytes"] > own["bytes"] / 100
    # ... and so does each side's step time alone (no reference here: no ratio).
    alone = r["train_own_process_times_s"]["slr_jax"]
    assert len(alone) == 2 and all(t > 0 for t in alone), alone
    assert r["train_own_process_s"]["slr_jax"] == pytest.approx(sum(alone) / 2)
    assert r["train_own_process_s"]["reference"] is None
    assert r["train_own_process_ratio"] is None
    assert r["device"]["jax_backend"] == "cpu" and r["device"]["num_devices"] >= 1
    assert r["versions"]["jax"] == jax.__version__
    assert r["overrides"]["model.width"] == "0.0625"


def test_bad_arguments_are_refused_with_a_reason(capsys):
    cases = [
        (["--crop", "8"], "--crop >= 33"),
        (["--config.model.widht=1"], "unknown config key 'model.widht'"),
        (["--config.model.width=wide"], "expected a number"),
        (["--config", "configs/nope.py"], "not found"),
        (["--crop", "33", "--reference-repo", "/nonexistent"], "models/slrnet.py"),
        (["--bogus"], "unrecognised argument"),
    ]
    for args, message in cases:
        assert bench.main(args) == 2, args
        assert message in capsys.readouterr().err, args


def test_reference_needs_the_reference_architecture(tmp_path, capsys):
    args = ["--config.model.width=0.5", "--reference-repo", str(tmp_path / "missing")]
    assert bench.main(args) == 2
    assert "width 1.0" in capsys.readouterr().err


def test_config_overrides_are_typed():
    config = bench.load_config(
        "configs/voc.py",
        [
            ("model.width", "0.25"),
            ("test.scales", "(1.0, 0.5)"),
            ("test.flip", "false"),
            ("model.num_iters", "3"),
            ("loss.pamr_dilations", "[1, 2]"),
        ],
    )
    assert config.model.width == 0.25 and config.model.num_iters == 3
    assert config.test.scales == (1.0, 0.5) and config.test.flip is False
    assert tuple(config.loss.pamr_dilations) == (1, 2)
    with pytest.raises(bench.BenchError, match="model.num_iters"):
        bench.load_config("configs/voc.py", [("model.num_iters", "1.5")])


def test_peak_table_and_alternation():
    assert bench.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert bench.peak_bf16_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert bench.peak_bf16_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert bench.peak_bf16_tflops("TPU v4") == pytest.approx(275.0)
    assert bench.peak_bf16_tflops("TPU v5 lite") == pytest.approx(197.0)
    assert bench.peak_bf16_tflops("TPU v5p") == pytest.approx(459.0)
    assert bench.peak_bf16_tflops("cpu") is None
    calls = []
    out = bench.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 1, 2)
    assert calls == ["a", "b"] * 3
    assert all(len(v["times_s"]) == 2 and v["median_s"] >= 0 for v in out.values())


def test_against_the_reference(reference_repo, tmp_path, xla_cache):
    args = [*SMALL, "--steps", "1", "--reference-repo", str(reference_repo)]
    r = _run(tmp_path, args, xla_cache)
    assert r["width"] == 1.0 and r["device"]["reference"] in ("cpu", "cuda")
    for key in ("train_step_s", "infer_s"):
        assert _positive(r[key]["slr_jax"]) and _positive(r[key]["reference"]), r[key]
    assert r["train_step_ratio"] == pytest.approx(
        r["train_step_s"]["slr_jax"] / r["train_step_s"]["reference"]
    )
    assert r["infer_ratio"] == pytest.approx(r["infer_s"]["slr_jax"] / r["infer_s"]["reference"])
    alone = r["train_own_process_s"]
    assert _positive(alone["slr_jax"]) and _positive(alone["reference"]), alone
    assert r["train_own_process_ratio"] == pytest.approx(alone["slr_jax"] / alone["reference"])
    assert math.isfinite(r["final_loss"]["reference"])
    assert r["memory"]["reference_train"]["kind"]


def _tiny_side(batch: int) -> bench.JaxSide:
    config = bench.load_config(
        "configs/voc.py", [("model.width", "0.0625"), ("loss.pamr_dilations", "(1, 2)")]
    )
    with config.ignore_type():
        config.train.batch_size, config.dataset.crop_size = batch, 33
        config.train.init_checkpoint = ""
    inputs = bench.make_inputs(batch, 33, int(config.model.num_classes), 0)
    return bench.JaxSide(config, inputs, 0)


def test_flop_count_is_global_and_survives_a_release_without_lowered_analysis(monkeypatch):
    counts = {}
    for batch in (2, 4):
        side = _tiny_side(batch)
        counts[batch] = bench.count_train_step_flops(side.config, side.plan, side.state, side.batch)
    assert _positive(counts[2]) and _positive(counts[4])
    # Global batch: twice the images, about twice the work (the parameter update is shared).
    assert 1.8 < counts[4] / counts[2] < 2.0001, counts
    # When the lowered program cannot be analysed, the CPU-compiled one is: the same count up to
    # the elementwise ops XLA rewrites (5% at this width; 0.1% at full width, where the
    # convolutions dominate: 3560 vs 3564 GFLOP at crop 321, batch 2).
    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
    side = _tiny_side(2)
    fallback = bench.count_train_step_flops(side.config, side.plan, side.state, side.batch)
    assert _positive(fallback)
    assert abs(fallback - counts[2]) / counts[2] < 0.1, (fallback, counts[2])
