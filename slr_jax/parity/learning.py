"""Learning parity: a whole demo trained by slr_jax and by the official PyTorch code.

``python -m slr_jax.parity.learning --reference-repo PATH --config=configs/demo.py
[--seeds 0,1,2] [--config.KEY=VALUE ...] [--json FILE] [--plot FILE] [--workdir DIR]``

For every seed (``config.seed``), both frameworks train the config's setting on the same data
from the same weights with the same schedule, and are scored by the same evaluator:

- the data: the config's training stream (``slr_jax.data.train_dataset``: synthetic set,
  augmentation, oversampled pixel-labelled list) is drawn once, ``train.total_steps`` (or the
  epochs' worth of) batches in NumPy, and both runs consume that list in order;
- the weights: the config's backbone pretraining (``config.pretrain``, slr_jax/pretrain.py) runs
  once; the initial state is the one ``train.train_and_evaluate`` builds from it (heads from
  ``config.seed``), and the reference's ``Net`` (at ``model.width``, the trajectory tool's
  channel scaling) loads it converted by ``slr_jax.convert``;
- slr_jax: ``train.train_and_evaluate`` on that stream (the normal training path: jit step,
  checkpoints, the final evaluation of ``slr_jax.evaluation``);
- the reference: its ``Net`` of the setting (``wsss``, ``semi``, ``semi_wo_cls``; the
  supervised-only baseline ``loss.objective='supervised'`` is its ``semi_wo_cls`` network with
  cross-entropy, ``trajectory.reference_supervised_losses``), its trainer's loss and its
  optimiser groups and cosine schedule (``trajectory.run_reference``) with the config's lr,
  weight decay, epochs, pretrain epochs and loss coefficients; its own dropout and gate draws
  (``torch.manual_seed(config.seed)``). Its final weights are converted back with
  ``slr_jax.convert`` and scored by ``slr_jax.evaluation`` as slr_jax's run is: network mIoU,
  after the dense CRF, and the training pseudo labels on the validation split.

Writes ``{"config", "rows": [{"framework", "seed", "miou", "miou_crf", "pseudo_label_miou",
"seconds"}], "plot", "curves"}`` (``--json``) and one PNG (``--plot``, default
``docs/learning_<setting>.png``): every loss term of both frameworks, averaged over the windows
slr_jax logs (``train.log_every_steps``), one line per framework and seed. ``seconds``: the
training and evaluation of that framework (the shared pretraining and data excluded).

Needs ``torch``, PyYAML-free; ``matplotlib`` for the plot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from slr_jax import checkpoint as checkpoint_lib
from slr_jax import convert, evaluation, train
from slr_jax import data as data_lib
from slr_jax.errors import ConfigError, SlrJaxError
from slr_jax.models import build_model, variable_shapes
from slr_jax.parity import reference as reference_lib
from slr_jax.parity import trajectory
from slr_jax.sharding import make_mesh

# slr_jax's setting -> the reference module of slr_jax.parity.settings.SETTINGS
REFERENCE_MODULE = {"wsss": "wsss", "semi": "semi", "semi_wo_cls": "semi_wo_cls",
                    "supervised": "semi_wo_cls"}  # fmt: skip
# What the reference's code fixes and slr_jax's config can change: (config path, value).
# ``model.use_low_rank=False`` is not among them: the reference's module is swapped for the
# ablation's pass-through (``drop_low_rank``).
REFERENCE_FIXED = {
    "wsss": {"loss.bg_scale": 0.7},
    "semi": {"loss.bg_scale": 0.7},
    "semi_wo_cls": {"loss.bg_scale": 0.9, "loss.pamr_bg_pow": 3.0},
    "supervised": {"loss.aux_weight": 0.4},
}
SEED_RESULT = "learning_seed.json"  # one seed's rows and curves, in WORKDIR/seed_S/
TERMS = ("total", "cls", "seg", "mask_consistency", "code_consistency", "seg_labeled", "aux")


class LearningError(ConfigError):
    """A config the reference cannot train as slr_jax does (one line, actionable)."""


# ----------------------------------------------------------------------- configuration
def setting_of(config) -> str:
    """``supervised`` for ``loss.objective='supervised'``, else ``model.variant``."""
    if config.loss.objective == "supervised":
        if config.model.variant != "semi_wo_cls":
            raise LearningError(
                "the supervised baseline is compared on the reference's semi_wo_cls network: "
                "set --config.model.variant=semi_wo_cls"
            )
        return "supervised"
    if config.model.variant not in REFERENCE_MODULE:
        raise LearningError(
            f"model.variant {config.model.variant!r} has no reference trainer here; use one of "
            f"{sorted(REFERENCE_MODULE)} or loss.objective='supervised'"
        )
    return str(config.model.variant)


def _lookup(config, path: str):
    node = config
    for key in path.split("."):
        node = node[key]
    return node


def check_config(config) -> str:
    """The setting of ``config``; raises :class:`LearningError` for what the reference's code
    cannot express (another architecture, its hard-coded constants changed)."""
    setting = setting_of(config)
    if config.model.arch != "slrnet":
        raise LearningError("the learning comparison trains SLRNet only (model.arch='slrnet')")
    for path, value in REFERENCE_FIXED[setting].items():
        if not np.allclose(_lookup(config, path), value):
            raise LearningError(
                f"{path}={_lookup(config, path)} but the reference's {setting} code fixes "
                f"{value}; drop that override for the learning comparison"
            )
    t = config.train
    if tuple(t.lr_multipliers) != trajectory.REFERENCE_LR_MULTIPLIERS or not t.nesterov:
        raise LearningError("the reference's optimiser is Nesterov SGD with lr x1/x2/x10/x20")
    if float(t.momentum) != 0.9:
        raise LearningError("the reference's optimiser has momentum 0.9 (train.momentum)")
    if config.model.dtype != "float32":
        raise LearningError("the reference trains in float32: use model.dtype='float32'")
    return setting


def reference_kwargs(config) -> dict:
    """Constructor arguments of the reference's ``Net`` for ``config``."""
    loss = config.loss
    return dict(
        num_classes=int(config.model.num_classes),
        scale_factor=float(config.model.scale_factor),
        num_iters=int(config.model.num_iters),
        temperature=float(config.model.temperature),
        pamr_iter=int(loss.pamr_iters),
        pamr_dilations=tuple(int(d) for d in loss.pamr_dilations),
        cutoff_top=float(loss.cutoff_top),
        cutoff_low=float(loss.cutoff_low),
    )


def schedule_of(config) -> tuple[dict, int, int]:
    """``(hparams, steps_per_epoch, total_steps)`` of ``config`` for the reference's trainer
    (``trajectory.run_reference``), from ``train.plan_steps`` as slr_jax plans its run."""
    plan = train.plan_steps(config.train, data_lib.num_train_examples(config))
    t = config.train
    coeff = (1.0,) if config.loss.objective == "supervised" else tuple(config.loss.loss_coeff)
    hparams = dict(lr=float(t.lr), weight_decay=float(t.weight_decay),
                   num_epochs=int(t.num_epochs), pretrain_epochs=int(t.pretrain_epochs),
                   loss_coeff=coeff)  # fmt: skip
    # The reference's decay period and seg-loss start follow from these; the check keeps the
    # two plans one plan (a total_steps that is not num_epochs whole epochs would not be).
    if plan.total_steps != plan.steps_per_epoch * int(t.num_epochs):
        raise LearningError(
            f"train.total_steps={plan.total_steps} is not num_epochs={t.num_epochs} whole "
            "epochs; the reference's trainer counts epochs"
        )
    return hparams, plan.steps_per_epoch, plan.total_steps


# --------------------------------------------------------------------------- the inputs
def stream_batches(config, steps: int) -> list[dict[str, np.ndarray]]:
    """The first ``steps`` batches of ``config``'s training stream (what
    ``train.train_and_evaluate`` would read from position 0), in NumPy."""
    batches, stream = [], data_lib.train_dataset(config, start_position=0)
    try:
        for _ in range(steps):
            batches.append({k: np.array(v) for k, v in next(stream).items()})
    finally:
        if hasattr(stream, "close"):
            stream.close()
    return batches


def initial_variables(config, workdir: str) -> tuple[str, dict]:
    """The backbone pretraining of ``config`` (in ``workdir``) and the initial variables of
    ``train.train_and_evaluate`` from it: ``(init_checkpoint, variables)`` in NumPy."""
    init_checkpoint = train._initial_weights(config, workdir, make_mesh())
    plan_lr = lambda step: float(config.train.lr)  # the state's schedule does not enter it
    state = train.create_train_state(
        config, build_model(config.model), plan_lr, jax.random.key(int(config.seed)),
        init_checkpoint=init_checkpoint,
    )  # fmt: skip
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return init_checkpoint, jax.tree_util.tree_map(np.array, jax.device_get(variables))


# ------------------------------------------------------------------------------ the runs
def run_slr_jax(config, workdir: str, init_checkpoint: str, batches: Sequence[dict]) -> dict:
    """``train.train_and_evaluate`` from ``init_checkpoint`` on ``batches``: ``history`` (its
    logged metrics), ``eval`` (results.json's record), ``variables`` (final, NumPy), ``seconds``."""
    config = config.copy_and_resolve_references()
    config.train.init_checkpoint = init_checkpoint
    batch_size = int(config.train.batch_size)

    def from_position(position: int):
        if position % batch_size or position // batch_size > len(batches):
            raise LearningError(f"{workdir} holds a run at another position; use a fresh one")
        return iter(batches[position // batch_size :])

    clock = time.perf_counter()
    result = train.train_and_evaluate(config, workdir, train_iterator_fn=from_position)
    seconds = time.perf_counter() - clock
    if result["preempted"]:
        raise SlrJaxError(f"stopped (SIGTERM); rerun with --workdir to resume in {workdir}")
    variables, _ = checkpoint_lib.latest_variables(workdir, prefer_best=False)
    return dict(result, seconds=seconds, variables=variables)


def build_reference_net(repo: str, config, variables: Mapping):
    """The reference's ``Net`` of ``config``'s setting at ``model.width`` holding
    ``variables`` (converted with ``slr_jax.convert``); every parameter and statistic set."""
    import torch

    setting = setting_of(config)
    module = reference_lib.reference_module(repo, REFERENCE_MODULE[setting])
    num_classes = int(config.model.num_classes)
    fixed = {3, num_classes - 1, num_classes}
    with trajectory.scaled_reference_channels(float(config.model.width), fixed):
        net = module.Net(pretrained=None, **reference_kwargs(config))
    if not config.model.use_low_rank:
        drop_low_rank(net)
    state = to_reference_state(variables)
    own = net.state_dict()
    # Its PAMR kernels (``_aff.*``) are constants it builds; BatchNorm step counters unused.
    own_only = lambda k: k.startswith("_aff.") or k.endswith("num_batches_tracked")
    missing = sorted(k for k in own if k not in state and not own_only(k))
    extra = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and tuple(own[k].shape) != state[k].shape)
    if missing or extra or wrong:
        raise LearningError(
            f"the reference's Net does not take slr_jax's weights: missing {missing[:3]}, "
            f"unexpected {extra[:3]}, other shapes {wrong[:3]}"
        )
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    return net


def drop_low_rank(net) -> None:
    """slr_jax's ablation ``model.use_low_rank=False`` in the reference's ``Net`` (which has
    no switch for it): its ``factorization_reconstruction`` becomes a pass-through without
    parameters, features unchanged, codes zeros (B, K, N), the dictionary its initialisation,
    as ``slr_jax.models.slrnet.SLRNet.low_rank`` does; also in ``newly_added``, the list its
    optimiser groups and state dict walk."""
    import torch

    class PassThrough(torch.nn.Module):
        def forward(self, features, dictionary_init):  # (B, N, C), (B, K, C)
            b, n, _ = features.shape
            codes = features.new_zeros(b, dictionary_init.shape[1], n)
            return features, codes, dictionary_init

    old = net.factorization_reconstruction
    net.factorization_reconstruction = PassThrough()
    for i, module in enumerate(net.newly_added):
        if module is old:
            net.newly_added[i] = net.factorization_reconstruction


def run_reference(repo: str, config, variables: Mapping, batches: Sequence[dict],
                  masks=None, progress: Callable | None = None, dtype=None) -> dict:  # fmt: skip
    """The reference's training of ``config`` from ``variables`` on ``batches``
    (``trajectory.run_reference``; ``masks``: injected dropout and gate masks, or None for its
    own draws from ``torch.manual_seed(config.seed)``; ``dtype``: a torch dtype to train in):
    ``metrics`` per step, final
    ``variables`` (converted to slr_jax's), ``seconds``."""
    import torch

    setting = setting_of(config)
    hparams, steps_per_epoch, _ = schedule_of(config)
    net = build_reference_net(repo, config, variables)
    if dtype is not None:  # float64 in tests (inside ``trajectory.torch_float64``)
        net = net.to(dtype)
    torch.manual_seed(int(config.seed))
    clock = time.perf_counter()
    run = trajectory.run_reference(
        net, setting, hparams, batches, masks, steps_per_epoch, progress=progress
    )
    seconds = time.perf_counter() - clock
    final = from_reference_state(run["state"], config)
    return {"metrics": run["metrics"], "variables": final, "seconds": seconds}


def to_reference_state(variables: Mapping) -> dict[str, np.ndarray]:
    """slr_jax variables as the reference's state dict (``slr_jax.convert``, with the
    backbone's alias names the reference's ``state_dict`` also lists)."""
    return convert.flax_to_torch(variables, with_aliases=True)


def from_reference_state(state: Mapping, config) -> dict:
    """The reference's state dict (NumPy) as slr_jax variables of ``config.model``."""
    return convert.convert_checkpoint(state, variable_shapes(build_model(config.model)))


def evaluate(config, variables: Mapping, out_dir: str, step: int) -> dict:
    """``slr_jax.evaluation``'s record of ``variables`` (as at the end of a slr_jax run)."""
    summary = evaluation.evaluate_model(config, variables, out_dir)
    pseudo = None
    if config.loss.objective == "slrnet":
        pseudo = evaluation.pseudo_label_scores(config, variables)
    return evaluation.results_of(config, step, summary, pseudo, out_dir)


# ------------------------------------------------------------------- curves and the plot
def windowed(metrics: Sequence[Mapping], every: int) -> dict[str, list]:
    """Per-step ``metrics`` averaged over windows of ``every`` steps ending at each logged step
    (and the last), as ``train.TrainLoop.log`` averages slr_jax's: ``{"step": [...], term:
    [...]}`` for every term of :data:`TERMS` present."""
    total = len(metrics)
    ends = [s for s in range(every, total + 1, every)]
    ends += [] if ends and ends[-1] == total else [total]
    curves: dict[str, list] = {"step": ends}
    starts = [0, *ends[:-1]]
    for term in (t for t in TERMS if t in metrics[0]):
        curves[term] = [
            float(np.mean([m[term] for m in metrics[a:b]])) for a, b in zip(starts, ends)
        ]
    return curves


def jax_curves(history: Sequence[Mapping]) -> dict[str, list]:
    """slr_jax's logged history as curves (the same keys as :func:`windowed`)."""
    curves: dict[str, list] = {"step": [int(h["step"]) for h in history]}
    for term in (t for t in TERMS if t in history[0]):
        curves[term] = [float(h[term]) for h in history]
    return curves


def plot_curves(runs: Sequence[Mapping], title: str, path: str) -> str:
    """One PNG: a panel per loss term, a line per framework and seed (``runs``: dicts with
    ``framework``, ``seed``, ``curves``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [t for t in TERMS if any(t in r["curves"] for r in runs)]
    cols = min(3, len(terms))
    rows = -(-len(terms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    styles = {"slr_jax": "-", "reference": "--"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, term in zip(axes.flat, terms):
        for run in runs:
            if term in run["curves"]:
                colour = colours[int(run["seed"]) % len(colours)]
                label = f"{run['framework']} seed {run['seed']}"
                curve = run["curves"]
                ax.plot(curve["step"], curve[term], styles[run["framework"]], color=colour,
                        lw=1.2, label=label)  # fmt: skip
        ax.set_title(term)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(terms) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the driver
def _row(framework: str, seed: int, record: Mapping, seconds: float) -> dict:
    nan = float("nan")
    return dict(framework=framework, seed=int(seed), miou=float(record.get("miou", nan)),
                miou_crf=float(record.get("crf_miou", nan)),
                pseudo_label_miou=float(record.get("pseudo_label_miou", nan)),
                seconds=round(float(seconds), 1))  # fmt: skip


def run_seed(repo: str, config, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Both trainings of ``config`` (its ``seed``) in ``workdir``: ``rows`` (one per
    framework) and ``runs`` (their curves)."""
    seed = int(config.seed)
    _, _, total_steps = schedule_of(config)
    log(f"seed {seed}: backbone pretraining and {total_steps} batches of the training stream")
    init_checkpoint, variables = initial_variables(config, os.path.join(workdir, "pretrain"))
    batches = stream_batches(config, total_steps)
    log(f"seed {seed}: slr_jax trains")
    ours = run_slr_jax(config, os.path.join(workdir, "slr_jax"), init_checkpoint, batches)
    log(f"seed {seed}: slr_jax {ours['eval'].get('miou')} in {ours['seconds']:.0f} s; "
        "the reference trains")  # fmt: skip
    every = max(int(config.train.log_every_steps), 1)

    def progress(step, metrics):
        if (step + 1) % (every * 8) == 0:
            log(f"  reference step {step + 1}/{total_steps}: total {metrics['total']:.4f}")

    theirs = run_reference(repo, config, variables, batches, progress=progress)
    del batches
    clock = time.perf_counter()
    record = evaluate(config, theirs["variables"], os.path.join(workdir, "reference_eval"),
                      total_steps)  # fmt: skip
    seconds = theirs["seconds"] + time.perf_counter() - clock
    log(f"seed {seed}: reference {record.get('miou')} in {seconds:.0f} s")
    rows = [_row("slr_jax", seed, ours["eval"], ours["seconds"]),
            _row("reference", seed, record, seconds)]  # fmt: skip
    runs = [
        dict(framework="slr_jax", seed=seed, curves=jax_curves(ours["history"])),
        dict(framework="reference", seed=seed, curves=windowed(theirs["metrics"], every)),
    ]
    return {"rows": rows, "runs": runs}


def run(repo: str, config, config_path: str, seeds: Sequence[int], workdir: str,
        plot: str | None, log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Every seed's two trainings; the report of the module docstring."""
    setting = check_config(config)
    reference_lib.reference_module(repo, REFERENCE_MODULE[setting])  # a bad checkout fails now
    rows, runs = [], []
    for seed in seeds:
        seeded = config.copy_and_resolve_references()
        seeded.seed = int(seed)
        seed_dir = os.path.join(workdir, f"seed_{seed}")
        done = os.path.join(seed_dir, SEED_RESULT)
        if os.path.exists(done):  # a finished seed of an interrupted run is kept, not redone
            with open(done) as f:
                out = json.load(f)
            log(f"seed {seed}: the finished runs in {seed_dir}")
        else:
            out = run_seed(repo, seeded, seed_dir, log)
            with open(done, "w") as f:
                json.dump(out, f)
        rows += out["rows"]
        runs += out["runs"]
    plot = plot or os.path.join("docs", f"learning_{setting}.png")
    title = (
        f"{os.path.basename(config_path)} ({setting}): slr_jax (solid) and the reference (dashed)"
    )
    plot_curves(runs, title, plot)
    return {"config": config_path, "setting": setting, "rows": rows, "plot": plot,
            "curves": runs}  # fmt: skip


def _load_config(argv: Sequence[str]):
    """The ml_collections config of ``--config=FILE [--config.KEY=VALUE ...]``."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                    lock_config=True)  # fmt: skip
    values(["learning", *argv])
    if values.config is None:
        raise LearningError("--config=FILE is required (configs/demo*.py)")
    return values.config, values["config"].config_filename


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slr_jax.parity.learning", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--reference-repo", required=True,
                        help="checkout of github.com/DesertsP/SLRNet")  # fmt: skip
    parser.add_argument("--seeds", default="0", help="comma-separated config seeds")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--plot", help="PNG of the loss curves (default docs/learning_SETTING.png)")
    parser.add_argument("--workdir", help="run folders (default: a temporary folder)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("the learning comparison needs PyTorch: pip install torch", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"--seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    try:
        config, config_path = _load_config(rest)
        with contextlib.ExitStack() as stack:
            workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
            report = run(args.reference_repo, config, config_path, seeds, workdir, args.plot)
    except (FileNotFoundError, SlrJaxError, ValueError) as error:
        print(str(error).splitlines()[0] if str(error) else repr(error), file=sys.stderr)
        return 2
    for row in report["rows"]:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
