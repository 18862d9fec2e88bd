"""Every entry point ends a user's mistake in one ``error:`` line with the documented exit code
(slr_jax/cli.py: 1 user error, 2 bad flags, 75 preempted, 130 interrupted), and leaves the
user's files as they were.

The commands run for real in subprocesses; none of them reaches a compiled training step (the
training-run cases, resume checks included, live in tests/test_train.py beside its run).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import common  # noqa: E402
from slr_jax.config import KEY_RULES, flatten_keys  # noqa: E402
from slr_jax.workdir_lock import WorkdirLock  # noqa: E402

ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def run(*args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
        timeout=timeout, **kwargs,
    )  # fmt: skip


def one_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The single ``error:`` line of ``proc``, after checking the exit code, that the line
    holds every needle and that no traceback reached the terminal."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_every_config_key_has_one_rule():
    """The start-up check is table-driven: a key added to configs/common.py without a row in
    slr_jax.config.KEY_RULES (value rule + whether a resumed run may change it) fails here."""
    assert set(KEY_RULES) == set(flatten_keys(common.get_config()))
    assert all(kind in ("fixed", "safe") for _, kind in KEY_RULES.values())


def test_second_start_on_a_busy_workdir_fails_and_a_dead_holder_is_taken_over(tmp_path):
    """Two real processes: one holds WORKDIR's lock, the training command on the same workdir
    stops at once naming its pid and host, touching nothing; after kill -9 of the holder the
    lock is taken over (and the takeover names the dead holder)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("the user's own file")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(REPO)!r})
            from slr_jax.workdir_lock import WorkdirLock
            WorkdirLock({str(workdir)!r}).acquire()
            print("LOCKED", flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "LOCKED"
        before = snapshot(workdir)
        proc = run("-m", "slr_jax.main", "--config=configs/demo.py", f"--workdir={workdir}")
        one_error(proc, 1, f"pid {holder.pid} on host {os.uname().nodename}", "in use")
        assert snapshot(workdir) == before
    finally:
        holder.kill()  # SIGKILL: no chance to release anything
        holder.wait()
    lock = WorkdirLock(workdir).acquire()
    try:
        assert lock.took_over is not None and lock.took_over["pid"] == holder.pid
    finally:
        lock.release()
    assert (workdir / "notes.txt").read_text() == "the user's own file"


@pytest.mark.parametrize(
    "args, code, needles",
    [
        # A config file with a syntax error (written below), before anything is imported.
        (["--config={bad}"], 1, ["bad_config.py cannot be loaded (line 2: '{' was never closed)"]),
        # Values that used to fail later inside TensorFlow or after training, all named at once.
        (
            ["--config.dataset.crop_size=-3", "--config.test.scales=()",
             "--config.test.resize=lanczos"],
            1,
            ["dataset.crop_size=-3 must be an integer >= 16", "test.scales=() must hold",
             "test.resize='lanczos' not in"],
        ),
        (["--allow_config_change=model.widht"], 2, ["names no config key: model.widht"]),
        (["stray_argument"], 2, ["unexpected arguments ['stray_argument']"]),
    ],
)  # fmt: skip
def test_training_command_mistakes_end_in_one_line(args, code, needles, tmp_path):
    bad = tmp_path / "bad_config.py"
    bad.write_text("def get_config():\n    return {\n")
    args = [a.format(bad=bad) for a in args]
    config = [] if any(a.startswith("--config=") for a in args) else ["--config=configs/demo.py"]
    workdir = tmp_path / "run"
    proc = run("-m", "slr_jax.main", *config, f"--workdir={workdir}", *args)
    one_error(proc, code, *needles)
    assert not (workdir / "checkpoints").exists()


def test_other_entry_points_share_the_exit_codes(tmp_path):
    """convert, infer, data.build and parity: a missing or foreign file is one line naming it
    (1), a bad flag is one line (2); a failed build leaves no folder behind."""
    text = tmp_path / "weights.pth"
    text.write_text("not weights, a text file renamed .pth\n")
    proc = run("-m", "slr_jax.convert", f"--torch={text}", f"--out={tmp_path / 'out'}")
    line = one_error(proc, 1, str(text), "is not a PyTorch checkpoint")
    assert "weights_only" not in line and not (tmp_path / "out").exists()
    missing = tmp_path / "no_such_run"
    proc = run("-m", "slr_jax.infer", f"--checkpoint={missing}", f"--output={tmp_path / 'o'}")
    one_error(proc, 1, f"--checkpoint {missing} does not exist")
    manual, data = tmp_path / "manual", tmp_path / "tfds"
    manual.mkdir()
    proc = run("-m", "slr_jax.data.build", "voc_sbd", f"--manual_dir={manual}",
               f"--data_dir={data}")  # fmt: skip
    one_error(proc, 1, "building voc_sbd failed")
    assert not data.exists(), sorted(map(str, data.rglob("*")))
    proc = run("-m", "slr_jax.parity", "--reference-repo=.", "--seeds=1,1")
    one_error(proc, 2, "--seeds")


_CTRL_C_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from slr_jax.checkpoint import Preemption
with Preemption() as preemption:
    print("READY", flush=True)
    while not preemption.requested:
        time.sleep(0.01)
    print("SAVING", flush=True)  # a training loop saves here; this one takes its time
    time.sleep(600)
"""


def test_ctrl_c_asks_for_a_save_and_a_second_ctrl_c_exits_at_once():
    """The first SIGINT sets the same flag as SIGTERM (the loop saves, then exits 75) and says
    how to stop at once; the second ends the process at once (the kernel's default action for
    SIGINT, status 130 in a shell), without a traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CTRL_C_SCRIPT.format(repo=str(REPO))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == "SAVING"
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - start < 30
    assert proc.returncode == -signal.SIGINT, err[-3000:]
    assert "Ctrl-C again stops at once" in err and "Traceback" not in err, err[-3000:]


_SAVE_SCRIPT = """
import dataclasses, sys
sys.path.insert(0, {repo!r})
import ml_collections, numpy as np
from slr_jax import cli
from slr_jax.checkpoint import TrainCheckpoints

@dataclasses.dataclass
class State:
    params: dict
    batch_stats: dict
    opt_state: dict
    step: np.ndarray
    rng: np.ndarray
    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

def state(step):
    w = np.random.default_rng(step).standard_normal({size}).astype(np.float32)
    zero = np.zeros(3, np.float32)
    return State({{"w": w}}, {{"m": zero}}, {{"o": zero}}, np.int32(step), np.zeros(2, np.uint32))

def main():
    if {inject!r}:  # the fault a full disk raises inside TensorStore, injected into the save
        import orbax.checkpoint as ocp
        save = ocp.CheckpointManager.save
        def failing(self, step, *a, **k):
            if step == 3:
                raise ValueError("RESOURCE_EXHAUSTED: Failed to write 4096 bytes: No space "
                                 "left on device [os_error_code='28']")
            return save(self, step, *a, **k)
        ocp.CheckpointManager.save = failing
    cli.log_to_file({log!r})
    config = ml_collections.ConfigDict(dict(keep=5, async_save=True, every_steps=1))
    checkpoints = TrainCheckpoints({workdir!r}, config)
    try:
        for step in (1, 2, 3):
            checkpoints.save(state(step), {{"data_position": step}})
            if step == 2:
                checkpoints.wait()
                print("SAVED2", flush=True)
        checkpoints.wait()
    finally:
        checkpoints.close()

cli.run_cli(main)
"""


def _full_disk_run(workdir: Path, log: Path, inject: bool, size: int) -> None:
    script = _SAVE_SCRIPT.format(
        repo=str(REPO), workdir=str(workdir), log=str(log), inject=inject, size=size
    )
    proc = run("-c", script)
    line = one_error(proc, 1, f"cannot write a checkpoint to {workdir / 'checkpoints'}",
                     "No space left on device", " free", "step 2", "is intact")  # fmt: skip
    assert "SAVED2" in proc.stdout, line
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(workdir / "checkpoints") as manager:  # step 2 reads back whole
        assert 2 in manager.all_steps() and 3 not in manager.all_steps()
        restored = manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
            "state"
        ]
    expected = np.random.default_rng(2).standard_normal(size).astype(np.float32)
    np.testing.assert_array_equal(restored["params"]["w"], expected)
    assert "Traceback" in log.read_text()  # the library's traceback went to the log file
    assert not list((workdir / "checkpoints").glob("*tmp*")), "partial save left behind"


def test_full_disk_during_a_save_is_one_line_after_the_previous_step_reads_back(tmp_path):
    """A save that fails for lack of space (injected: TensorStore's own error text) stops with
    one line naming the folder and the free space, once the previous step is confirmed intact;
    the library's background-thread tracebacks go to the log file, not the terminal."""
    _full_disk_run(tmp_path / "run", tmp_path / "train.log", inject=True, size=1000)


def test_full_disk_on_a_real_small_file_system(tmp_path):
    """The same on a 7 MiB tmpfs that two 2.8 MB steps fill (mounting needs root). During the
    failed save a TensorStore thread may raise asyncio's "Event loop is closed"; the CLI's
    thread hook sends that to the log, so the terminal still shows one line."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the injected fault test covers the path")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()})")
    try:
        _full_disk_run(mount / "run", tmp_path / "train.log", inject=False, size=700_000)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
