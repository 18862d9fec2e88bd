"""Shared pytest setup: CPU-only JAX, float32 matmuls at full precision, quiet TensorFlow, and
one persistent XLA compilation cache for the whole session.

XLA:CPU compiles a train step in tens of seconds to minutes; many tests build the same programs
again (same network, same shapes, new closures), and every session compiles what the last one
did. The cache (``$SLR_JAX_TEST_XLA_CACHE``, default ``.pytest_cache/d/jax_compile_cache``;
``none`` turns it off) makes each such program compile once per machine.

Tests that compare against the official PyTorch code read its checkout from the environment
variable ``SLR_REFERENCE_REPO`` (a clone of github.com/DesertsP/SLRNet) and are skipped, with
the reason, when it is unset or lacks the files they need.

XLA:CPU compiles the suite's programs with LLVM at -O0 (``TEST_XLA_FLAGS``, also passed to the
tests' subprocesses through ``cpu_env``): LLVM's optimisation passes are a third or more of
each compile, and the tests run each program for a few small steps, so the slower generated
code costs less than it saves. The optimisation level changes how fast the code runs, not what
it computes, and every program a test compares runs under the same flags.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REFERENCE_ENV = "SLR_REFERENCE_REPO"
CACHE_ENV = "SLR_JAX_TEST_XLA_CACHE"
# Programs that compile faster than this are not worth a disk write and read.
CACHE_MIN_COMPILE_S = 0.5


def pytest_configure(config):
    """Points JAX's persistent compilation cache at the session folder (see the docstring)."""
    folder = os.environ.get(CACHE_ENV, "").strip()
    if not folder:
        cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
        folder = str(cache.mkdir("jax_compile_cache")) if cache is not None else ""
    if folder and folder.lower() != "none":
        os.environ[CACHE_ENV] = folder  # for the fixtures below and test subprocesses
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)


@pytest.fixture(scope="session")
def xla_cache_dir() -> str | None:
    """The session's persistent compilation cache folder (None when turned off)."""
    folder = os.environ.get(CACHE_ENV, "")
    return folder if folder and folder.lower() != "none" else None


@pytest.fixture(scope="session")
def cpu_env():
    """``cpu_env(devices)`` -> this process's environment for a JAX subprocess on the CPU with
    ``devices`` host devices (the suite's XLA flags kept)."""

    def env(devices: int) -> dict[str, str]:
        flags = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
        return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)

    return env


@pytest.fixture(scope="session")
def reference_repo() -> pathlib.Path:
    """Root of the reference checkout named by ``$SLR_REFERENCE_REPO``; skips when unusable."""
    root = os.environ.get(REFERENCE_ENV, "").strip()
    if not root:
        pytest.skip(
            f"{REFERENCE_ENV} is not set; point it at a clone of "
            "https://github.com/DesertsP/SLRNet to run the comparisons with the reference"
        )
    path = pathlib.Path(root).expanduser()
    if not path.is_dir():
        pytest.skip(f"{REFERENCE_ENV}={root!r} is not a directory")
    return path


@pytest.fixture(scope="session")
def reference_file(reference_repo):
    """``reference_file('utils', 'dcrf.py')`` -> that path in the checkout; skips if missing."""

    def find(*parts: str) -> pathlib.Path:
        path = reference_repo.joinpath(*parts)
        if not path.exists():
            pytest.skip(f"{'/'.join(parts)} not found in {REFERENCE_ENV}={reference_repo}")
        return path

    return find


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_under_pytest(tmp_path_factory):
    """Sends ``tempfile`` (ours, TensorFlow Datasets', and subprocesses' via ``TMPDIR``) to a
    folder of pytest's own temporary tree, which pytest prunes: tfds leaves an empty
    ``/tmp/tmp*tfds`` folder behind for every builder it opens before the data is prepared."""
    import tempfile

    folder = str(tmp_path_factory.mktemp("tempfile"))
    previous_dir, previous_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = folder
    os.environ["TMPDIR"] = folder
    yield
    tempfile.tempdir = previous_dir
    if previous_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous_env
