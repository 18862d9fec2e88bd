"""Training loop: schedule plan, the compiled step, checkpoints/resume/preemption, non-finite
losses and the entry point's config checks (device-count independence: test_data_parallel.py).

The runs use a tiny WSSS network on a few synthetic images. XLA:CPU needs a minute or more to
compile the train step, so every run here shares one config (same program) and a persistent
compilation cache; the multi-device check compiles only the training forward and loss.
"""

from __future__ import annotations

import ctypes
import importlib
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
from slr_jax import checkpoint, train  # noqa: E402
from slr_jax.bench.memory import current_rss  # noqa: E402
from slr_jax.config import ConfigError, validate_config  # noqa: E402

TOTAL_STEPS = 8  # 2 epochs of 4 steps; the seg loss starts at step 4


def tiny_config(tmp: Path):
    config = demo.get_config()
    # 21 classes and these sizes everywhere, so that the VOC-config test below compiles the
    # very same programs (persistent cache hits) instead of new ones.
    config.model.num_classes = 21
    config.model.width = 0.0625
    config.pretrain.steps = 0  # tests/test_pretrain.py covers the backbone pretraining
    config.loss.pamr_dilations = (1, 2)
    config.dataset.manual_dir = str(tmp / "synthetic")
    config.dataset.num_train = 8
    config.dataset.num_val = 2
    config.dataset.image_size = 40
    config.dataset.crop_size = 33
    config.train.batch_size = 2
    config.train.num_epochs = 2
    config.train.pretrain_epochs = 0
    config.train.log_every_steps = 2
    config.train.image_every_steps = 4
    config.checkpoint.every_steps = 3
    config.checkpoint.keep = 2
    config.test.scales = (1.0,)
    config.test.flip = False
    config.test.use_crf = True  # results.json then also holds the CRF scores
    return config


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory, xla_cache_dir):
    """A persistent XLA cache for this module (and its subprocess): one compile per program
    (the session's, tests/conftest.py, else a temporary one)."""
    folder = xla_cache_dir or tmp_path_factory.mktemp("xla_cache")
    previous = {
        name: getattr(jax.config, name)
        for name in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    }
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield folder
    for name, value in previous.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, compile_cache):
    """An uninterrupted run of TOTAL_STEPS steps, evaluated at the end."""
    tmp = tmp_path_factory.mktemp("full")
    config = tiny_config(tmp)
    return config, tmp / "workdir", train.train_and_evaluate(config, tmp / "workdir")


def _variables(workdir: Path) -> dict:
    return checkpoint.latest_variables(str(workdir), prefer_best=False)[0]


def test_plan_follows_the_reference_schedule():
    config = demo.get_config()
    plan = train.plan_steps(config.train, num_examples=256)
    assert plan.steps_per_epoch == 256 // config.train.batch_size
    assert plan.total_steps == config.train.num_epochs * plan.steps_per_epoch
    # Seg loss and cosine start after pretrain_epochs + 1 epochs (epoch > pretrain_epochs).
    assert plan.pretrain_steps == (config.train.pretrain_epochs + 1) * plan.steps_per_epoch
    config.train.total_steps = 100
    plan = train.plan_steps(config.train, num_examples=256)
    assert (plan.steps_per_epoch, plan.total_steps) == (100 // config.train.num_epochs, 100)
    config.train.total_steps = 1  # a smoke run: exactly one step, whatever num_epochs says
    plan = train.plan_steps(config.train, num_examples=256)
    assert (plan.steps_per_epoch, plan.total_steps) == (1, 1)
    with pytest.raises(train.TrainingError, match="batch_size"):
        train.plan_steps(demo.get_config().train, num_examples=3)


def test_run_trains_logs_checkpoints_and_evaluates(full_run):
    config, workdir, result = full_run
    assert result["step"] == TOTAL_STEPS and not result["preempted"]
    history = result["history"]
    assert [h["step"] for h in history] == [2, 4, 6, 8]
    for entry in history:
        assert all(np.isfinite(v) for v in entry.values()), entry
        assert entry["nonfinite"] == 0
    # The seg loss is off for the first epoch and on afterwards, in the same compiled step.
    assert [h["seg_weight"] for h in history] == [0.0, 0.0, 1.0, 1.0]
    assert history[0]["lr"] == pytest.approx(config.train.lr)
    assert history[-1]["lr"] < config.train.lr  # cosine phase
    assert 0.0 <= result["eval"]["miou"] <= 1.0
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 8]  # every 3 steps and at epoch ends (4, 8), keep the last 2
    assert any((workdir / "best").iterdir())
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (Path(result["eval"]["out_dir"]) / "pred").is_dir()
    results = json.loads((workdir / "results.json").read_text())
    assert 0.0 <= results["pseudo_label_miou"] <= 1.0
    assert results["miou"] == result["eval"]["miou"]
    assert len(results["per_class_iou"]) == 21 and "aeroplane" in results["per_class_iou"]
    assert 0.0 <= results["crf_miou"] <= 1.0 and len(results["crf_per_class_iou"]) == 21
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6, 8]
    assert all(x["loss"] == x["total"] for x in lines)


def test_frozen_parameters_do_not_move_and_heads_do(full_run, tmp_path):
    config, workdir, _ = full_run
    from slr_jax.models import build_model, init_variables

    initial = init_variables(build_model(config.model), jax.random.split(jax.random.key(0))[0])
    final = _variables(workdir)
    frozen = initial["params"]["backbone"]["conv1a"]["kernel"]
    np.testing.assert_array_equal(final["params"]["backbone"]["conv1a"]["kernel"], frozen)
    assert not np.allclose(
        final["params"]["last_conv"]["8"]["kernel"], initial["params"]["last_conv"]["8"]["kernel"]
    )
    # Head BatchNorm statistics move; the frozen backbone BatchNorm statistics do not, and
    # neither do the ASPP ones (running statistics, as in the reference).
    assert not np.allclose(
        final["batch_stats"]["fc8_skip"]["1"]["mean"],
        initial["batch_stats"]["fc8_skip"]["1"]["mean"],
    )
    np.testing.assert_array_equal(
        final["batch_stats"]["backbone"]["b3"]["bn_branch2a"]["mean"],
        initial["batch_stats"]["backbone"]["b3"]["bn_branch2a"]["mean"],
    )
    np.testing.assert_array_equal(
        final["batch_stats"]["aspp"]["bn1"]["mean"], initial["batch_stats"]["aspp"]["bn1"]["mean"]
    )


def test_preempted_run_resumes_to_the_same_weights(full_run, tmp_path):
    """SIGTERM -> save and stop; the same command then continues the same data stream."""
    config, full_workdir, _ = full_run
    config = tiny_config(tmp_path)
    workdir = tmp_path / "workdir"
    from slr_jax import data

    def interrupting(start):
        for count, batch in enumerate(data.train_dataset(config, start_position=start)):
            if count == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    first = train.train_and_evaluate(config, workdir, train_iterator_fn=interrupting)
    assert first["preempted"] and first["step"] == 6
    second = train.train_and_evaluate(config, workdir)
    assert second["step"] == TOTAL_STEPS and not second["preempted"]
    assert [h["step"] for h in second["history"]] == [8]
    resumed, full = _variables(workdir), _variables(full_workdir)
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, full)


def test_non_finite_loss_stops_with_a_clear_error_and_skips_the_update(
    tmp_path, compile_cache, monkeypatch
):
    config = tiny_config(tmp_path)
    releases = []  # the loop compiles its step ahead, then hands the compiler's memory back
    monkeypatch.setattr(train, "release_freed_host_memory", lambda: releases.append(1))
    from slr_jax import data

    def poisoned(start):
        for count, batch in enumerate(data.train_dataset(config, start_position=start)):
            if count == 1:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield batch

    with pytest.raises(train.TrainingError, match="non-finite terms: .*total.*max_nonfinite_steps"):
        train.train_and_evaluate(config, tmp_path / "w", train_iterator_fn=poisoned)
    # The last good state (step 2, the NaN update skipped) was checkpointed before stopping.
    kept = _variables(tmp_path / "w")
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(kept))
    config.train.max_nonfinite_steps = 1
    result = train.train_and_evaluate(config, tmp_path / "w2", train_iterator_fn=poisoned)
    assert result["history"][0]["nonfinite"] == 0.5  # one of the two logged steps skipped
    final = _variables(tmp_path / "w2")
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(final))
    assert len(releases) == 2  # once per run


def test_freed_heap_pages_go_back_to_the_os():
    """What XLA's compiler frees stays resident in glibc's heap while a live block lies above
    it; ``release_freed_host_memory`` gives those pages back."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "malloc_trim") or current_rss() is None:
        pytest.skip("needs glibc's malloc_trim and /proc")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    block = 64 << 10  # below glibc's mmap threshold: heap memory
    *freed, highest = sorted(libc.malloc(block) for _ in range(4096))  # 256 MiB
    for address in (*freed, highest):
        ctypes.memset(address, 1, block)
    for address in freed:  # the live highest block keeps free() from trimming the heap
        libc.free(address)
    before = current_rss()
    train.release_freed_host_memory()
    returned = before - current_rss()
    libc.free(highest)
    assert returned > 128 << 20, f"{returned / 2**20:.0f} MiB returned of 256 MiB freed"


def test_unknown_or_invalid_config_is_rejected_before_work():
    config = demo.get_config()
    with pytest.raises(AttributeError):
        config.train.lrr = 1.0  # locked: no new keys
    config = demo.get_config()
    config.model.variant = "wss"
    with pytest.raises(ConfigError, match="model.variant"):
        validate_config(config)
    config = demo.get_config()
    config.train.pretrain_epochs = config.train.num_epochs
    with pytest.raises(ConfigError, match="pretrain_epochs"):
        validate_config(config)
    config = demo.get_config()
    config.model.bn_stat_groups, config.train.batch_size = 3, 8
    with pytest.raises(ConfigError, match="batch_size=8 must be a multiple of model.bn_stat"):
        validate_config(config)
    validate_config(demo.get_config())


def test_voc_configs_keep_the_reference_per_gpu_head_batch_norm_statistics():
    """The reference's documented runs use nn.DataParallel on two GPUs: per-GPU statistics."""
    for name in ("voc", "voc_semi", "voc_semi_wo_cls", "coco"):
        config = importlib.import_module(f"configs.{name}").get_config()
        assert config.model.bn_stat_groups == 2, name
        validate_config(config)
    assert demo.get_config().model.bn_stat_groups == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.train.lrr=1"], "names no config key"),
        (["--config.train.batch_size=abc"], "batch_size"),
        (["--config.checkpoint.keep=0"], "checkpoint.keep=0 must be an integer >= 1"),
        (["--config=configs/nope.py"], "--config configs/nope.py cannot be loaded (["),
        (["--workdir={file}"], "is a file; pass a folder"),
    ],
)
def test_command_line_mistakes_end_in_one_line(args, message, tmp_path):
    """Every ordinary mistake: non-zero exit, one line naming the culprit, no traceback, and
    no work done (no checkpoint folder)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    args = [a.format(file=a_file) for a in args]
    workdir = [] if any(a.startswith("--workdir") for a in args) else [f"--workdir={tmp_path}"]
    config = [] if any(a.startswith("--config=") for a in args) else ["--config=configs/demo.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "slr_jax.main", *config, *workdir, *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_initial_weights_from_a_converted_backbone(tmp_path):
    """train.init_checkpoint: an ImageNet backbone file replaces only the backbone leaves; a
    checkpoint of the wrong shape is refused with the leaves listed."""
    from slr_jax.checkpoint import CheckpointError, save_variables
    from slr_jax.models import build_model, variable_shapes

    model = build_model(tiny_config(tmp_path).model)
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), variable_shapes(model))
    ones = jax.tree_util.tree_map(lambda x: np.ones_like(x), zeros)
    save_variables(tmp_path / "backbone", ones, {"source": "imagenet_backbone"})
    merged = checkpoint.load_initial_weights(zeros, str(tmp_path / "backbone"))
    for collection in ("params", "batch_stats"):
        assert all(
            np.all(x == 1) for x in jax.tree_util.tree_leaves(merged[collection]["backbone"])
        )
        heads = {k: v for k, v in merged[collection].items() if k != "backbone"}
        assert all(np.all(x == 0) for x in jax.tree_util.tree_leaves(heads))
    wide_cfg = tiny_config(tmp_path).model
    wide_cfg.width = 0.125
    wide = build_model(wide_cfg)
    wrong = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), variable_shapes(wide))
    save_variables(tmp_path / "wide", wrong, {"source": "imagenet_backbone"})
    with pytest.raises(CheckpointError, match="wrong shape"):
        checkpoint.load_initial_weights(zeros, str(tmp_path / "wide"))


def _fake_voc_config(name: str, tmp: Path):
    """configs/<name>.py pointed at a tiny VOC-layout folder (21 classes), tiny sizes."""
    import importlib

    from slr_jax.data.synthetic import write_synthetic_voc

    root = write_synthetic_voc(
        tmp / "VOC2012", num_train=8, num_val=2, size=40, num_classes=21, seed=1
    )
    config = importlib.import_module(f"configs.{name}").get_config()
    config.dataset.manual_dir = str(root)
    config.model.width = 0.0625
    config.loss.pamr_dilations = (1, 2)
    config.dataset.crop_size = 33
    config.train.batch_size = 2
    config.train.num_epochs = 2
    config.train.pretrain_epochs = 0
    config.train.lr = demo.get_config().train.lr  # same compiled step as tiny_config
    config.train.log_every_steps = 2
    config.test.scales = (1.0,)
    config.test.flip = False
    return config


@pytest.mark.parametrize("name", ["voc_semi", "voc_semi_wo_cls"])
def test_semi_configs_are_wired_to_the_voc_reader(name, tmp_path):
    """The semi settings read VOC with the pixel-labelled list marked (no compilation here;
    their objectives are covered by tests/test_losses.py and the parity tool)."""
    from slr_jax import data

    config = _fake_voc_config(name, tmp_path)
    validate_config(config)
    batch = next(data.train_dataset(config))
    assert batch["image"].shape == (2, 33, 33, 3) and batch["labels"].shape == (2, 20)
    assert batch["is_labeled"].all()  # the fake 'train' list is the whole training list
    plan = train.plan_steps(config.train, data.num_train_examples(config))
    assert plan.total_steps == 2 * (data.num_train_examples(config) // 2)


def test_voc_config_trains_on_a_tiny_fake_voc(tmp_path, compile_cache):
    """configs/voc.py end to end (8 steps and the evaluation) on a VOC-layout folder."""
    config = _fake_voc_config("voc", tmp_path)
    result = train.train_and_evaluate(config, tmp_path / "workdir")
    assert result["step"] == TOTAL_STEPS
    assert all(np.isfinite(h["total"]) for h in result["history"])
    results = json.loads((tmp_path / "workdir" / "results.json").read_text())
    assert "aeroplane" in results["per_class_iou"]


def test_main_evaluates_and_infers_from_a_training_workdir(full_run, compile_cache, tmp_path):
    """--mode=evaluate writes the score table files; --mode=infer labels photographs."""
    config, workdir, _ = full_run
    overrides = [
        "--config.model.num_classes=21",
        "--config.model.width=0.0625",
        f"--config.dataset.manual_dir={config.dataset.manual_dir}",
        "--config.dataset.num_train=8",
        "--config.dataset.num_val=2",
        "--config.dataset.image_size=40",
        "--config.test.scales=(1.0,)",
        "--config.test.flip=False",
        f"--config.compile_cache_dir={compile_cache}",  # this module's programs
    ]
    env = dict(os.environ)
    base = [sys.executable, "-m", "slr_jax.main", "--config=configs/demo.py", *overrides]
    run = lambda *args: subprocess.run(
        [*base, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    proc = run("--mode=evaluate", f"--checkpoint={workdir}", f"--output={tmp_path / 'eval'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mIoU" in proc.stdout or "miou" in proc.stdout.lower()
    scores = json.loads((tmp_path / "eval" / "scores_pred" / "scores.json").read_text())
    assert 0.0 <= scores["miou"] <= 1.0
    assert (tmp_path / "eval" / "scores_pred" / "scores.csv").read_text().startswith("class,")
    photos = Path(config.dataset.manual_dir) / "JPEGImages"
    proc = run("--mode=infer", f"--checkpoint={workdir}", f"--output={tmp_path / 'inf'}",
               f"--images={photos}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "inf" / "pred").glob("*.png"))) == len(list(photos.glob("*.jpg")))
    proc = run("--mode=infer", f"--checkpoint={tmp_path / 'missing'}", "--output=x")
    assert proc.returncode != 0 and "is not a folder" in proc.stderr
    # Without --config the workdir's own config.json supplies every setting, and overrides
    # still apply: the same label maps as above.
    proc = subprocess.run(
        [sys.executable, "-m", "slr_jax.infer", f"--checkpoint={workdir}",
         f"--output={tmp_path / 'own'}", f"--images={photos}", "--config.test.flip=False",
         f"--config.compile_cache_dir={compile_cache}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for png in (tmp_path / "inf" / "pred").glob("*.png"):
        assert (tmp_path / "own" / "pred" / png.name).read_bytes() == png.read_bytes()


# ----------------------------------------------------------------------------- resuming


def _overrides(config) -> list[str]:
    """``--config.KEY=VALUE`` flags that turn configs/demo.py into ``config``."""
    from slr_jax.config import flatten_keys

    base, mine = flatten_keys(demo.get_config()), flatten_keys(config)
    return [f"--config.{k}={v}" for k, v in mine.items() if v != base[k]]


def _copy_of_run(full_run, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    import shutil

    _, full_workdir, _ = full_run
    workdir = tmp_path / "workdir"
    shutil.copytree(full_workdir, workdir)
    files = {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    return workdir, files


def _unchanged(workdir: Path, files: dict[str, bytes]) -> bool:
    return all((workdir / name).read_bytes() == data for name, data in files.items())


def test_resume_with_a_changed_network_or_setting_stops_with_one_line(full_run, tmp_path):
    """The real command on a finished run's workdir: another model.width, or another config
    file (another setting), stops before any work with one line naming each changed key, its
    old and new value and the ways on; every file of the run stays byte for byte."""
    config, _, _ = full_run
    workdir, files = _copy_of_run(full_run, tmp_path)
    wide = tiny_config(tmp_path)
    wide.model.width = 0.125
    for config_file, flags in [
        ("configs/demo.py", _overrides(wide)),
        ("configs/demo_semi.py", _overrides(tiny_config(tmp_path))),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "slr_jax.main", f"--config={config_file}",
             f"--workdir={workdir}", *flags],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "damaged" not in errors[0]
        expected = "model.width 0.0625 -> 0.125" if "demo.py" in config_file else (
            "model.variant 'wsss' -> 'semi'")  # fmt: skip
        assert expected in errors[0], errors[0]
        assert "--allow_config_change=" in errors[0] and "new --workdir" in errors[0]
        assert _unchanged(workdir, files)


class _Stop(Exception):
    pass


def test_allowed_batch_size_change_resumes_at_the_recorded_example(full_run, tmp_path):
    """A batch-size change named in allow_config_change continues the data stream at the
    example the checkpoint recorded (step 6 x batch 2 = 12, not 6 x 4); config.json keeps the
    first config and records the change; metrics.jsonl loses the steps after the restored one
    instead of holding them twice."""
    from slr_jax.config import config_for_checkpoint

    workdir, _ = _copy_of_run(full_run, tmp_path)
    (workdir / "checkpoints" / "8").rename(tmp_path / "step_8_moved_away")  # resume from 6
    config = tiny_config(tmp_path)
    config.train.batch_size, config.train.total_steps = 4, 12
    starts = []

    def recording(start):
        starts.append(start)
        raise _Stop
        yield  # a generator: the loop asks it for the first batch

    with pytest.raises(ConfigError, match=r"train.batch_size 2 -> 4, train.total_steps 0 -> 12"):
        train.train_and_evaluate(config, workdir, train_iterator_fn=recording)
    assert starts == []
    allowed = ("train.batch_size", "train.total_steps")
    with pytest.raises(_Stop):
        train.train_and_evaluate(
            config, workdir, train_iterator_fn=recording, allow_config_change=allowed
        )
    assert starts == [12]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["batch_size"] == 4
    first, resumed = saved["history"]
    assert first["step"] == 0 and first["config"]["train"]["batch_size"] == 2
    assert resumed["step"] == 6 and resumed["changed"]["train.batch_size"] == [2, 4]
    assert config_for_checkpoint(str(workdir)).train.batch_size == 4


def test_checkpoints_of_another_network_are_not_called_damaged(full_run, tmp_path):
    """Restoring into a wider network (a config change let through) names the shapes and the
    config, and moves no step aside as damaged."""
    from types import SimpleNamespace

    from slr_jax.models import build_model, variable_shapes

    workdir, files = _copy_of_run(full_run, tmp_path)
    wide = tiny_config(tmp_path).model
    wide.width = 0.125
    shapes = variable_shapes(build_model(wide))
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    state = SimpleNamespace(**zeros, opt_state={}, step=np.int32(0), rng=np.zeros(2, np.uint32))
    checkpoints = checkpoint.TrainCheckpoints(str(workdir), tiny_config(tmp_path).checkpoint)
    try:
        with pytest.raises(checkpoint.CheckpointError, match="intact but were written by anoth"):
            checkpoints.restore_latest(state, train.make_mesh())
    finally:
        checkpoints.close()
    assert not (workdir / "damaged_checkpoints").exists() and _unchanged(workdir, files)


def test_a_stream_resumed_with_another_batch_size_continues_at_the_example(tmp_path):
    """Position 2 of the stream read with batch 4 gives examples 2..5 of the batch-2 stream:
    a resumed run with another batch size neither skips nor repeats an example."""
    from slr_jax import data

    config = tiny_config(tmp_path)
    stream = data.train_dataset(config)
    rows = np.concatenate([next(stream)["raw_image"] for _ in range(3)])
    config.train.batch_size = 4
    resumed = next(data.train_dataset(config, start_position=2))["raw_image"]
    np.testing.assert_array_equal(resumed, rows[2:6])
