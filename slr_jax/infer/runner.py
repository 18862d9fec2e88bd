"""The inference driver: predict, post-process, write and score every example of a stream.

``run_inference(config, variables, examples, out_dir)`` is what evaluation during training,
``python -m slr_jax.main --mode=evaluate|infer`` and ``python -m slr_jax.infer`` run. It adds
to the reference's per-image procedure (``predict``, ``postprocess``):

- data parallelism over the local devices: image i's forward passes run on device ``i mod n``,
  up to ``2 n`` images in flight (JAX's asynchronous dispatch) while the host prepares the
  next views and finishes earlier images in input order;
- restart (``test.resume``): an image whose outputs a run with the same key already wrote is
  not predicted again; its saved label maps are scored instead (``export.finished_outputs``);
- scoring of every example with ground truth (confusion matrices per kind, ``pred`` and
  ``crf``), summed over processes by the caller.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from slr_jax import metrics
from slr_jax.constants import IGNORE_LABEL, MASK_STRIDE
from slr_jax.errors import InferenceError
from slr_jax.infer import export
from slr_jax.infer.postprocess import adjust_probabilities, crf_settings, label_maps
from slr_jax.infer.predict import (
    ApplyFn,
    PendingPrediction,
    check_bucket_step,
    check_scales,
    multiscale_predict_async,
)
from slr_jax.infer.preprocess import (
    BUCKET_PAD_MODES,
    check_bucket_sizes,
    example_error,
    example_fields,
)
from slr_jax.models import build_model


def inference_settings(test_cfg: Any) -> dict[str, Any]:
    """``config.test`` checked and turned into a plain dict (scales, CRF keys, buckets, flags)."""
    settings = test_cfg.to_dict() if hasattr(test_cfg, "to_dict") else dict(test_cfg)
    settings["scales"] = check_scales(settings["scales"])
    settings["crf"] = crf_settings(settings["crf"])
    settings["class_pows"] = {int(k): float(v) for k, v in dict(settings["class_pows"]).items()}
    settings["bucket_step"] = check_bucket_step(settings["bucket_step"], MASK_STRIDE)
    settings["bucket_sizes"] = check_bucket_sizes(settings["bucket_sizes"])
    if settings["bucket_pad"] not in BUCKET_PAD_MODES:
        raise InferenceError(
            f"config.test.bucket_pad={settings['bucket_pad']!r}; expected one of "
            f"{BUCKET_PAD_MODES}."
        )
    for flag in ("resume", "save_overlays", "flip", "use_crf", "use_image_labels"):
        if not isinstance(settings[flag], (bool, np.bool_)):
            raise InferenceError(
                f"config.test.{flag} must be True or False, got {settings[flag]!r}."
            )
    return settings


def inference_devices(devices: Sequence[Any] | None, variables: Any) -> list[Any]:
    """The local devices :func:`run_inference` spreads images over (default: all of them).

    Variables sharded over several processes cannot be copied whole to one device, so then
    only the default device is used (each process still predicts its own share of examples).
    """
    local = jax.local_devices()
    devices = list(local if devices is None else devices)
    if not devices:
        raise InferenceError("devices is empty; pass None for all local devices.")
    foreign = [d for d in devices if d not in local]
    if foreign:
        raise InferenceError(
            f"devices {foreign} are not local to this process (jax.local_devices() is {local}); "
            "each process predicts on its own devices."
        )
    sharded = any(
        isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        for leaf in jax.tree_util.tree_leaves(variables)
    )
    return devices[:1] if sharded else devices


def _device_name(device: Any) -> str:
    return f"{device.platform}:{device.id}"


def prepare_output_dir(out_dir: str | os.PathLike) -> Path:
    """Creates ``out_dir`` and checks that files can be written there, before any prediction
    (a mistake found after the first image would waste its compilation and forward pass)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InferenceError(f"--output {out_dir} is a file; pass a folder (new or existing).")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_check.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InferenceError(
            f"cannot write to the output folder {out_dir} ({error.strerror or error}); choose "
            "a folder you can write to."
        ) from None
    return out_dir


class InferenceRun:
    """The state of one :func:`run_inference` call: settings, device placements, counters and
    the confusion matrices. :meth:`start` dispatches an example, :meth:`finish` completes it."""

    def __init__(self, config, variables, out_dir, *, apply_fn, save_probs, palette, devices):
        self.settings = inference_settings(config.test)
        self.out_dir = prepare_output_dir(out_dir)
        self.save_probs, self.palette = save_probs, palette
        self.num_classes = int(config.model.num_classes)
        slrnet = config.model.arch == "slrnet"
        # DeepLab's masks are a plain softmax: no class scores to filter by (as semi_wo_cls).
        self.filter_classes = slrnet and config.model.variant != "semi_wo_cls"
        if apply_fn is None:
            model = build_model(config.model)
            if slrnet:
                model = model.clone(num_iters=int(self.settings["num_iters"]))
            apply_fn = model.apply
        self.apply_fn = apply_fn
        self.key = export.run_key(self.settings, config.model, variables, apply_fn)
        devices = inference_devices(devices, variables)
        if len(devices) == 1 and devices[0] == jax.local_devices()[0]:
            self.placements = [(None, variables)]  # one device: nothing committed
        else:
            self.placements = [(d, jax.device_put(variables, d)) for d in devices]
        self.window = 1 if len(self.placements) == 1 else 2 * len(self.placements)
        self.next_placement = 0
        kinds = ("pred", "crf") if self.settings["use_crf"] else ("pred",)
        self.accumulators = {k: metrics.ConfusionAccumulator(self.num_classes) for k in kinds}
        self.counts = {"images": 0, "predicted": 0, "skipped": 0, "scored": 0}
        self.failed: list[tuple[str, str]] = []  # (name, why) of examples that could not be read
        self.per_device: dict[str, int] = {}
        self.predict_seconds = 0.0

    def start(self, example: Mapping[str, Any]) -> dict[str, Any] | None:
        """Reads one example and dispatches its forward passes, unless its outputs are already
        complete; returns the entry :meth:`finish` completes (None for padding examples)."""
        started = time.perf_counter()
        error = example_error(example)
        if error:
            self.failed.append(error)
            return None
        fields = example_fields(example)
        if fields is None:
            return None
        image_uint8, image_labels = fields["image_uint8"], None
        if self.settings["use_image_labels"]:
            image_labels = fields["labels"]
            if image_labels is None:
                raise InferenceError(
                    f"{fields['name']}: config.test.use_image_labels is set but the example has "
                    "no 'labels'; turn it off to use predicted class presence."
                )
        key = export.image_key(self.key, image_uint8, image_labels)
        entry = {"fields": fields, "key": key, "image_labels": image_labels, "outputs": None}
        if self.settings["resume"]:
            entry["outputs"] = export.finished_outputs(
                self.out_dir, fields["name"], key, image_uint8.shape[:2], self.num_classes,
                use_crf=self.settings["use_crf"], save_probs=self.save_probs,
            )  # fmt: skip
        if entry["outputs"] is None:
            device, device_variables = self.placements[self.next_placement]
            self.next_placement = (self.next_placement + 1) % len(self.placements)
            entry["pending"] = multiscale_predict_async(
                self.apply_fn, device_variables, image_uint8, self.settings,
                rescore=self._rescore(), device=device,
            )  # fmt: skip
            entry["seconds"] = time.perf_counter() - started
        return entry

    def _rescore(self) -> bool:
        settings = self.settings
        return bool(settings["bucket_step"]) and self.filter_classes and settings["mode"] == "test"

    def _overlay(self, fields: Mapping[str, Any], outputs: Mapping[str, np.ndarray]):
        """The prediction blended into the image (the CRF labels when there are some)."""
        labels = outputs.get("crf", outputs["pred"])
        return export.overlay_image(fields["image_uint8"], labels, fields["mask"])

    def _predict_and_write(self, entry: dict[str, Any]) -> tuple[dict, str]:
        finish_started = time.perf_counter()
        fields, pending = entry["fields"], entry["pending"]
        device = _device_name(pending.device)
        outputs, probs = self._labels_of(pending, fields["image_uint8"], entry["image_labels"])
        save_overlay = self.settings["save_overlays"]
        export.export_pseudo_labels(
            self.out_dir, fields["name"], outputs["pred"], crf_labels=outputs.get("crf"),
            probs=probs if self.save_probs else None, palette=self.palette, key=entry["key"],
            overlay=self._overlay(fields, outputs) if save_overlay else None,
        )  # fmt: skip
        self.counts["predicted"] += 1
        self.per_device[device] = self.per_device.get(device, 0) + 1
        self.predict_seconds += entry["seconds"] + time.perf_counter() - finish_started
        return outputs, f"{self.counts['predicted'] / self.predict_seconds:.2f} images/s"

    def _labels_of(self, pending: PendingPrediction, image_uint8, image_labels):
        """({'pred'[, 'crf']} label maps, adjusted probabilities (H, W, C)); waits for the
        device."""
        cls, masks = pending.result()
        probs = adjust_probabilities(
            cls, masks, self.settings, image_labels=image_labels,
            filter_classes=self.filter_classes,
        )  # fmt: skip
        return label_maps(probs, self.settings, image_uint8), probs

    def finish(self, entry: dict[str, Any], log: Callable[[str], None] | None) -> None:
        """Waits for one example's predictions, writes them and adds them to the scores."""
        fields, outputs = entry["fields"], entry["outputs"]
        if outputs is None:
            outputs, status = self._predict_and_write(entry)
        else:
            self.counts["skipped"] += 1
            status = "done before, skipped"
            overlay_path = export.output_paths(self.out_dir, fields["name"])["overlay"]
            if self.settings["save_overlays"] and not overlay_path.exists():
                export.save_overlay_png(overlay_path, self._overlay(fields, outputs))
        gt = fields["mask"]
        if gt is not None and (np.asarray(gt) != IGNORE_LABEL).any():
            for kind, labels in outputs.items():
                self.accumulators[kind].update(labels, np.asarray(gt))
            self.counts["scored"] += 1
        self.counts["images"] += 1
        if log is not None:
            height, width = fields["image_uint8"].shape[:2]
            log(f"{fields['name']}: {width}x{height} ({status})")

    def summary(self, seconds: float) -> dict[str, Any]:
        counts = self.counts
        scored = counts["scored"]
        return {
            "num_images": counts["images"],
            "num_predicted": counts["predicted"],
            "num_skipped": counts["skipped"],
            "num_scored": scored,
            "seconds": seconds,
            "images_per_second": (
                counts["predicted"] / self.predict_seconds if counts["predicted"] else None
            ),
            "images_per_device": dict(self.per_device),
            "out_dir": Path(self.out_dir),
            "scores": {k: a.result() for k, a in self.accumulators.items()} if scored else {},
            "confusions": {k: a.confusion.copy() for k, a in self.accumulators.items()},
            "failed": list(self.failed),
        }


def _summary_line(summary: Mapping[str, Any]) -> str:
    rate = summary["images_per_second"]
    rate_text = f"{rate:.2f} images/s" if rate is not None else "no forward pass"
    per_device = summary["images_per_device"]
    spread = ", ".join(f"{d}: {n}" for d, n in sorted(per_device.items()))
    failed = summary["failed"]
    names = ", ".join(name for name, _ in failed)
    return (
        f"{summary['num_images']} images in {summary['seconds']:.1f} s: "
        f"{summary['num_predicted']} predicted ({rate_text}), {summary['num_skipped']} already "
        f"in {summary['out_dir']}"
        + (f"; images per device {spread}" if len(per_device) > 1 else "")
        + (f"; {len(failed)} unreadable, skipped: {names}" if failed else "")
    )


def run_inference(
    config: Any,
    variables: Any,
    examples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    apply_fn: ApplyFn | None = None,
    save_probs: bool = False,
    palette: bool = True,
    log: Callable[[str], None] | None = None,
    devices: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Predicts, exports and (where ground truth exists) scores every example.

    ``config``: reads ``config.model`` (variant, classes; the model is built from it with
    ``config.test.num_iters`` unless ``apply_fn`` is given) and ``config.test``. ``examples``:
    dicts with ``name`` and ``image`` ((H, W, 3) uint8, or the evaluation pipeline's batches of
    one with normalised ``image`` and ``raw_image``), optionally ``labels`` (C-1,) and ``mask``
    (H, W) ground truth (255 = ignore). ``devices``: see :func:`inference_devices`; results
    equal the one-device path. ``log`` gets one line per example and a summary line. An
    example with an ``error`` entry (an unreadable file: ``preprocess.photographs``, the
    evaluation pipeline) is skipped and listed in ``failed``; every other one is processed.

    Returns ``{'num_images', 'num_predicted', 'num_skipped', 'num_scored', 'seconds',
    'images_per_second' (predicted images over the time spent on them; None if none),
    'images_per_device', 'out_dir', 'scores': {'pred'[, 'crf']: metrics.segmentation_scores},
    'confusions': {kind: (C, C) int64}, 'failed': [(name, why), ...]}``. The output folder is
    checked before the first prediction (:func:`prepare_output_dir`).
    """
    run = InferenceRun(
        config, variables, out_dir, apply_fn=apply_fn, save_probs=save_probs, palette=palette,
        devices=devices,
    )  # fmt: skip
    started = time.perf_counter()
    pending: collections.deque[dict[str, Any]] = collections.deque()
    for example in examples:
        entry = run.start(example)
        if entry is None:
            continue
        pending.append(entry)
        while len(pending) >= run.window:
            run.finish(pending.popleft(), log)
    while pending:
        run.finish(pending.popleft(), log)
    summary = run.summary(time.perf_counter() - started)
    if log is not None:
        log(_summary_line(summary))
    return summary
