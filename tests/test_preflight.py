"""slr_jax.preflight: Cloud TPU slices compiled from this CPU machine with libtpu
(requirements-tpu.txt), nothing executed.

Pinned: accelerator-type names -> chips, hosts and HBM as Cloud TPU and libtpu lay them out;
a tiny SLRNet's evaluation programs for a one-host slice (v5e 2x2) and its train step and
evaluation programs for a 4-host slice (v5e 4x4), with their memory reports, collectives and the
batch split over hosts as ``launch/tpu_pod.sh`` starts them; a per-chip batch that cannot fit
refused with one ``error:`` line (exit 1); the ``--max-batch`` search; the persistent
compilation cache serving the second compilation of a program. The tiny network (width 1/32,
crop 17, one PAMR iteration) keeps every layer of the real one: the TPU compiler's time grows
with the number of operations far more than with their sizes (about 30 s of CPU for its train
step against 42 s at width 1/16, crop 33 and 47 s with the 10 PAMR iterations).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import PartitionSpec

from configs import demo
from slr_jax import config as config_lib
from slr_jax import main as main_lib
from slr_jax import preflight
from slr_jax.bench import compile_size
from slr_jax.sharding import data_sharded

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
# The smallest real SLRNet whose programs still have every layer and loss (see the docstring).
TINY = {
    "model.width": 1 / 32,
    "dataset.crop_size": 17,
    "dataset.image_size": 17,
    "loss.pamr_iters": 1,
    "loss.pamr_dilations": (1,),
    "model.dtype": "bfloat16",
    "test.bucket_sizes": (24,),  # exact padding 17 -> 24: one program per scale
}


def tiny_config(**overrides):
    config = demo.get_config()
    return config_lib.apply_overrides(config, {**TINY, **overrides})


def _flag(value):
    return repr(value) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize(
    "name, topology, chips, hosts, hbm_gib",
    [
        ("v5litepod-16", "v5e:4x4", 16, 4, 16),
        ("v5e-16", "v5e:4x4", 16, 4, 16),
        ("v5e-8", "v5e:2x4", 8, 1, 16),
        ("v5e:16x16", "v5e:16x16", 256, 64, 16),
        ("v6e-8", "v6e:2x4", 8, 1, 32),
        ("v5p-128", "v5p:4x4x4", 64, 16, 95),  # v5p and v4 count TensorCores, 2 per chip
        ("v5p-8", "v5p:2x2x1", 4, 1, 95),
        ("v4-32", "v4:2x2x4", 16, 4, 32),
        ("v4-8", "v4:2x2x1", 4, 1, 32),
    ],
)
def test_accelerator_types_are_the_slices_libtpu_lays_out(name, topology, chips, hosts, hbm_gib):
    tpu = preflight.parse_slice(name)
    assert (tpu.topology_name, tpu.chips, tpu.hosts) == (topology, chips, hosts)
    assert tpu.hbm_bytes == hbm_gib * GIB
    devices = tpu.devices()  # raises unless libtpu agrees on chips and hosts
    assert len(devices) == chips and len({d.process_index for d in devices}) == hosts


@pytest.mark.parametrize("name", ["v5e-2", "v4-7", "v5p-12", "tpu-8", "v5e:4x4x4", "v4:4x4"])
def test_unknown_slices_are_refused(name):
    with pytest.raises(preflight.TopologyError):
        preflight.parse_slice(name)


def test_per_chip_batch_that_cannot_fit_is_refused_with_one_line(tmp_path):
    """The command on the local CPU (the machine's RAM as its memory): backbone pretraining's
    step at 2**20 images per device needs terabytes. Exit 1, the last line of stderr names the
    program and the fixes, no traceback, the JSON report is written. (On a TPU slice the same
    verdict comes from memory_analysis or from the compiler's own out-of-memory refusal, which
    costs minutes of compiling even for the tiny network.)"""
    report_file = tmp_path / "report.json"
    overrides = [f"--config.{k}={_flag(v)}" for k, v in TINY.items()]
    command = [sys.executable, "-m", "slr_jax.preflight", "--config=configs/demo.py"]
    command += [*overrides, f"--config.train.batch_size={2**20}", "--programs=pretrain"]
    command += [f"--json={report_file}", f"--workdir={tmp_path}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pretrain_step needs "), last
    assert f"per-chip batch (now {2**20}" in last and "--config.model.dtype" not in last

    report = json.loads(report_file.read_text())
    assert (report["chips"], report["hosts"], report["fits"]) == (1, 1, False)
    (program,) = report["programs"]
    assert program["kind"] == "pretrain" and not program["fits"]
    assert program["temp_bytes"] > report["hbm_bytes_per_chip"]


@pytest.fixture
def private_cache(tmp_path):
    """Turns JAX's persistent compilation cache on in this test's own folder, as training does
    (``main.enable_compilation_cache``), and returns the folder; the session's comes back
    after."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    try:
        yield main_lib.enable_compilation_cache(tiny_config(), str(tmp_path))
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@pytest.mark.parametrize(
    "topology, chips, hosts, kinds",
    [
        # One host: the evaluation programs (its train step differs from the 4-host one only
        # in the all-reduce's replica groups; compiling it would double this test's time).
        ("v5e:2x2", 4, 1, ("eval",)),
        ("v5e:4x4", 16, 4, ("train", "eval")),
    ],
)
def test_programs_compile_for_one_and_four_hosts(topology, chips, hosts, kinds, private_cache):
    """Global batch 2 per chip: each host (one process, as launch/tpu_pod.sh starts them)
    feeds its contiguous rows of the global batch to its own chips. The slice's programs stay
    out of the persistent cache (libtpu's compile-only client cannot read them back)."""
    config = tiny_config(**{"train.batch_size": 2 * chips, "pretrain.steps": 0})
    tpu = preflight.parse_slice(topology)
    report = preflight.run_preflight(config, tpu, kinds=kinds, log=lambda *_: None)
    programs = report.pop("_reports")
    assert not os.path.isdir(private_cache) or not os.listdir(private_cache)
    assert jax.config.jax_enable_compilation_cache  # on again for local programs
    per_host = 2 * chips // hosts
    assert (report["chips"], report["hosts"], report["per_host_batch"]) == (chips, hosts, per_host)
    assert report["per_chip_batch"] == 2 and report["fits"] is True
    assert report["libtpu_topology"] == topology and report["hbm_bytes_per_chip"] == 16 * GIB

    mesh = report.pop("_target").mesh()
    rows = data_sharded(mesh).devices_indices_map((2 * chips, 17, 17, 3))
    for process in range(hosts):
        mine = [rows[d][0] for d in mesh.devices.flat if d.process_index == process]
        covered = sorted(r for s in mine for r in range(s.start, s.stop))
        assert covered == list(range(per_host * process, per_host * (process + 1)))
    assert data_sharded(mesh).spec == PartitionSpec("data")

    names = ["eval_padded_24@1"]  # forward, resize and sum of one scale (infer.predict)
    assert [p.name for p in programs] == ["train_step"] * ("train" in kinds) + names
    for program in programs:
        assert program.argument_bytes > 0 and program.output_bytes > 0
        assert program.code_bytes > 0 and program.flops > 0 and program.compile_s > 0
        assert 0 < program.peak_bytes < 16 * GIB and program.fits
        assert program.kind == ("train" if program.name == "train_step" else "eval")
    if "train" in kinds:
        train = programs[0]
        # The state is donated (outputs reuse its buffers); the gradients are all-reduced.
        assert train.alias_bytes > 0 and train.collectives["all-reduce"] > 0
    assert sum(programs[-1].collectives.values()) == 0  # each image on one chip


def test_eval_shapes_follow_the_scales_and_buckets():
    config = demo.get_config()
    config = config_lib.apply_overrides(config, {"test.scales": (1.0, 0.5, 1.5, 1.0)})
    assert preflight.eval_view_shapes(config) == [
        (1.0, (64, 64), (64, 64)),
        (0.5, (32, 32), (64, 64)),
        (1.5, (96, 96), (64, 64)),
    ]
    voc = config_lib.apply_overrides(demo.get_config(), {"dataset.name": "voc"})
    voc = config_lib.apply_overrides(voc, {"test.scales": (2.0,), "test.bucket_step": 64})
    assert preflight.eval_view_shapes(voc) == [(2.0, (1025, 1025), (500, 500))]
    assert preflight.eval_view_shapes(voc, [(300, 200)]) == [(2.0, (641, 449), (300, 200))]


def test_max_batch_search_ends_between_a_fit_and_a_misfit():
    """The search over compiled peaks, here of a known memory curve (no compiling)."""
    for base, per_image, limit in [(3, 2, 64), (10, 7, 100), (1, 1, 16), (60, 1, 64)]:

        def peak(b, base=base, per_image=per_image):
            return base + per_image * b + (b % 3 == 0)  # not quite linear

        best, peaks = preflight.max_batch_per_chip(peak, limit, start=2, limit=1000)
        expected = max((b for b in range(1, 1001) if peak(b) <= limit), default=0)
        assert best == expected and len(peaks) <= 8
        if best:
            assert peaks[best] <= limit and peaks[best + 1] > limit


def test_max_batch_searches_the_one_host_slice_of_the_generation(monkeypatch):
    """``--max-batch`` for v5e 4x4 compiles its probes on v5e 2x2 (the per-chip memory of the
    data-parallel step is the same), with the persistent cache off, and reports the largest
    per-chip batch that fits with every probe's peak. The train step's compile is replaced by
    a known memory curve (1 GiB + 1.5 GiB per image; test_programs_compile_for_one_and_four_hosts
    compiles the real one): 10 images fit in 16 GiB, 11 do not."""
    calls = []

    def known_curve(config, mesh, hbm_bytes):
        per_chip = int(config.train.batch_size) // mesh.size
        calls.append((mesh.size, per_chip, jax.config.jax_enable_compilation_cache))
        temp = per_chip * 3 * GIB // 2
        return preflight.ProgramReport(
            "train_step", "train", 1.0, GIB, temp, GIB, GIB, 0, 1.0, {}, False, hbm_bytes
        )

    monkeypatch.setattr(preflight, "train_program", known_curve)
    config = tiny_config(**{"train.batch_size": 32, "pretrain.steps": 0})
    tpu = preflight.parse_slice("v5e:4x4")
    report = preflight.run_preflight(config, tpu, kinds=(), max_batch=True, log=lambda *_: None)
    assert report["max_batch_per_chip"] == 10 and report["programs"] == []
    probe = report["max_batch_probe"]
    assert probe["topology"] == "v5e:2x2"
    assert probe["peak_bytes"]["10"] == 16 * GIB and probe["peak_bytes"]["11"] > 16 * GIB
    assert calls[0] == (4, 2, False) and all(c[0] == 4 and not c[2] for c in calls)
    assert jax.config.jax_enable_compilation_cache  # on again afterwards


def test_second_compilation_hits_the_persistent_cache(tmp_path, private_cache):
    """enable_compilation_cache (as training and evaluation use it) on the local CPU: the
    second compilation of the evaluation forward is read from the cache folder. (libtpu's
    compile-only client cannot read such entries back, so TPU preflights do not use it.)"""
    config = tiny_config()
    device = jax.devices()[0]
    first = preflight.eval_programs(config, device, None)
    second = preflight.eval_programs(config, device, None)
    assert private_cache == str(tmp_path / "compile_cache") and os.listdir(private_cache)
    assert first[0].name == second[0].name == "eval_padded_24@1"
    assert (first[0].cache_hit, second[0].cache_hit) == (False, True)
    assert first[0].code_bytes == second[0].code_bytes and np.isfinite(first[0].flops)


@pytest.mark.parametrize(
    "flag, message",
    [("--topology=v9-8", "is not a TPU slice"), ("--max_batch", "Unknown command line flag")],
)
def test_bad_flags_exit_2_with_one_line(flag, message):
    command = [sys.executable, "-m", "slr_jax.preflight", "--config=configs/demo.py", flag]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr.strip().splitlines()[-1]


def test_compile_size_lowers_the_train_step_it_preflights():
    """slr_jax.bench.compile_size measures the same abstract train step as the preflight
    (one definition), on a mesh of the slice's chips: lowered for a v5e 2x2 slice, the
    network's convolutions are in the text; a name that is no slice is refused."""
    report = compile_size.measure(tiny_config(), "v5e:2x2", lower_only=True)
    assert report["chips"] == 4
    assert report["convolutions"] > 100  # forward and backward of the two views
    assert report["text_chars"] > 100_000 and "compile_s" not in report
    with pytest.raises(preflight.TopologyError, match="not a TPU slice"):
        compile_size.measure(tiny_config(), "v5e-2x2", lower_only=True)
