"""Developer measurement: how large and how slow to compile the train step is for a TPU slice.

Compiles ``train.compile_train_step`` for a named TPU topology on this (CPU-only) machine with
``libtpu`` (nothing runs; no TPU needed) and prints, as one JSON line: the lowered StableHLO's
size in characters and lines, its dense constants (count, bytes of text, the largest), its
convolutions, the compiled TPU code bytes, the per-chip memory report and the seconds spent in
lowering and compiling.

    python -m slr_jax.bench.compile_size --config=configs/voc.py --topology=v5e:4x4 \
        --config.model.dtype=bfloat16 [--config.model.width=0.125 --config.dataset.crop_size=97 \
        --config.train.batch_size=32] [--lower_only]

The figures in docs/scaling.md ("Compile time on TPU") come from this command.
"""

from __future__ import annotations

import json
import re
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.experimental import topologies
from ml_collections import config_flags

from slr_jax import train
from slr_jax.models import build_model
from slr_jax.sharding import data_sharded, replicated

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology name, e.g. v5e:4x4.")
_LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Stop after lowering (text statistics).")
_DUMP = flags.DEFINE_string("dump", "", "Write the lowered StableHLO text to this file.")
_DUMP_COMPILED = flags.DEFINE_string("dump_compiled", "", "Write the optimised HLO text here.")

# A dense constant in StableHLO text: ``stablehlo.constant dense<"0x...">`` or ``dense<[...]>``.
_CONSTANT = re.compile(r"stablehlo\.constant dense<(.*?)> : tensor<([^>]*)>")


def abstract_train_inputs(config, mesh):
    """(abstract state, abstract batch, plan, lr fn) for ``config`` on ``mesh``: shapes only."""
    plan = train.StepPlan(steps_per_epoch=100, total_steps=3000, pretrain_steps=500,
                          decay_steps=2500)  # fmt: skip
    lr_fn = plan.learning_rate_fn(config.train.lr)
    model = build_model(config.model)
    state = jax.eval_shape(
        lambda key: train.create_train_state(config, model, lr_fn, key, init_checkpoint=""),
        jax.random.key(0),
    )
    state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), state
    )
    b = int(config.train.batch_size)
    crop = int(config.dataset.crop_size)
    classes = int(config.model.num_classes)
    sharded = data_sharded(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((b, crop, crop, 3), jnp.float32, sharding=sharded),
        "raw_image": jax.ShapeDtypeStruct((b, crop, crop, 3), jnp.float32, sharding=sharded),
        "labels": jax.ShapeDtypeStruct((b, classes - 1), jnp.float32, sharding=sharded),
        "mask": jax.ShapeDtypeStruct((b, crop, crop), jnp.int32, sharding=sharded),
        "is_labeled": jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=sharded),
    }
    return state, batch, plan, lr_fn


def text_statistics(text: str) -> dict:
    """Size, constants and convolutions of a StableHLO module's text."""
    constants = [(len(m.group(0)), m.group(2)) for m in _CONSTANT.finditer(text)]
    dense = [c for c in constants if c[0] > 200]
    dense.sort(reverse=True)
    return {
        "text_chars": len(text),
        "text_lines": text.count("\n"),
        "constants": len(constants),
        "large_constants": len(dense),
        "large_constant_chars": sum(c[0] for c in dense),
        "largest_constants": [f"{c[1]}: {c[0]}" for c in dense[:5]],
        "convolutions": text.count("stablehlo.convolution"),
        "while_loops": text.count("stablehlo.while"),
    }


def measure(
    config, topology: str, lower_only: bool = False, dump: str = "", dump_compiled: str = ""
) -> dict:
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    chips = len(topo.devices)
    mesh = topologies.make_mesh(topo, (chips,), ("data",))
    state, batch, plan, lr_fn = abstract_train_inputs(config, mesh)
    step = train.compile_train_step(config, plan, lr_fn, mesh, state)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - start
    text = lowered.as_text()
    if dump:
        with open(dump, "w") as f:
            f.write(text)
    result = {"topology": topology, "chips": chips, "lower_s": round(lower_s, 1)}
    result.update(text_statistics(text))
    if lower_only:
        return result
    start, cpu_start = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    result["compile_s"] = round(time.perf_counter() - start, 1)
    # CPU seconds of this process (all threads): less sensitive than wall time to other jobs.
    result["compile_cpu_s"] = round(time.process_time() - cpu_start, 1)
    if dump_compiled:
        with open(dump_compiled, "w") as f:
            f.write(compiled.as_text())
    mem = compiled.memory_analysis()
    for name in ("argument", "temp", "output", "generated_code"):
        result[f"{name}_bytes"] = int(getattr(mem, f"{name}_size_in_bytes", -1))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    result["flops"] = float(cost.get("flops", -1.0)) if cost else -1.0
    return result


def main(argv):
    del argv
    config = _CONFIG.value
    if config is None:
        sys.exit("error: --config is required")
    result = measure(config, _TOPOLOGY.value, _LOWER_ONLY.value, _DUMP.value, _DUMP_COMPILED.value)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
