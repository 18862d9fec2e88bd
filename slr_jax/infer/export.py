"""Writing predictions: label PNGs laid out as the reference writes them, overlays, restart keys.

``out_dir/pred/<name>.png`` (argmax, no CRF), ``out_dir/crf/<name>.png``, ``out_dir/probs/
<name>.npy`` (H, W, C) float32, ``out_dir/overlay/<name>.png`` (not in the reference). Every
file appears complete or not at all (written under a temporary name, then renamed).

Restart: a label PNG carries, in its text chunk :data:`PNG_KEY`, a key of everything that
decided it (settings, model config, variables, the image's pixels and labels used); a run
with the same key skips images whose outputs are complete (:func:`finished_outputs`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image, PngImagePlugin

from slr_jax.constants import voc_palette
from slr_jax.errors import InferenceError

# PNG text chunk holding the key of the run + image that wrote a label map (restart check).
PNG_KEY = "slr_jax_key"
# Weight of the class colour in an overlay: (1 - a) * image + a * palette[label].
OVERLAY_ALPHA = 0.5
# Test settings that change no label map (left out of the restart key).
UNKEYED_SETTINGS = ("resume", "save_overlays")


def replace_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """Writes through ``write(file)`` to a temporary file beside ``path``, then renames it, so
    an interrupted run never leaves a half-written output under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_label_png(
    path: str | os.PathLike, labels: np.ndarray, palette: bool = True, key: str | None = None
) -> Path:
    """Writes (H, W) class indices as a PNG: palette mode 'P' in VOC colours, or grey 'L'.

    Either way the stored pixel values are the class indices. ``key`` is stored in the PNG's
    text chunk :data:`PNG_KEY` (the restart check). The file appears complete or not at all
    (written to a temporary name, then renamed).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise InferenceError(
            f"label map must be (H, W) with values 0..255, got shape {labels.shape}."
        )
    path = Path(path)
    image = Image.fromarray(labels.astype(np.uint8))
    if palette:
        image = image.convert("P")
        image.putpalette(voc_palette())
    info = PngImagePlugin.PngInfo()
    if key is not None:
        info.add_text(PNG_KEY, key)
    replace_atomically(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))
    return path


def _safe_name(name: str) -> str:
    name = str(name)
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts:
        raise InferenceError(
            f"example name {name!r} cannot name an output file; use a relative id such as "
            "'2007_000033'."
        )
    return name


def output_paths(out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Where one example's outputs go: ``pred``/``crf`` PNGs and the ``probs`` .npy."""
    name = _safe_name(name)
    out_dir = Path(out_dir)
    return {
        "pred": out_dir / "pred" / f"{name}.png",
        "crf": out_dir / "crf" / f"{name}.png",
        "probs": out_dir / "probs" / f"{name}.npy",
        "overlay": out_dir / "overlay" / f"{name}.png",
    }


def blend_labels(
    image_uint8: np.ndarray, labels: np.ndarray, alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
    """(H, W, 3) uint8: ``round((1 - alpha) * image + alpha * colour(labels))`` per pixel,
    colours from the VOC palette (255, the ignore label, is its light boundary colour)."""
    image_uint8, labels = np.asarray(image_uint8), np.asarray(labels)
    if image_uint8.shape[:2] != labels.shape or image_uint8.shape[-1:] != (3,):
        raise InferenceError(
            f"cannot blend labels of shape {labels.shape} into an image of shape "
            f"{image_uint8.shape}; both need the same (H, W)."
        )
    if not 0.0 <= alpha <= 1.0:
        raise InferenceError(f"overlay alpha must lie in [0, 1], got {alpha}.")
    colours = np.asarray(voc_palette(), np.float64).reshape(256, 3)[labels.astype(np.uint8)]
    mixed = (1.0 - alpha) * image_uint8.astype(np.float64) + alpha * colours
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def overlay_image(
    image_uint8: np.ndarray,
    labels: np.ndarray,
    ground_truth: np.ndarray | None = None,
    alpha: float = OVERLAY_ALPHA,
) -> np.ndarray:
    """The prediction blended into the image, (H, W, 3) uint8, with the ground-truth blend
    to its right, (H, 2W, 3), when ``ground_truth`` (H, W) is given (see :func:`blend_labels`).
    """
    blended = blend_labels(image_uint8, labels, alpha)
    if ground_truth is None:
        return blended
    return np.concatenate([blended, blend_labels(image_uint8, ground_truth, alpha)], axis=1)


def save_overlay_png(path: str | os.PathLike, overlay: np.ndarray) -> Path:
    """Writes an (H, W, 3) uint8 overlay as an RGB PNG, atomically (temporary name, rename)."""
    path = Path(path)
    image = Image.fromarray(np.ascontiguousarray(overlay, np.uint8))
    replace_atomically(path, lambda handle: image.save(handle, format="PNG"))
    return path


def export_pseudo_labels(
    out_dir: str | os.PathLike,
    name: str,
    labels: np.ndarray,
    *,
    crf_labels: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    palette: bool = True,
    key: str | None = None,
    overlay: np.ndarray | None = None,
) -> dict[str, Path]:
    """Writes one example's outputs, as the reference lays them out.

    ``out_dir/pred/<name>.png`` (argmax, no CRF), ``out_dir/crf/<name>.png`` when
    ``crf_labels`` is given, ``out_dir/probs/<name>.npy`` (H, W, C) float32 when ``probs`` is
    given, ``out_dir/overlay/<name>.png`` (RGB, :func:`overlay_image`) when ``overlay`` is
    given (not in the reference). Returns the written paths by kind.

    With a ``key`` (restartable runs) the example's earlier PNGs are removed first and the
    label PNGs, which carry the key, are written last; an earlier ``.npy`` or overlay is
    replaced or, when not given, removed. So a label PNG with a given key always sits beside
    the scores and overlay of that same computation, or beside none.
    """
    paths = output_paths(out_dir, name)
    if key is not None:
        for kind in ("pred", "crf"):
            paths[kind].unlink(missing_ok=True)
        if probs is None:
            paths["probs"].unlink(missing_ok=True)
        if overlay is None:
            paths["overlay"].unlink(missing_ok=True)
    written = {}
    if probs is not None:
        array = np.asarray(probs, np.float32)
        replace_atomically(paths["probs"], lambda handle: np.save(handle, array))
        written["probs"] = paths["probs"]
    if overlay is not None:
        written["overlay"] = save_overlay_png(paths["overlay"], overlay)
    if crf_labels is not None:
        written["crf"] = save_label_png(paths["crf"], crf_labels, palette, key)
    written["pred"] = save_label_png(paths["pred"], labels, palette, key)
    return written


def _read_keyed_png(path: Path, key: str, shape: tuple[int, int], num_classes: int):
    """The (H, W) labels of ``path`` if it is a readable PNG written with ``key``, else None."""
    try:
        with Image.open(path) as png:
            if png.format != "PNG" or png.text.get(PNG_KEY) != key:
                return None
            labels = np.array(png)
    except (OSError, ValueError, SyntaxError):  # missing, truncated or not an image
        return None
    if labels.shape != tuple(shape) or labels.max(initial=0) >= num_classes:
        return None
    return labels


def finished_outputs(
    out_dir: str | os.PathLike,
    name: str,
    key: str,
    shape: tuple[int, int],
    num_classes: int,
    *,
    use_crf: bool,
    save_probs: bool,
) -> dict[str, np.ndarray] | None:
    """The saved label maps {'pred': (H, W)[, 'crf': ...]} of an example a run with the same
    ``key`` completed, or None when any output it needs is missing, unreadable, of another
    size, or was written by a different run (settings, variables or image)."""
    paths = output_paths(out_dir, name)
    labels = {}
    for kind in ("pred", "crf") if use_crf else ("pred",):
        found = _read_keyed_png(paths[kind], key, shape, num_classes)
        if found is None:
            return None
        labels[kind] = found
    if save_probs:
        try:
            probs = np.load(paths["probs"], mmap_mode="r")
        except (OSError, ValueError):
            return None
        if probs.shape != (*shape, num_classes) or probs.dtype != np.float32:
            return None
    return labels


def variables_fingerprint(variables: Any) -> str:
    """Hex digest of every leaf's path, dtype, shape and bytes (same variables, same digest).

    A leaf sharded over several processes contributes the shards this process holds.
    """
    digest = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            parts = [(str(s.index), s.data) for s in leaf.addressable_shards]
        else:
            leaf = np.asarray(jax.device_get(leaf))
            parts = [("", leaf)]
        digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};".encode())
        for index, part in parts:
            array = np.ascontiguousarray(np.asarray(jax.device_get(part)))
            digest.update(index.encode())
            digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def run_key(settings: Mapping[str, Any], model_cfg: Any, variables: Any, apply_fn: Any) -> str:
    """Digest of everything that decides an image's outputs except the image itself: the
    ``test`` settings (``resume`` and ``save_overlays`` aside: they change no label), the model
    config, the variables, and the name of a custom ``apply_fn``."""
    model = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    described = {
        "settings": {k: v for k, v in settings.items() if k not in UNKEYED_SETTINGS},
        "model": model,
        "apply_fn": getattr(apply_fn, "__qualname__", type(apply_fn).__name__),
        "variables": variables_fingerprint(variables),
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def image_key(key: str, image_uint8: np.ndarray, image_labels: np.ndarray | None) -> str:
    """The restart key of one image: ``key`` (:func:`run_key`) + its pixels (+ labels used)."""
    digest = hashlib.blake2b(key.encode(), digest_size=16)
    digest.update(f"{image_uint8.shape}".encode())
    digest.update(np.ascontiguousarray(image_uint8).reshape(-1))
    if image_labels is not None:
        digest.update(np.asarray(image_labels, np.float32).tobytes())
    return digest.hexdigest()
