"""Devices, processes and how batches are laid out on them.

Parallelism is ``jax.jit`` over a 1-D ``Mesh`` of every device of every process (axis
``data``): a global batch is sharded along its first axis, parameters and optimiser state are
replicated, and XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from slr_jax.errors import TrainingError

# The entries of a training batch (slr_jax/data/pipeline.py documents their layout).
BATCH_KEYS = ("image", "raw_image", "labels", "mask", "is_labeled")


def make_mesh() -> Mesh:
    """1-D mesh over every device of every process, axis ``data``."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of parameters and optimiser state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: split along its first axis over every device."""
    return NamedSharding(mesh, PartitionSpec("data"))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    """Raises TrainingError unless ``global_batch`` splits evenly over devices and processes."""
    devices = mesh.devices.size
    if global_batch % devices or global_batch % jax.process_count():
        raise TrainingError(
            f"config.train.batch_size={global_batch} must be divisible by the {devices} devices "
            f"and {jax.process_count()} processes; use a multiple of {devices}."
        )


def shard_batch(
    batch: Mapping[str, Any], mesh: Mesh, keys: tuple[str, ...] = BATCH_KEYS
) -> dict[str, jax.Array]:
    """This process's share of a batch (NumPy) -> global arrays sharded on axis ``data``
    (the entries ``keys``)."""
    sharding = data_sharded(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(batch[key]))
        for key in keys
    }


def maybe_initialize_distributed(mode: str) -> None:
    """``jax.distributed.initialize()`` on TPU pods and configured multi-process GPU runs.

    ``mode``: 'on', 'off', or 'auto' (several processes named by ``JAX_NUM_PROCESSES``, or
    several TPU workers in ``TPU_WORKER_HOSTNAMES``).
    """
    env = os.environ
    multi_gpu = int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1
    tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    if mode == "on" or (mode == "auto" and (multi_gpu or tpu_pod)):
        if multi_gpu:
            jax.distributed.initialize(
                coordinator_address=env.get("JAX_COORDINATOR_ADDRESS"),
                num_processes=int(env["JAX_NUM_PROCESSES"]),
                process_id=int(env.get("JAX_PROCESS_ID", "0")),
            )
        else:
            jax.distributed.initialize()
        logging.info("process %d of %d", jax.process_index(), jax.process_count())
