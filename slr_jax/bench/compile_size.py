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
import time

from absl import app, flags

from slr_jax import main as main_lib
from slr_jax import preflight

# --config (slr_jax.main's) and --topology (slr_jax.preflight's) are the flags of those tools.
_LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Stop after lowering (text statistics).")
_DUMP = flags.DEFINE_string("dump", "", "Write the lowered StableHLO text to this file.")
_DUMP_COMPILED = flags.DEFINE_string("dump_compiled", "", "Write the optimised HLO text here.")

# A dense constant in StableHLO text: ``stablehlo.constant dense<"0x...">`` or ``dense<[...]>``.
_CONSTANT = re.compile(r"stablehlo\.constant dense<(.*?)> : tensor<([^>]*)>")


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
    target = preflight.tpu_target(preflight.parse_slice(topology))
    chips, mesh = target.chips, target.mesh()
    step, state, batch = preflight.abstract_train_step(config, mesh)
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
    with preflight.without_persistent_cache():
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
    config = main_lib.resolve_config("train")
    topology = flags.FLAGS.topology or "v5e:2x2"
    result = measure(config, topology, _LOWER_ONLY.value, _DUMP.value, _DUMP_COMPILED.value)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main, flags_parser=main_lib.parse_flags)
