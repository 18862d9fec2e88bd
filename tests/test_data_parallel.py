"""Data parallelism on CPU: the training forward gives the same numbers on 1-, 2- and 4-device
meshes, and 2 processes (jax.distributed, as launch/local_multiprocess.sh starts them) read the
global batches that 1 process reads. Each check runs in subprocesses with forced host device
counts, on test_train.py's tiny config.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_same_numbers_on_one_two_and_four_devices(tmp_path, cpu_env):
    """Global-array semantics: the training forward (dropout and gate draws, head BatchNorm
    statistics over the global batch, every loss term) is the same on 1-, 2- and 4-device
    meshes. Only the forward+loss is compiled here (the full step takes minutes on XLA:CPU)."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / "tests")!r})
        import jax, numpy as np
        from pathlib import Path
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from test_train import tiny_config
        from slr_jax import data, sharding
        from slr_jax.losses import slrnet_objective
        from slr_jax.models import build_model, init_variables
        assert jax.device_count() == 4
        config = tiny_config(Path({str(tmp_path)!r}))
        config.train.batch_size = 4
        model = build_model(config.model)
        variables = init_variables(model, jax.random.key(0))
        batch = next(data.train_dataset(config))

        def forward(variables, batch, key):
            outputs, updates = model.apply(variables, batch["image"], mode="train", train=True,
                                           rngs={{"dropout": key}}, mutable=["batch_stats"])
            _, terms, _ = slrnet_objective(outputs, batch, loss_cfg=config.loss,
                                           variant="wsss", seg_weight=1.0)
            return terms, updates["batch_stats"], outputs["masks"]

        out = []
        for devices in (jax.devices()[:1], jax.devices()[:2], jax.devices()):
            mesh = Mesh(np.asarray(devices), ("data",))
            fn = jax.jit(forward, in_shardings=(NamedSharding(mesh, P()), None,
                                                 NamedSharding(mesh, P())))
            sharded = sharding.shard_batch(batch, mesh)
            assert len(sharded["image"].sharding.device_set) == len(devices)
            out.append(jax.device_get(fn(variables, sharded, jax.random.key(3))))
        (t1, s1, m1) = out[0]
        for t2, s2, m2 in out[1:]:
            for k in t1:
                print(k, t1[k], t2[k])
                np.testing.assert_allclose(t1[k], t2[k], rtol=2e-5, atol=1e-6, err_msg=k)
            jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                                           atol=1e-5), s1, s2)
            np.testing.assert_allclose(m1, m2, rtol=1e-4, atol=1e-5)
        """
    )
    env = cpu_env(4)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


_TOPOLOGY_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import jax
if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
import jax.numpy as jnp
import numpy as np
from pathlib import Path
from jax.experimental import multihost_utils
from test_train import tiny_config
from slr_jax import data, sharding
config = tiny_config(Path({tmp!r}))
config.train.batch_size = 4
mesh = sharding.make_mesh()
batches = data.train_dataset(config, start_position=4)  # from the second global batch
out = {{}}
for step in range(3):  # 8 training examples: the third batch is in the second epoch
    batch = sharding.shard_batch(next(batches), mesh)
    # A reduction over every device (a collective across processes) and the global batch.
    total = jax.jit(lambda b: jnp.sum(b["image"] * b["raw_image"]))(batch)
    full = multihost_utils.process_allgather(batch, tiled=True)
    out[step] = {{"total": float(total), **{{k: np.asarray(v).tolist() for k, v in full.items()
                                           if k != "image"}}}}
batches.close()
if jax.process_index() == 0:
    print("BATCHES" + json.dumps(out))
"""


def test_two_processes_see_the_batches_of_one(tmp_path, cpu_env):
    """1 process x 4 devices and 2 processes x 2 devices (jax.distributed on CPU, as
    launch/local_multiprocess.sh runs them) train on the same global batches: each process
    reads its rows of every batch. (The training forward on a given global batch does not
    depend on the device count: test_same_numbers_on_one_two_and_four_devices.)"""
    script = _TOPOLOGY_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), tmp=str(tmp_path))
    one = cpu_env(4)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=one, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    single = json.loads(proc.stdout.split("BATCHES")[-1])
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    two = cpu_env(2)
    two.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=dict(two, JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-5000:]
    multi = json.loads(outputs[0][0].split("BATCHES")[-1])
    assert set(multi) == set(single) == {"0", "1", "2"}
    for step, batch in single.items():
        for key, value in batch.items():
            if key == "total":
                np.testing.assert_allclose(multi[step][key], value, rtol=1e-5, err_msg=key)
            else:
                np.testing.assert_array_equal(multi[step][key], value, err_msg=f"{step} {key}")
    assert single["0"]["raw_image"] != single["1"]["raw_image"]
