"""launch/: the printed plans (--dry-run), real runs against stand-in gcloud/srun/scontrol
programs and stand-in training modules, clear errors for missing options, and shellcheck."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU = LAUNCH / "tpu_pod.sh"
SLURM = LAUNCH / "slurm_gpu.sbatch"
LOCAL = LAUNCH / "local_multiprocess.sh"
SCRIPTS = [LAUNCH / "common.sh", TPU, SLURM, LOCAL]
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]

# Overrides that must reach slr_jax.main unchanged through every level of shell quoting.
TRICKY_SETS = [
    "train.batch_size=64",
    "dataset.manual_dir=/mnt/my data",
    "test.scales=(1.0, 0.5, 2)",
    "model.name=it's",
]
TRICKY_FLAGS = [
    "--config.train.batch_size=64",
    "--config.dataset.manual_dir=/mnt/my data",
    "--config.test.scales=(1.0, 0.5, 2)",
    "--config.model.name=it's",
]


def _bash(script, *args, env=None, cwd=None, timeout=60):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLR_", "SLURM_"))}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


def _commands(stdout):
    """The plan's command lines (comments dropped), each split as a POSIX shell splits it."""
    return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def _find(commands, prefix):
    found = [c for c in commands if c[: len(prefix)] == prefix]
    assert found, f"no command starting with {prefix} in {commands}"
    return found


def _remote(cmd):
    """The --command=... string of a gcloud ssh command line."""
    (arg,) = [a for a in cmd if a.startswith("--command=")]
    return arg[len("--command=") :]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _executable(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _head_commit():
    return subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True).strip()


def _pinned_jax():
    text = subprocess.check_output(
        ["git", "-C", str(REPO), "show", "HEAD:requirements.txt"], text=True
    )
    (line,) = [line for line in text.splitlines() if line.startswith("jax==")]
    return line.split("==")[1].strip()


needs_git = pytest.mark.skipif(
    subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode,
    reason="the repository is not a git checkout",
)


# ---- tpu_pod.sh -------------------------------------------------------------------------------


@needs_git
def test_tpu_dry_run_prints_every_step(tmp_path):
    args = ["--dry-run", "--name", "slr-test", "--zone", "us-central2-b", "--project=my-proj"]
    args += ["--accelerator-type", "v4-32", "--spot", "--workdir", "gs://bucket/slr run"]
    args += ["--log-dir", str(tmp_path / "logs"), "--env", "TF_CPP_MIN_LOG_LEVEL=2"]
    for kv in TRICKY_SETS:
        args += ["--set", kv]
    args += ["all", "logs", "stop", "delete", "--", "--mode=train", "--config.seed=3"]
    result = _bash(TPU, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    loc = ["--zone=us-central2-b", "--project=my-proj"]

    # First, on this machine: the run's programs compiled for the slice, the run's overrides.
    assert cmds[0] == ["python3", "-m", "slr_jax.preflight", "--config=configs/voc.py"] + [
        "--topology=v4-32",
        *TRICKY_FLAGS,
        "--config.seed=3",
    ]

    describe = _find(cmds, GCLOUD_TPU + ["describe"])[0]
    assert describe == GCLOUD_TPU + [
        "describe",
        "slr-test",
        *loc,
        "--format=value(state,acceleratorType)",
    ]
    create = _find(cmds, GCLOUD_TPU + ["create"])
    assert create == [
        GCLOUD_TPU
        + ["create", "slr-test", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
        + ["--spot", *loc]
    ]
    (archive,) = _find(cmds, ["git", "-C", str(REPO), "archive"])
    assert archive[-1] == _head_commit()
    tarball = archive[archive.index("-o") + 1]
    scp = _find(cmds, GCLOUD_TPU + ["scp"])
    assert scp == [
        GCLOUD_TPU + ["scp", tarball, "slr-test:slr_jax_code.tar.gz", "--worker=all", *loc]
    ]

    ssh = _find(cmds, GCLOUD_TPU + ["ssh"])
    ssh_only = [c[: c.index("2>&1")] if "2>&1" in c else c for c in ssh]  # drop the local tee
    assert all(c[5] == "slr-test" and "--worker=all" in c and c[-2:] == loc for c in ssh_only)
    copy, setup, train, logs, stop = (_remote(c) for c in ssh)
    assert "tar -xzf slr_jax_code.tar.gz -C slr_jax" in copy
    setup_words = shlex.split(setup)
    assert f"jax[tpu]=={_pinned_jax()}" in setup_words
    assert setup_words[setup_words.index("-r") + 1] == "slr_jax/requirements.txt"
    assert "https://storage.googleapis.com/jax-releases/libtpu_releases.html" in setup_words

    words = shlex.split(train)
    start = words.index("~/slr_venv/bin/python")
    end = words.index("2>&1")
    assert words[start - 3 : start] == ["env", "PYTHONUNBUFFERED=1", "TF_CPP_MIN_LOG_LEVEL=2"]
    assert words[start + 1 : end] == [
        "-m",
        "slr_jax.main",
        "--config=configs/voc.py",
        "--workdir=gs://bucket/slr run",
        "--distributed=on",
        *TRICKY_FLAGS,
        "--mode=train",
        "--config.seed=3",
    ]
    assert words[end:] == ["2>&1", "|", "tee", "-a", "~/slr_jax_train.log"]
    (train_line,) = [c for c in cmds if "tee" in c and c[0] == "gcloud"]
    assert train_line[-4:] == ["|", "tee", "-a", str(tmp_path / "logs" / "slr-test.log")]
    assert logs.startswith("tail -n 100 ~/slr_jax_train.log")
    assert stop.startswith("kill -TERM $(cat ~/slr_jax_train.pid)")
    assert cmds[-1] == GCLOUD_TPU + ["delete", "slr-test", "--quiet", *loc]
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


def test_tpu_dry_run_clone_mode_and_environment_variables(tmp_path):
    env = {"SLR_TPU_NAME": "pod-a", "SLR_TPU_ZONE": "europe-west4-b", "SLR_TPU_TYPE": "v5p-32"}
    result = _bash(
        TPU,
        "--dry-run",
        "--repo-url=https://example.org/me/slr_jax.git",
        "--ref",
        "v1.0",
        "--jax-version=1.2.3",
        "--reserved",
        "--create-flag=--network=my net",
        "--delete-on-exit",
        "create",
        "copy",
        "setup",
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    (create,) = _find(cmds, GCLOUD_TPU + ["create"])
    assert create[4:] == ["create", "pod-a", "--accelerator-type=v5p-32"] + [
        "--version=v2-alpha-tpuv5",
        "--reserved",
        "--network=my net",
        "--zone=europe-west4-b",
    ]
    copy, setup = (_remote(c) for c in _find(cmds, GCLOUD_TPU + ["ssh"]))
    assert shlex.split(copy) == shlex.split(
        "rm -rf slr_jax && git clone --quiet https://example.org/me/slr_jax.git slr_jax "
        "&& git -C slr_jax checkout --quiet v1.0"
    )
    assert "jax[tpu]==1.2.3" in shlex.split(setup)
    assert not any(c[0] == "git" for c in cmds)  # nothing archived in clone mode
    assert cmds[-1] == GCLOUD_TPU + ["delete", "pod-a", "--quiet", "--zone=europe-west4-b"]


@needs_git
def test_tpu_real_run_against_a_stand_in_gcloud(tmp_path):
    """Runs the steps for real with `gcloud` replaced by a script that plays one worker: ssh
    runs --command in a fake home folder, scp copies there. Checks that the code arrives, the
    job gets its flags unchanged, logs are collected, and stop sends SIGTERM to a detached job."""
    home, bin_dir = tmp_path / "worker_home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    log = tmp_path / "gcloud_calls.jsonl"
    _executable(
        bin_dir / "gcloud",
        f"""
        #!/usr/bin/env bash
        {shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \\
          "$@" >> {shlex.quote(str(log))}
        case $4 in
          describe) exit 1 ;;
          scp) cp "$5" "$HOME/${{6#*:}}" ;;
          ssh) for a in "$@"; do [[ $a != --command=* ]] || cmd=${{a#--command=}}; done
               cd "$HOME" && exec bash -c "$cmd" ;;
        esac
        """,
    )
    (home / "slr_venv" / "bin").mkdir(parents=True)
    _executable(
        home / "slr_venv" / "bin" / "python",
        f"""
        #!/usr/bin/env bash
        {shlex.quote(sys.executable)} -c 'import json, os, sys
        record = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "stage": os.environ["STAGE"]}}
        print(json.dumps(record))' "$@"
        [[ $STAGE != fail ]] || exit 4
        if [[ $STAGE == detached ]]; then
          trap 'echo saved > "$HOME/terminated"; kill $! 2>/dev/null; exit 0' TERM
          touch "$HOME/started"
          sleep 30 & wait
        fi
        """,
    )
    env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    common = ["--name=slr-test", "--zone=us-central2-b", "--workdir=gs://b/run"]
    common += [f"--log-dir={tmp_path / 'logs'}"] + [f"--set={kv}" for kv in TRICKY_SETS]

    run = _bash(
        TPU,
        *common,
        "--accelerator-type=v4-8",
        "--env=STAGE=foreground",
        "create",
        "copy",
        "train",
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert (home / "slr_jax" / "slr_jax" / "__init__.py").exists()  # the git archive, unpacked
    assert not (home / "slr_jax_code.tar.gz").exists()
    job = json.loads((home / "slr_jax_train.log").read_text().splitlines()[-1])
    assert job["cwd"] == str(home / "slr_jax") and job["stage"] == "foreground"
    main_flags = ["--config=configs/voc.py", "--workdir=gs://b/run", "--distributed=on"]
    assert job["argv"] == ["-m", "slr_jax.main", *main_flags, *TRICKY_FLAGS]
    assert json.loads((tmp_path / "logs" / "slr-test.log").read_text().splitlines()[-1]) == job
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[3] for c in calls] == ["describe", "create", "scp", "ssh", "ssh"]

    logs = _bash(TPU, *common, "logs", env=env)
    assert logs.returncode == 0, logs.stderr
    assert json.loads(logs.stdout.splitlines()[-1].split("] ", 1)[1]) == job

    failing = _bash(TPU, *common, "--env=STAGE=fail", "--delete-on-exit", "train", env=env)
    assert failing.returncode == 4  # the job's status, through ssh and the local tee
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[-1] == GCLOUD_TPU[1:] + ["delete", "slr-test", "--quiet", "--zone=us-central2-b"]

    start = _bash(TPU, *common, "--env=STAGE=detached", "--detach", "train", env=env)
    assert start.returncode == 0, start.stderr
    for _ in range(100):
        if (home / "started").exists():
            break
        time.sleep(0.05)
    assert (home / "started").exists(), (home / "slr_jax_train.log").read_text()
    stop = _bash(TPU, *common, "stop", env=env)
    assert stop.returncode == 0, stop.stderr
    for _ in range(100):
        if (home / "terminated").exists():
            break
        time.sleep(0.05)
    assert (home / "terminated").read_text().strip() == "saved"


def test_tpu_preflight_that_fails_books_nothing(tmp_path):
    """`all` starts with preflight, run here with --local-python from the repository root; when
    it exits non-zero (a program does not fit) the script stops with its status and gcloud is
    never called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    record = (
        f"{shlex.quote(sys.executable)} -c 'import json, os, sys; "
        f'print(json.dumps([os.getcwd(), *sys.argv[1:]]))\' "$@" >> {calls}'
    )
    _executable(bin_dir / "gcloud", f"#!/usr/bin/env bash\n{record}\n")
    python = _executable(
        tmp_path / "python",
        f"#!/usr/bin/env bash\n{record}\necho 'error: train_step needs 20 GiB' >&2\nexit 1\n",
    )
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLR_LOCAL_PYTHON": str(python)}
    args = ["--name=a", "--zone=z", "--accelerator-type=v5litepod-16", "--workdir=gs://b/r"]
    result = _bash(TPU, *args, "--set=train.batch_size=64", "all", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "error: train_step needs 20 GiB"
    (call,) = [json.loads(line) for line in calls.read_text().splitlines()]
    assert call == [str(REPO), "-m", "slr_jax.preflight", "--config=configs/voc.py"] + [
        "--topology=v5litepod-16",
        "--config.train.batch_size=64",
    ]


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--zone=z", "create"], {}, "--name NAME"),
        (["--name=a", "--zone=z", "preflight"], {}, "preflight needs --accelerator-type"),
        (["--name=a", "create"], {}, "--zone ZONE"),
        (["--name=a", "--zone=z"], {}, "no step given"),
        (["--name=a", "--zone=z", "create"], {}, "create needs --accelerator-type"),
        (["--name=a", "--zone=z", "train"], {}, "train needs --workdir"),
        (["--name=a", "--zone=z", "--accelerator-type=v9-8", "create"], {}, "pass --version"),
        (["--name=My_TPU", "--zone=z", "delete"], {}, "not a valid TPU name"),
        (["--name=a", "--zone=z", "--spot", "--preemptible", "create"], {}, "choose one of"),
        (["--name=a", "--zone=z", "--set", "batch_size", "delete"], {}, "--set expects KEY=VALUE"),
        (["--name=a", "--zone=z", "--env", "1X=2", "delete"], {}, "--env expects NAME=VALUE"),
        (["--name=a", "--zone=z", "launch"], {}, "unknown step 'launch'"),
        (["--name=a", "--zone=z", "--frobnicate", "delete"], {}, "unknown option"),
        (["--name=a", "--zone=z", "--remote-dir=../x", "copy"], {}, "--remote-dir"),
        (["--name=a", "--zone=z", "--ref=no-such-ref", "copy"], {}, "--ref 'no-such-ref'"),
        (["--name=a", "--zone", "delete"], {}, "no step given"),  # --zone took `delete`
        (["--name=a", "--zone=z", "--workdir"], {}, "--workdir needs a value"),
        (["--zone=z", "delete"], {"SLR_TPU_NAME": "x"}, "gcloud not found"),
    ],
)
def test_tpu_bad_input_is_a_clear_error(args, env, message, tmp_path):
    if message == "gcloud not found":
        env = {**env, "PATH": str(_minimal_path(tmp_path))}
    else:
        args = ["--dry-run", *args]
    result = _bash(TPU, *args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""  # nothing planned or run before the checks pass
    assert result.stderr.startswith("error: ") and message in result.stderr


def _minimal_path(tmp_path):
    """A PATH folder with links to the few tools the scripts need: no gcloud, no scontrol."""
    folder = tmp_path / "minimal_path"
    folder.mkdir(exist_ok=True)
    for tool in ("bash", "git", "dirname", "sed", "head", "cat"):
        found = shutil.which(tool)
        if found and not (folder / tool).exists():
            (folder / tool).symlink_to(found)
    return folder


# ---- slurm_gpu.sbatch ---------------------------------------------------------------------------


def test_slurm_dry_run_sets_the_jax_contract(tmp_path):
    env = {"SLURM_JOB_NODELIST": "gpu[003-004,010]", "SLURM_NTASKS": "3", "SLURM_JOB_ID": "77"}
    env["PATH"] = str(_minimal_path(tmp_path))  # no scontrol: the script parses the list
    args = ["--dry-run", "--workdir=/shared/my runs/voc"] + [f"--set={kv}" for kv in TRICKY_SETS]
    result = _bash(SLURM, *args, "--", "--config.seed=3", env=env)
    assert result.returncode == 0, result.stderr
    cmds = _commands(result.stdout)
    assert cmds[0] == ["cd", str(REPO)]
    assert cmds[1] == ["export", "JAX_COORDINATOR_ADDRESS=gpu003:20077"]
    assert cmds[2] == ["export", "JAX_NUM_PROCESSES=3"]
    srun = cmds[3]
    assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks=3"]
    assert srun[3:6] == ["bash", "-c", 'export JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"']
    assert srun[7:] == ["python", "-m", "slr_jax.main", "--config=configs/voc.py"] + [
        "--workdir=/shared/my runs/voc",
        *TRICKY_FLAGS,
        "--config.seed=3",
    ]


def test_slurm_real_run_with_stand_in_srun(tmp_path):
    """srun and scontrol replaced by scripts that start the tasks on this machine."""
    bin_dir, mods = tmp_path / "bin", tmp_path / "mods"
    bin_dir.mkdir()
    mods.mkdir()
    _executable(
        bin_dir / "scontrol",
        """
        #!/usr/bin/env bash
        [[ "$1 $2" == "show hostnames" ]] && printf 'node017\\nnode018\\n'
        """,
    )
    _executable(
        bin_dir / "srun",
        """
        #!/usr/bin/env bash
        n=1
        while [[ $1 == --* ]]; do [[ $1 != --ntasks=* ]] || n=${1#*=}; shift; done
        for ((i = 0; i < n; i++)); do SLURM_PROCID=$i "$@" & done
        wait
        """,
    )
    python = _write_recorder(mods)
    env = {"SLURM_JOB_NODELIST": "node[017-018]", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242"}
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    workdir = tmp_path / "wd"
    result = _bash(SLURM, f"--workdir={workdir}", f"--python={python}", "--set=a.b=x y", env=env)
    assert result.returncode == 0, result.stderr
    runs = [json.loads((workdir / f"proc_{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(runs):
        assert r["JAX_PROCESS_ID"] == str(i)
        assert r["JAX_COORDINATOR_ADDRESS"] == "node017:24242"  # scontrol's first host
        assert r["JAX_NUM_PROCESSES"] == "2"
        assert r["argv"] == ["-m", "slr_jax.main", "--config=configs/voc.py"] + [
            f"--workdir={workdir}",
            "--config.a.b=x y",
        ]
        assert r["cwd"] == str(REPO)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--dry-run"], {"SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "1"}, "--workdir DIR"),
        (["--dry-run", "--workdir=w"], {"SLURM_NTASKS": "1"}, "SLURM_JOB_NODELIST is not set"),
        (["--dry-run", "--workdir=w"], {"SLURM_JOB_NODELIST": "n1"}, "SLURM_NTASKS is not set"),
        (
            ["--dry-run", "--workdir=w", "--port=x"],
            {"SLURM_JOB_NODELIST": "n", "SLURM_NTASKS": "1"},
            "--port",
        ),
        (["--workdir=w"], {"SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "1"}, "scontrol not found"),
    ],
)
def test_slurm_bad_input_is_a_clear_error(args, env, message, tmp_path):
    env = {**env, "PATH": str(_minimal_path(tmp_path))}
    result = _bash(SLURM, *args, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr


# ---- local_multiprocess.sh ----------------------------------------------------------------------


def _write_recorder(folder):
    """Writes folder/recorder.py (a stand-in training module that records its environment,
    arguments and folder into WORKDIR/proc_<JAX_PROCESS_ID>.json) and folder/python, a stand-in
    interpreter that runs it whatever module it is asked for."""
    (folder / "recorder.py").write_text(
        textwrap.dedent(
            """
            import json, os, pathlib, sys
            keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                    "JAX_PLATFORMS", "XLA_FLAGS")
            record = {k: os.environ.get(k) for k in keys}
            record.update(argv=sys.argv[1:], cwd=os.getcwd())
            (workdir,) = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")]
            workdir = pathlib.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / f"proc_{record['JAX_PROCESS_ID']}.json").write_text(json.dumps(record))
            """
        )
    )
    return _executable(
        folder / "python",
        f"""
        #!/usr/bin/env bash
        exec {shlex.quote(sys.executable)} {shlex.quote(str(folder / "recorder.py"))} "$@"
        """,
    )


def test_local_dry_run(tmp_path):
    args = ["--dry-run", "-n", "3", "--devices-per-process=2", "--port=23456", "--workdir=rel/wd"]
    result = _bash(
        LOCAL, *args, "--set=test.scales=(1.0, 0.5, 2)", env={"XLA_FLAGS": "--xla_dump_to=d"},
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert shlex.split(lines[0]) == ["cd", str(REPO)]
    assert shlex.split(lines[1]) == ["mkdir", "-p", str(tmp_path / "rel/wd/process_logs")]
    for i in range(3):
        words = shlex.split(lines[2 + i])
        assert words[:6] == [
            "env",
            "JAX_COORDINATOR_ADDRESS=localhost:23456",
            "JAX_NUM_PROCESSES=3",
            "JAX_PLATFORMS=cpu",
            "XLA_FLAGS=--xla_dump_to=d --xla_force_host_platform_device_count=2",  # user's kept
            f"JAX_PROCESS_ID={i}",
        ]
        assert words[6:] == ["python", "-m", "slr_jax.main", "--config=configs/demo.py"] + [
            f"--workdir={tmp_path / 'rel/wd'}",
            "--config.test.scales=(1.0, 0.5, 2)",
            ">",
            str(tmp_path / f"rel/wd/process_logs/process_{i}.log"),
            "2>&1",
            "&",
        ]
    assert lines[-1] == "wait"


def test_local_runs_every_process_with_its_id(tmp_path):
    mods = tmp_path / "mods"
    mods.mkdir()
    _write_recorder(mods)
    port, workdir = _free_port(), tmp_path / "wd"
    args = ["-n", "3", f"--port={port}", f"--workdir={workdir}", f"--python={sys.executable}"]
    args += ["--module=recorder", "--set=dataset.manual_dir=/my data"]
    result = _bash(LOCAL, *args, env={"PYTHONPATH": str(mods), "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr
    runs = [json.loads((workdir / f"proc_{i}.json").read_text()) for i in range(3)]
    for i, r in enumerate(runs):
        assert r["JAX_PROCESS_ID"] == str(i)
        assert r["JAX_COORDINATOR_ADDRESS"] == f"localhost:{port}"
        assert r["JAX_NUM_PROCESSES"] == "3" and r["JAX_PLATFORMS"] == "cpu"
        assert r["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
        assert r["argv"] == ["--config=configs/demo.py", f"--workdir={workdir}"] + [
            "--config.dataset.manual_dir=/my data"
        ]
        assert r["cwd"] == str(REPO)
        assert (workdir / "process_logs" / f"process_{i}.log").exists()


def test_local_failure_stops_the_others(tmp_path):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "fails.py").write_text(
        "import os, sys, time\n"
        "if os.environ['JAX_PROCESS_ID'] == '1':\n"
        "    print('process 1 fails'); sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    args = [f"--workdir={tmp_path / 'wd'}", f"--python={sys.executable}", "--module=fails"]
    result = _bash(LOCAL, *args, env={"PYTHONPATH": str(mods), "XLA_FLAGS": ""})
    assert result.returncode == 3
    assert "process 1 exited with status 3" in result.stderr and "process 1 fails" in result.stderr
    assert time.monotonic() - start < 30  # process 0 was stopped, not waited for


def test_local_passes_sigterm_on(tmp_path):
    mods, workdir = tmp_path / "mods", tmp_path / "wd"
    mods.mkdir()
    workdir.mkdir()
    (mods / "waits.py").write_text(
        textwrap.dedent(
            """
            import os, pathlib, signal, sys, time
            wd = pathlib.Path(sys.argv[2].split("=", 1)[1])
            i = os.environ["JAX_PROCESS_ID"]
            def on_term(*_):
                (wd / f"saved_{i}").write_text("")
                sys.exit(0)
            signal.signal(signal.SIGTERM, on_term)
            (wd / f"ready_{i}").write_text("")
            time.sleep(60)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(mods)}
    proc = subprocess.Popen(
        [
            "bash",
            str(LOCAL),
            f"--workdir={workdir}",
            f"--python={sys.executable}",
            "--module=waits",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not all((workdir / f"ready_{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all((workdir / f"saved_{i}").exists() for i in range(2))


def test_local_two_jax_processes_form_one_runtime(tmp_path):
    """The env contract drives a real 2-process JAX CPU runtime: 2 x 2 devices, one global sum."""
    mods, workdir = tmp_path / "mods", tmp_path / "wd"
    mods.mkdir()
    (mods / "jax_check.py").write_text(
        textwrap.dedent(
            """
            import json, os, pathlib, sys
            import jax
            import numpy as np
            from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

            env = os.environ
            jax.distributed.initialize(
                coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                num_processes=int(env["JAX_NUM_PROCESSES"]),
                process_id=int(env["JAX_PROCESS_ID"]),
            )
            mesh = Mesh(np.array(jax.devices()), ("data",))
            local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
            x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
            total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
            out = pathlib.Path(sys.argv[2].split("=", 1)[1]) / f"jax_{jax.process_index()}.json"
            out.write_text(json.dumps([jax.process_count(), jax.device_count(), float(total)]))
            """
        )
    )
    args = ["--devices-per-process=2", f"--port={_free_port()}", f"--workdir={workdir}"]
    args += [f"--python={sys.executable}", "--module=jax_check"]
    result = _bash(LOCAL, *args, env={"PYTHONPATH": str(mods)}, timeout=120)
    logs = "".join(p.read_text() for p in (workdir / "process_logs").glob("*.log"))
    assert result.returncode == 0, result.stderr + logs
    for i in range(2):
        # 2 processes, 4 devices, sum = 2 devices x 1.0 + 2 devices x 2.0.
        assert json.loads((workdir / f"jax_{i}.json").read_text()) == [2, 4, 6.0]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--workdir DIR is required"),
        (["--workdir=w", "-n", "0"], "--num-processes must be a positive integer"),
        (["--workdir=w", "--devices-per-process=two"], "--devices-per-process"),
        (["--workdir=w", "--port=70000"], "below 65536"),
        (["--workdir=w", "--set=x"], "--set expects KEY=VALUE"),
        (["--workdir=w", "stray"], "unknown argument 'stray'"),
    ],
)
def test_local_bad_input_is_a_clear_error(args, message):
    result = _bash(LOCAL, "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr


# ---- all scripts --------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [TPU, SLURM, LOCAL], ids=lambda p: p.name)
def test_help(script):
    result = _bash(script, "--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage:")
    assert "--dry-run" in result.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    result = subprocess.run(
        ["shellcheck", "--external-sources", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
