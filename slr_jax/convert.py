"""PyTorch <-> Flax weights for SLRNet, and ``python -m slr_jax.convert``.

Flax paths mirror the reference's module paths (``docs/design.md``), so a state-dict key
``a.b.0.weight`` is the Flax leaf ``('a', 'b', '0', kernel|scale)``. Layouts: conv
(O, I, kh, kw) -> (kh, kw, I, O); linear (out, in) -> (in, out); BatchNorm ``weight``/``bias``
-> ``scale``/``bias`` (params), ``running_mean``/``running_var`` -> ``mean``/``var``
(batch_stats).

Two kinds of PyTorch file are read:

- the ImageNet backbone (``ilsvrc-cls_rna-a1_cls1000_ep-0001.pth``): a flat state dict of
  backbone keys (``conv1a.weight``, ``b2.bn_branch2a.running_mean``, ...). Only backbone leaves
  are replaced; keys the backbone does not have (its ImageNet classifier) are ignored.
- a full reference checkpoint (``{'state_dict': ...}`` saved by its trainer, or a bare state
  dict), keys prefixed ``backbone.``, ``aspp.``, ... (a DistributedDataParallel ``module.``
  prefix is stripped).

and, for the stage-2 DeepLabV3+, torchvision's ImageNet ResNet (``resnet101-63fe2227.pth``,
i.e. ``torchvision.models.resnet101(weights=...).state_dict()``) with ``--setting resnet101``
(or ``resnet50``): the ``slr_jax.models.resnet.ResNet`` variables alone (``params`` +
``batch_stats``, the ``fc.`` classifier dropped), metadata ``source='imagenet_resnet101'``;
``slr_jax.models.deeplab.with_backbone`` puts them into a DeepLab's variables.

Usage::

  python -m slr_jax.convert --torch model.pth --out /ckpt/slrnet_voc [--setting wsss]
  python -m slr_jax.convert --torch resnet101-63fe2227.pth --out /ckpt/resnet101 \
      --setting resnet101
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from slr_jax import cli, models
from slr_jax.checkpoint import CheckpointError, is_variables_checkpoint, save_variables
from slr_jax.models.resnet import RESNET_LAYERS, resnet_variable_shapes

# Buffers of the reference that are constants of the algorithm, not learned state.
IGNORED_KEY_SUFFIXES = ("num_batches_tracked",)
# PAMR's fixed shift kernels, and the reference's ModuleList registrations that alias modules
# stored under their own names too (``backbone.fixed_layers.1`` is ``backbone.b2``, ...).
IGNORED_KEY_PREFIXES = ("_aff.", "backbone.fixed_layers.", "fixed_layers.", "newly_added.")
# Where those aliases point, so that ``flax_to_torch(..., with_aliases=True)`` loads strictly.
REFERENCE_ALIASES = {
    "backbone.fixed_layers.0.": "backbone.conv1a.",
    "backbone.fixed_layers.1.": "backbone.b2.",
    "backbone.fixed_layers.2.": "backbone.b2_1.",
    "backbone.fixed_layers.3.": "backbone.b2_2.",
    "newly_added.0.": "aspp.",
    "newly_added.1.": "shallow_mask.",
    "newly_added.3.": "fc8_skip.",
    "newly_added.4.": "fc8_x.",
    "newly_added.5.": "last_conv.",
    "newly_added.6.": "factorization_reconstruction.",
    "newly_added.8.": "aux_head.",
}
SETTINGS = {
    "wsss": dict(variant="wsss", num_classes=21),
    "semi": dict(variant="semi", num_classes=21),
    "semi_wo_cls": dict(variant="semi_wo_cls", num_classes=21),
    "coco": dict(variant="coco", num_classes=81),
}
# torchvision ImageNet backbones for the stage-2 DeepLabV3+ (``--setting resnet101``).
TORCHVISION_RESNETS = {
    "resnet50": dict(depth=50, width=1.0),
    "resnet101": dict(depth=101, width=1.0),
}
# torchvision's ImageNet classifier, which the backbone does not build.
TORCHVISION_CLASSIFIER_PREFIX = "fc."


def _torch_key(collection: str, path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """(PyTorch key, layout kind) of the Flax leaf ``collection/path``."""
    *modules, leaf = path
    prefix = ".".join(modules)
    if collection == "batch_stats":
        name = {"mean": "running_mean", "var": "running_var"}[leaf]
        return f"{prefix}.{name}", "copy"
    if leaf == "kernel":
        return f"{prefix}.weight", "conv" if ndim == 4 else "linear"
    if leaf == "scale":
        return f"{prefix}.weight", "copy"
    if leaf == "bias":
        return f"{prefix}.bias", "copy"
    raise ValueError(f"no PyTorch equivalent for Flax leaf {collection}/{'/'.join(path)}")


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if kind == "linear":
        return np.transpose(value, (1, 0))
    return value


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(value, (3, 2, 0, 1))
    if kind == "linear":
        return np.transpose(value, (1, 0))
    return value


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _shape(leaf: Any) -> tuple[int, ...]:
    """Shape of an array or ``jax.ShapeDtypeStruct`` leaf."""
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _leaves(variables: Mapping) -> dict[tuple[str, ...], Any]:
    """``{(collection, *path): leaf}`` for ``params`` and ``batch_stats``."""
    flat = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
            flat[(collection, *path)] = leaf
    return flat


def strip_state_dict(checkpoint: Mapping) -> dict[str, Any]:
    """The model state dict inside a reference checkpoint, without ``module.`` prefixes."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointError(
            "expected a state dict or {'state_dict': ...}, got " + type(checkpoint).__name__
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def torch_to_flax(
    state_dict: Mapping[str, Any],
    template: Mapping,
    *,
    prefix: str = "",
    subtree: tuple[str, ...] = (),
    ignore_unexpected: bool = False,
) -> dict:
    """Flax variables with the leaves of ``template`` under ``subtree`` taken from ``state_dict``.

    Args:
      state_dict: PyTorch key -> tensor/array.
      template: Flax ``{'params', 'batch_stats'}`` giving the expected structure and shapes
        (e.g. from ``slr_jax.models.init_variables``); leaves outside ``subtree`` are kept.
      prefix: prepended to the Flax path when forming PyTorch keys ('' for the backbone file,
        whose keys have no ``backbone.`` prefix while ``subtree=('backbone',)``).
      subtree: only Flax leaves whose module path starts with this are converted.
      ignore_unexpected: do not fail on state-dict keys that match no Flax leaf.

    Raises:
      CheckpointError listing every missing, unexpected and wrong-shaped key.
    """
    flat = _leaves(template)
    consumed, missing, wrong_shape, out = set(), [], [], {}
    for (collection, *path), leaf in flat.items():
        path = tuple(path)
        if path[: len(subtree)] != subtree:
            out[(collection, *path)] = leaf
            continue
        shape = _shape(leaf)
        key, kind = _torch_key(collection, path[len(subtree) :], len(shape))
        key = prefix + key
        if key not in state_dict:
            missing.append(key)
            continue
        consumed.add(key)
        value = _to_flax(_as_numpy(state_dict[key]), kind)
        if value.shape != shape:
            wrong_shape.append(f"{key}: file {value.shape} vs model {shape} (Flax layout)")
            continue
        out[(collection, *path)] = value
    unexpected = [
        k for k in state_dict
        if k not in consumed and k.startswith(prefix)
        and not k.endswith(IGNORED_KEY_SUFFIXES) and not k.startswith(IGNORED_KEY_PREFIXES)
    ]  # fmt: skip
    if ignore_unexpected:
        if unexpected:
            logging.info(
                "ignored %d keys with no Flax counterpart: %s", len(unexpected), unexpected[:8]
            )
        unexpected = []
    if missing or unexpected or wrong_shape:
        raise CheckpointError(_mismatch_message(missing, unexpected, wrong_shape))
    nested = {}
    for (collection, *path), value in out.items():
        nested.setdefault(collection, {})[tuple(path)] = value
    return {c: traverse_util.unflatten_dict(v) for c, v in nested.items()}


def _mismatch_message(missing, unexpected, wrong_shape) -> str:
    lines = ["PyTorch weights do not fit the Flax model (was it built with the same variant, "
             "num_classes and width=1.0?):"]  # fmt: skip
    for title, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", wrong_shape),
    ):
        if items:
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]))
            if len(items) > 20:
                lines.append(f"    ... and {len(items) - 20} more")
    return "\n".join(lines)


def flax_to_torch(variables: Mapping, *, with_aliases: bool = False) -> dict[str, np.ndarray]:
    """Inverse of ``torch_to_flax``: a PyTorch-layout state dict of NumPy arrays.

    ``with_aliases`` adds the reference's ModuleList alias keys (``backbone.fixed_layers.*``,
    ``newly_added.*``) so the result loads into its ``Net`` with ``strict=True`` apart from
    PAMR's constant ``_aff.*`` buffers.
    """
    out = {}
    for (collection, *path), leaf in _leaves(variables).items():
        key, kind = _torch_key(collection, tuple(path), np.ndim(leaf))
        out[key] = _to_torch(np.asarray(leaf), kind)
    if with_aliases:
        for alias, target in REFERENCE_ALIASES.items():
            out.update(
                {alias + k[len(target) :]: v for k, v in list(out.items()) if k.startswith(target)}
            )
    return out


def convert_checkpoint(checkpoint: Mapping, template: Mapping) -> dict:
    """Full reference checkpoint (``{'state_dict': ...}`` or a state dict) -> Flax variables."""
    return torch_to_flax(strip_state_dict(checkpoint), template)


def convert_backbone(state_dict: Mapping, template: Mapping) -> dict:
    """ImageNet backbone state dict -> ``template`` with its backbone leaves replaced."""
    return torch_to_flax(
        strip_state_dict(state_dict), template, subtree=("backbone",), ignore_unexpected=True
    )


def convert_torchvision_resnet(
    state_dict: Mapping[str, Any], *, depth: int = 101, width: float = 1.0
) -> dict:
    """torchvision ``resnet{50,101}().state_dict()`` -> ``{'params', 'batch_stats'}`` of
    ``slr_jax.models.resnet.ResNet`` (NumPy float32; conv OIHW -> HWIO).

    ``state_dict`` maps keys to torch tensors or NumPy arrays (torch is not needed for NumPy);
    a ``module.`` prefix or a ``{'state_dict': ...}`` wrapper is accepted. ``fc.*`` and
    ``*.num_batches_tracked`` are dropped; every other key must match.

    Raises:
      CheckpointError listing every missing, unexpected and wrong-shaped key.
    """
    if depth not in RESNET_LAYERS:
        raise ValueError(f"depth must be one of {sorted(RESNET_LAYERS)}, got {depth}")
    state = {
        k: v
        for k, v in strip_state_dict(state_dict).items()
        if not k.startswith(TORCHVISION_CLASSIFIER_PREFIX)
    }
    try:
        return torch_to_flax(state, resnet_variable_shapes(RESNET_LAYERS[depth], width))
    except CheckpointError as e:
        # Keep the key lists, replace the SLRNet-specific first line with the ResNet's.
        details = str(e).split("\n", 1)[-1]
        raise CheckpointError(
            f"weights do not fit torchvision resnet{depth} at width {width} (a state dict of "
            f"another depth, or not a torchvision ResNet?):\n{details}"
        ) from None


def looks_like_backbone_file(state_dict: Mapping) -> bool:
    """True for the ImageNet file (keys ``conv1a.weight`` ...), False for a full checkpoint."""
    return "conv1a.weight" in state_dict and not any(k.startswith("backbone.") for k in state_dict)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m slr_jax.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--torch", required=True, help="PyTorch .pth file (backbone or full checkpoint)"
    )
    parser.add_argument("--out", required=True, help="output folder (local or gs://)")
    parser.add_argument(
        "--setting",
        default="wsss",
        choices=sorted(SETTINGS) + sorted(TORCHVISION_RESNETS),
        help="SLRNet variant of the file, or resnet50/resnet101 for a torchvision ImageNet "
        "ResNet (the DeepLabV3+ backbone)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="init seed of head weights (backbone file)"
    )
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "slr_jax.convert needs PyTorch to read .pth files: pip install torch"
        ) from None
    checkpoint = _read_torch_file(torch, args.torch)
    if args.setting in TORCHVISION_RESNETS:
        return _write_torchvision_resnet(checkpoint, args)
    setting = SETTINGS[args.setting]
    model = models.SLRNet(**setting)
    try:
        state = strip_state_dict(checkpoint)
        if looks_like_backbone_file(state):
            # The heads are not in the file: they start from a random init.
            init = models.init_variables(model, jax.random.key(args.seed))
            template = jax.tree_util.tree_map(np.asarray, init)
            variables, source = convert_backbone(state, template), "imagenet_backbone"
        else:
            # Every leaf comes from the file, so shapes are enough (no 100M-parameter init).
            variables = convert_checkpoint(state, models.variable_shapes(model))
            source = "reference_checkpoint"
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = dict(setting, width=model.width, source=source, torch_file=str(args.torch))
    _save(args.out, variables, meta, f"{source} weights ({args.setting})")
    return 0


def _write_torchvision_resnet(checkpoint: Any, args: argparse.Namespace) -> int:
    """The ``--setting resnet50|resnet101`` branch of :func:`main`; returns the exit code."""
    setting = TORCHVISION_RESNETS[args.setting]
    try:
        variables = convert_torchvision_resnet(checkpoint, **setting)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = dict(
        setting,
        architecture="torchvision_resnet",
        source=f"imagenet_{args.setting}",
        torch_file=str(args.torch),
    )
    _save(args.out, variables, meta, f"imagenet_{args.setting} weights")
    return 0


def _save(out: str, variables: Any, meta: dict, what: str) -> None:
    """Writes the variables checkpoint and says whether it replaced one already in ``out``."""
    replaced = is_variables_checkpoint(out)
    path = save_variables(out, variables, meta)
    if replaced:
        print(f"replaced the checkpoint in {path} with {what} (the old one is gone)")
    else:
        print(f"wrote {what} to {path}")


# What a PyTorch file starts with: a zip archive (torch.save since 1.6) or a pickle (older).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _read_torch_file(torch: Any, path: str) -> Any:
    """``torch.load`` of ``path`` (tensors only, never code), or one CheckpointError naming
    the file and why it is not a PyTorch checkpoint."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"--torch {path}: no such file.") from None
    except OSError as error:
        raise CheckpointError(f"--torch {path} cannot be read ({error.strerror}).") from None
    if not head.startswith(_TORCH_MAGIC):
        raise CheckpointError(
            f"--torch {path} is not a PyTorch checkpoint (such a file is a zip archive or a "
            f"pickle; this one starts with {head!r}): pass the .pth file torch.save wrote."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # A damaged or foreign file raises many error types; the first line says which.
    except Exception as error:  # noqa: BLE001
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"--torch {path} cannot be read as a PyTorch checkpoint of tensors "
            f"({type(error).__name__}: {reason}); pass the .pth file of the weights."
        ) from None


if __name__ == "__main__":
    cli.run_cli(main)
